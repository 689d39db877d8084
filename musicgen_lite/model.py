"""`MusicGen`: the codec, the conditioners and the LM in one object, plus long-form generation.

    text  --T5Conditioner-->  [B, L, D] --+
                                          +--> TransformerLM --(pattern, sampling)--> codes --codec--> audio
    melody --ChromaConditioner--> [B, C, D] (prefix models only)

Generation longer than `max_duration` slides a window over the output, as audiocraft does: each new
window is prompted with the last `max_duration - extend_stride` seconds of codes and, for melody
models, sees the chromagram from its own start time.

A model carries its sampling defaults (`generation_defaults`, from its directory's
generation_config.json, see generation_config.py); the arguments a caller gives override them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from codebooks.codec import EncodecCodec
from codebooks.patterns import CodebookPattern, make_pattern
from conditioning.chroma import ChromaConditioner
from conditioning.null import null_chroma_features, null_text
from conditioning.text import T5Conditioner

from .generation_config import MUSICGEN_DEFAULTS, read_generation_defaults, write_generation_defaults
from .lm import LMConditions, LMConfig, TransformerLM
from .sampling import SamplingParams, sample_frames

FORMAT = "musicgen_lite"


class MusicGen(nn.Module):
    def __init__(
        self,
        lm: TransformerLM,
        codec: EncodecCodec,
        text: T5Conditioner,
        chroma: ChromaConditioner | None = None,
        max_duration: float = 30.0,
        extend_stride: float = 18.0,
    ):
        super().__init__()
        if codec.num_codebooks != lm.cfg.num_codebooks or codec.cardinality != lm.cfg.card:
            raise ValueError(
                f"codec ({codec.num_codebooks} x {codec.cardinality}) does not match the LM "
                f"({lm.cfg.num_codebooks} x {lm.cfg.card})"
            )
        if chroma is not None and lm.cfg.conditioning != "prefix":
            raise ValueError("melody conditioning needs a prefix-conditioned LM")
        if not 0 < extend_stride < max_duration:
            raise ValueError("extend_stride must be in (0, max_duration)")
        self.lm, self.codec, self.text, self.chroma = lm, codec, text, chroma
        self.max_duration, self.extend_stride = float(max_duration), float(extend_stride)
        self.pattern: CodebookPattern = make_pattern(lm.cfg.pattern, lm.cfg.num_codebooks)
        self.generation_defaults: SamplingParams = MUSICGEN_DEFAULTS

    def sampling_params(self, overrides: dict) -> SamplingParams:
        """This model's sampling defaults with the caller's `overrides` (SamplingParams fields) applied."""
        return replace(self.generation_defaults, **overrides)

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.codec.frame_rate

    @property
    def has_melody(self) -> bool:
        return self.chroma is not None

    # -- conditions ------------------------------------------------------------------------------
    def conditions(self, texts: list[str], melody: Tensor | None, guided: bool) -> LMConditions:
        """Texts (B) and optional one-hot chroma features [B, T, 12] -> LM conditions, with the null
        rows appended when guided: zero text states with an all-zero mask, and the null melody."""
        emb, mask = self.text(texts)  # [B, L, D], [B, L]
        if guided:
            null_emb, null_mask = null_text(emb, mask)
            emb, mask = torch.cat([emb, null_emb]), torch.cat([mask, null_mask])
        if self.lm.cfg.conditioning == "cross":
            return LMConditions(cross=emb, cross_mask=mask)
        parts = [emb]
        if self.chroma is not None:
            feats = melody if melody is not None else self.chroma.null_features(len(texts))
            if guided:
                feats = torch.cat([feats, null_chroma_features(feats)])
            parts.insert(0, self.chroma(feats))  # [N, chroma_length, D]
        return LMConditions(prefix=torch.cat(parts, dim=1))

    def melody_features(self, wavs: list[Tensor | None]) -> Tensor | None:
        """Mono waveforms at the chroma rate (None = no melody for that row) -> one-hot [B, T, 12],
        or None when no row has a melody."""
        if self.chroma is None:
            raise ValueError("this model has no melody conditioning; use a MusicGen-Melody-style model")
        given = [w for w in wavs if w is not None]
        if not given:
            return None
        feats = iter(self.chroma.features(given))  # [B', T, 12]
        out = [next(feats) if w is not None else None for w in wavs]
        ref = next(f for f in out if f is not None)
        null = self.chroma.null_features(1, ref.shape[0], device=ref.device)[0]
        return torch.stack([null if f is None else f for f in out])

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(
        self,
        texts: list[str],
        frames: int,
        params: SamplingParams,
        generators: list[torch.Generator],
        melody: list[Tensor | None] | None = None,
        prompt: Tensor | None = None,
        progress: bool = False,
        threads: int | None = None,
    ) -> Tensor:
        """[B, K, frames] codes for B texts; `melody` mono waveforms at the chroma rate (None = no
        melody for that row), heard from time 0 and looped when shorter; `prompt` [B, K, P] codes
        that open the output; `threads` the decoding loop's intra-op threads (None: lm.decode_threads,
        else torch's)."""
        return torch.cat(list(self.stream_tokens(texts, frames, params, generators, melody, prompt, progress, threads)), dim=-1)

    @torch.no_grad()
    def stream_tokens(
        self,
        texts: list[str],
        frames: int,
        params: SamplingParams,
        generators: list[torch.Generator],
        melody: list[Tensor | None] | None = None,
        prompt: Tensor | None = None,
        progress: bool = False,
        threads: int | None = None,
        chunk_frames: int | None = None,
    ) -> Iterator[Tensor]:
        """`generate_tokens`' codes as they are made: [B, K, n] pieces in frame order, the prompt's frames
        first, then pieces of about `chunk_frames` frames (None: one piece per window)."""
        window = max(1, int(self.max_duration * self.frame_rate))
        stride = max(1, int(self.extend_stride * self.frame_rate))
        out = None if prompt is None else prompt.to(self.lm.device)  # every frame so far: [B, K, made]
        if out is not None:
            yield out
        offset = 0  # first frame of the current window
        while out is None or out.shape[-1] < frames:
            length = min(window, frames - offset)
            keep = None if out is None else out[:, :, offset:]
            cond = self.conditions(texts, self._melody_window(melody, offset), params.guided)
            made = offset  # frames of this window's pieces so far, counted from 0
            pieces = sample_frames(self.lm, self.pattern, cond, length, params, generators, keep, progress, threads, chunk_frames)
            for piece in pieces:
                made += piece.shape[-1]
                new = made - (0 if out is None else out.shape[-1])  # frames of the piece not seen before
                if new > 0:
                    out = piece if out is None else torch.cat([out, piece[:, :, -new:]], dim=-1)
                    yield piece[:, :, -new:]
            offset += stride

    def _melody_window(self, wavs: list[Tensor | None] | None, frame_offset: int) -> Tensor | None:
        """Chroma features for a window starting at token frame `frame_offset`. The first window
        hears each melody whole (as transformers does); later ones hear `max_duration` seconds of
        it from their own start time, looping the melody when it is shorter (as audiocraft does)."""
        if wavs is None:
            return None
        if frame_offset:
            rate = self.chroma.extractor.sample_rate
            start, length = round(frame_offset / self.frame_rate * rate), round(self.max_duration * rate)
            positions = torch.arange(start, start + length)
            wavs = [None if w is None else w[positions % w.shape[0]] for w in wavs]
        return self.melody_features(wavs)

    # -- persistence -----------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": 1,
            "lm": self.lm.cfg.to_dict(),
            "max_duration": self.max_duration,
            "extend_stride": self.extend_stride,
            "chroma": None if self.chroma is None else self._chroma_config(),
        }

    def _chroma_config(self) -> dict:
        ex = self.chroma.extractor
        return {
            "chroma_length": self.chroma.chroma_length,
            "num_chroma": ex.num_chroma,
            "sample_rate": ex.sample_rate,
            "n_fft": ex.n_fft,
            "hop_length": ex.hop_length,
        }

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json, model.safetensors (LM + projections), codec/ and text_encoder/.
        Everything goes to a temporary sibling directory first and is renamed into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tensors = {f"lm.{k}": v for k, v in self.lm.state_dict().items()}
        if not isinstance(self.text.proj, nn.Identity):
            tensors.update({f"text_proj.{k}": v for k, v in self.text.proj.state_dict().items()})
        if self.chroma is not None:
            tensors.update({f"chroma.{k}": v for k, v in self.chroma.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(self.config_dict(), indent=2))
        write_generation_defaults(self.generation_defaults, tmp)
        self.codec.save_pretrained(tmp / "codec")
        self.text.save_pretrained(tmp / "text_encoder")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MusicGen":
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} model directory")
        tensors = load_file(path / "model.safetensors")
        lm = TransformerLM(LMConfig.from_dict(cfg["lm"]))
        lm.load_state_dict(_strip(tensors, "lm."))
        text = T5Conditioner.from_pretrained(path / "text_encoder", dim=lm.cfg.dim)
        if not isinstance(text.proj, nn.Identity):
            text.proj.load_state_dict(_strip(tensors, "text_proj."))
        chroma = None
        if cfg.get("chroma") is not None:
            chroma = ChromaConditioner(dim=lm.cfg.dim, **cfg["chroma"])
            chroma.load_state_dict(_strip(tensors, "chroma."))
        codec = EncodecCodec.from_pretrained(path / "codec", num_codebooks=lm.cfg.num_codebooks)
        model = cls(lm, codec, text, chroma, cfg["max_duration"], cfg["extend_stride"])
        model.generation_defaults = read_generation_defaults(path)
        return model.eval()


def _strip(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
