"""`MusicGen`: the codec, the conditioners and the LM in one object, plus long-form generation.

    text  --T5Conditioner-->  [B, L, D] --+
                                          +--> TransformerLM --(pattern, sampling)--> codes --codec--> audio
    melody --ChromaConditioner--> [B, C, D] (prefix models only)

Each row of a batch is computed so that a prompt's output does not depend on the other prompts
(`LMConditions.independent_rows`: texts encoded one by one, prefix rows at their own positions);
`batch_like_transformers` (set for transformers' checkpoints) batches as transformers does instead,
texts encoded together and, for MusicGen-Melody, the prefix padded to the batch's longest text, which
is what token-exactness with transformers needs.

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
from safetensors.torch import save_file
from torch import Tensor, nn

from codebooks.codec import EncodecCodec
from codebooks.patterns import CodebookPattern, make_pattern
from conditioning.chroma import ChromaConditioner
from conditioning.null import NO_CAPTION, null_chroma_features, null_text
from conditioning.text import T5Conditioner

from .checksums import write_manifest
from .generation_config import MUSICGEN_DEFAULTS, read_generation_defaults, write_generation_defaults
from .lm import LMConditions, LMConfig, TransformerLM
from .melody_prior import MelodyPrior
from .sampling import SamplingParams, classifier_free_guidance, sample_frames, sample_next
from .weight_files import WeightFiles

FORMAT = "musicgen_lite"
PRIOR_DIR = "melody_prior"  # a model directory's optional melody prior
SAVED_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}  # how save_pretrained may store the LM


class MusicGen(nn.Module):
    def __init__(
        self,
        lm: TransformerLM,
        codec: EncodecCodec,
        text: T5Conditioner,
        chroma: ChromaConditioner | None = None,
        max_duration: float = 30.0,
        extend_stride: float = 18.0,
        batch_like_transformers: bool = False,
        melody_prior: MelodyPrior | None = None,
    ):
        super().__init__()
        if codec.num_codebooks != lm.cfg.num_codebooks or codec.codebook_size != lm.cfg.codebook_size:
            raise ValueError(
                f"codec ({codec.num_codebooks} x {codec.codebook_size}) does not match the LM "
                f"({lm.cfg.num_codebooks} x {lm.cfg.codebook_size})"
            )
        if chroma is not None and lm.cfg.conditioning != "prefix":
            raise ValueError("melody conditioning needs a prefix-conditioned LM")
        if melody_prior is not None and chroma is None:
            raise ValueError("a melody prior needs a melody model (it proposes the melody condition)")
        if not 0 < extend_stride < max_duration:
            raise ValueError("extend_stride must be in (0, max_duration)")
        self.lm, self.codec, self.text, self.chroma = lm, codec, text, chroma
        # proposes a melody for a row given none (melody_prior.py); None: such rows have no melody
        self.melody_prior = melody_prior
        self.max_duration, self.extend_stride = float(max_duration), float(extend_stride)
        self.batch_like_transformers = batch_like_transformers  # see the module docstring
        self.pattern: CodebookPattern = make_pattern(lm.cfg.pattern, lm.cfg.num_codebooks)
        self.generation_defaults: SamplingParams = MUSICGEN_DEFAULTS
        # the precision the LM's weights were saved in, and so its decoding default (see load_model):
        # weights saved in fp16 are fp16 numbers, and fbgemm's fp16 products sum them in fp32
        self.saved_precision = "fp32"

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
    def conditions(self, texts: list[str | None], melody: Tensor | None, guided: bool) -> LMConditions:
        """Texts (B; None = no caption, the null text) and optional one-hot chroma features [B, T, 12]
        -> LM conditions, with the null rows appended when guided: zero text states with an all-zero
        mask, and the null melody."""
        emb, mask = self.encode_texts([NO_CAPTION if text is None else text for text in texts])  # [B, L, D], [B, L]
        tokens = mask  # the text's own tokens: a null row keeps as many (zero) entries as its conditional row
        uncaptioned = torch.tensor([text is None for text in texts], device=emb.device)
        if uncaptioned.any():
            null_emb, null_mask = null_text(emb, mask)
            emb = torch.where(uncaptioned[:, None, None], null_emb, emb)
            mask = torch.where(uncaptioned[:, None], null_mask, mask)
        feats = None
        if self.chroma is not None and self.lm.cfg.conditioning == "prefix":
            feats = melody if melody is not None else self.chroma.null_features(len(texts))
        if guided:
            null_emb, null_mask = null_text(emb, mask)
            emb, mask, tokens = torch.cat([emb, null_emb]), torch.cat([mask, null_mask]), torch.cat([tokens, tokens])
            feats = None if feats is None else torch.cat([feats, null_chroma_features(feats)])
        text_tokens = None if self.batch_like_transformers else tokens
        return layout_conditions(self.lm.cfg.conditioning, emb, mask, self.chroma, feats, text_tokens)

    def encode_texts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Texts (B) -> T5 states [B, L, D] and mask [B, L], padded to the longest text. Each text is
        encoded on its own (a padded batch can round differently row by row), except with `batch_like_transformers`,
        where the batch is encoded together as transformers does."""
        return self.text(texts) if self.batch_like_transformers else self.text.encode_each(texts)

    def melody_features(self, melodies: list[Tensor | None]) -> Tensor | None:
        """Melodies (None = no melody for that row) -> one-hot [B, T, 12], or None when no row has one.

        A melody is a mono waveform [N] at the chroma rate, or already one-hot chroma [T, 12] (a
        written tune, `conditioning.midi_melody`). Each row is looped to the conditioner's length on
        its own; with `batch_like_transformers` shorter rows are padded instead with the null melody's
        bin, which is also what the extractor makes of the zeros that pad a shorter waveform.
        """
        if self.chroma is None:
            raise ValueError("this model has no melody conditioning; use a MusicGen-Melody-style model")
        if all(m is None for m in melodies):
            return None
        if self.batch_like_transformers:  # transformers pads every melody to the longest one
            wavs = [m for m in melodies if m is not None and m.dim() == 1]
            extracted = iter(self.chroma.features(wavs) if wavs else [])  # [B', T, 12]
            out = [None if m is None else next(extracted) if m.dim() == 1 else m.float() for m in melodies]
        else:  # each melody on its own, looped to the conditioner's length: rows do not see each other
            out = [None if m is None else self._looped(self.chroma.features([m]) if m.dim() == 1 else m.float()[None])[0]
                   for m in melodies]
        frames = max(f.shape[0] for f in out if f is not None)
        device = next(f for f in out if f is not None).device
        null = self.chroma.null_features(1, frames, device=device)[0]  # [T, 12]
        return torch.stack([null if f is None else torch.cat([f.to(device), null[f.shape[0]:]]) for f in out])

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
        """[B, K, frames] codes for B texts; `melody` mono waveforms at the chroma rate or one-hot chroma
        [T, 12] (None = no melody for that row), heard from time 0 and looped when shorter; `prompt` [B, K, P]
        codes that open the output; `threads` the decoding loop's intra-op threads (None:
        lm.decoding_threads())."""
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
        elif self.melody_prior is not None:  # a continuation's key is its prompt's; a fresh clip's, its caption's
            melody = self.proposed_melodies(texts, melody, generators)
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

    def proposed_melodies(self, texts: list[str], melody: list[Tensor | None] | None,
                          generators: list[torch.Generator]) -> list[Tensor]:
        """`melody` with the melody prior's line (one-hot [chroma_length, 12]) for every row that has no
        melody; each line is drawn from its row's generator, before the row's codes."""
        melody = melody or [None] * len(texts)
        rows = [i for i, m in enumerate(melody) if m is None]
        if not rows:
            return melody
        lines = self.melody_prior.sample([texts[i] for i in rows], [generators[i] for i in rows])  # [R, C, 12]
        melody = list(melody)
        for i, line in zip(rows, lines):
            melody[i] = line
        return melody

    def _looped(self, feats: Tensor) -> Tensor:
        """[1, T, 12] features -> [1, chroma_length, 12], looped or cut as ChromaConditioner does."""
        return feats.repeat(1, math.ceil(self.chroma.chroma_length / feats.shape[1]), 1)[:, : self.chroma.chroma_length]

    def _melody_window(self, wavs: list[Tensor | None] | None, frame_offset: int) -> Tensor | None:
        """Chroma features for a window starting at token frame `frame_offset`. The first window
        hears each melody whole (as transformers does); later ones hear `max_duration` seconds of
        it from their own start time, looping the melody when it is shorter (as audiocraft does)."""
        if wavs is None:
            return None
        if frame_offset:
            rate, hop = self.chroma.extractor.sample_rate, self.chroma.extractor.hop_length
            start, length = round(frame_offset / self.frame_rate * rate), round(self.max_duration * rate)
            samples = torch.arange(start, start + length)
            frames = torch.arange(round(start / hop), round(start / hop) + 1 + length // hop)  # one-hot [T, 12] rows
            wavs = [None if w is None else w[(samples if w.dim() == 1 else frames) % w.shape[0]] for w in wavs]
        return self.melody_features(wavs)

    @torch.no_grad()
    def draw_teacher_forced(self, codes: Tensor, texts: list[str | None], melody: list[Tensor | None] | None,
                            params: SamplingParams, generator: torch.Generator) -> Tensor:
        """[B, K, T] true codes -> [B, K, T] codes each drawn with `params` (guidance included) from the
        LM's distribution given every earlier true code (teacher forcing): the LM's choices one step at
        a time, without its errors piling up as in generation. `texts` None = the null caption; `melody`
        as in `generate_tokens`."""
        feats = self.melody_features(melody) if melody is not None else None
        cond = self.conditions(texts, feats, params.guided)
        seq = self.pattern.build(codes, self.lm.cfg.special_token)  # [B, K, S]
        copies = cond.rows // codes.shape[0]
        logits = self.lm(seq[:, :, :-1].repeat(copies, 1, 1), cond).float()  # [rows, K, S-1, V]: step s + 1
        if params.guided:
            logits = classifier_free_guidance(logits, params.cfg_coef)  # [B, K, S-1, V]
        drawn = sample_next(logits, params, torch.rand(logits.shape[:-1], generator=generator))  # [B, K, S-1]
        drawn = torch.cat([seq[:, :, :1], drawn], dim=-1)  # step 0 holds no code
        return self.pattern.revert(drawn, codes.shape[-1])

    # -- persistence -----------------------------------------------------------------------------
    def config_dict(self, precision: str = "fp32") -> dict:
        return {
            "format": FORMAT,
            "version": 1,
            "precision": precision,
            "lm": self.lm.cfg.to_dict(),
            "max_duration": self.max_duration,
            "extend_stride": self.extend_stride,
            "batch_like_transformers": self.batch_like_transformers,
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

    def save_pretrained(self, path: str | Path, precision: str | None = None) -> None:
        """Write config.json, model.safetensors (LM + projections), codec/, text_encoder/ and the
        checksums of them all (checksums.sha256). `precision` "fp16" stores the LM's weights in half
        precision (half the bytes; the model then decodes with fp16 weights by default, see load_model);
        None keeps the LM's own: fp16 for an LM decoding in fp16, else fp32 (which loses nothing of bf16).
        Everything goes to a temporary sibling directory first and is renamed into place."""
        if precision is None:
            precision = self.lm.precision if self.lm.precision in SAVED_PRECISIONS else "fp32"
        if precision not in SAVED_PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(SAVED_PRECISIONS)}, got {precision!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tensors = {f"lm.{k}": v.to(SAVED_PRECISIONS[precision]) for k, v in self.lm.state_dict().items()}
        if not isinstance(self.text.proj, nn.Identity):
            tensors.update({f"text_proj.{k}": v for k, v in self.text.proj.state_dict().items()})
        if self.chroma is not None:
            tensors.update({f"chroma.{k}": v for k, v in self.chroma.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(self.config_dict(precision), indent=2))
        write_generation_defaults(self.generation_defaults, tmp)
        self.codec.save_pretrained(tmp / "codec")
        self.text.save_pretrained(tmp / "text_encoder")
        if self.melody_prior is not None:
            self.melody_prior.save_pretrained(tmp / PRIOR_DIR)
        write_manifest(tmp)
        move_into_place(tmp, path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MusicGen:
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} model directory")
        with WeightFiles(path) as weights:  # the LM is built empty and filled, not initialised and overwritten
            with torch.device("meta"):
                lm = TransformerLM(LMConfig.from_dict(cfg["lm"]))
            weights.fill(lm, {name: [f"lm.{name}"] for name in lm.state_dict()})
            text = T5Conditioner.from_pretrained(path / "text_encoder", dim=lm.cfg.dim)
            if not isinstance(text.proj, nn.Identity):
                text.proj.load_state_dict(weights.state_dict("text_proj."))
            chroma = None
            if cfg.get("chroma") is not None:
                chroma = ChromaConditioner(dim=lm.cfg.dim, **cfg["chroma"])
                chroma.load_state_dict(weights.state_dict("chroma."))
        codec = EncodecCodec.from_pretrained(path / "codec", num_codebooks=lm.cfg.num_codebooks)
        prior = MelodyPrior.from_pretrained(path / PRIOR_DIR) if (path / PRIOR_DIR).is_dir() else None
        model = cls(lm, codec, text, chroma, cfg["max_duration"], cfg["extend_stride"], cfg.get("batch_like_transformers", False),
                    prior)
        model.generation_defaults = read_generation_defaults(path)
        model.saved_precision = cfg.get("precision", "fp32")
        return model.eval()


def layout_conditions(
    conditioning: str, emb: Tensor, mask: Tensor, chroma: ChromaConditioner | None, features: Tensor | None,
    text_tokens: Tensor | None = None,
) -> LMConditions:
    """The one place that lays conditions out for the LM, in generation, training and evaluation.

    cross:   text states emb [B, L, D] (mask [B, L]) are cross-attended
    prefix:  [chroma(features) [B, C, D] | emb [B, L, D]] is read before the codes (melody models);
             without a chroma conditioner (or features) the prefix is the text alone

    `text_tokens` [B, L] (1 = a token of the row's own text, also where its condition is dropped)
    computes each row apart (`LMConditions.independent_rows`: prefix rows at their own positions);
    None keeps transformers' batching, the prefix padded to the batch's longest text.
    """
    independent = text_tokens is not None
    if conditioning == "cross":
        return LMConditions(cross=emb, cross_mask=mask, independent_rows=independent)
    if chroma is None or features is None:
        return LMConditions(prefix=emb, prefix_mask=text_tokens, independent_rows=independent)
    states = chroma(features)  # [B, C, D]
    prefix_mask = torch.cat([text_tokens.new_ones(states.shape[:2]), text_tokens], dim=1) if independent else None
    return LMConditions(prefix=torch.cat([states, emb], dim=1), prefix_mask=prefix_mask, independent_rows=independent)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished directory `tmp` to `path`, replacing what was there (its sibling)."""
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
