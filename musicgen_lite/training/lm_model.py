"""The model an LM run trains: building it (from --model, or a preset and a codec), its trainable state, the teacher-forced loss, and publishing it into the run folder."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codebooks.audio import move_entries
from conditioning.chroma import ChromaConditioner, ChromaExtractor
from conditioning.null import drop_conditions
from conditioning.text import T5Conditioner

from ..audio_data import AudioFile
from ..checkpoints import load_model, state_digest
from ..cli_errors import UsageError, load_codec
from ..lm import LMConfig, TransformerLM
from ..model import MusicGen, layout_conditions
from .lm_batches import chroma_frames
from .lm_config import PRESETS, TOKENIZER_VOCAB, Config
from .retarget import retarget


def init_weights(lm: TransformerLM) -> None:
    """GPT-2 style: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * layers)."""
    for name, p in lm.named_parameters():
        if p.ndim == 2:
            std = 0.02 / math.sqrt(2 * lm.cfg.num_layers) if name.endswith(("out.weight", "fc2.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)


def build_base(cfg: Config, files: list[AudioFile], path: Path) -> str | None:
    """Write the run's starting model to `path` (from --model, moved onto --codec if given, or from a preset
    and --codec); returns a line for the run's log, if there is something to say."""
    if cfg.model is not None:
        try:
            model = load_model(cfg.model, precision="fp32")  # trainable weights, whatever it was saved in
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
        if cfg.melody and not model.has_melody:
            raise UsageError(f"--melody needs a melody model, and {cfg.model} has no melody conditioning")
        model.batch_like_transformers = False  # trained here: each row at its own positions, as generation then places it
        note = None
        if cfg.codec is not None:
            agree = retarget(model, load_codec(cfg.codec), [f for f in files if f.split == "train"])
            note = (f"moved {cfg.model} onto the codec {cfg.codec}: a new code's most frequent old partner is the "
                    f"old codec's choice on {', '.join(f'{a:.0%}' for a in agree.tolist())} of frames (per codebook)")
        model.save_pretrained(path, precision="fp32")  # the run trains fp32 weights
        return note
    codec = load_codec(cfg.codec)
    preset = PRESETS[cfg.preset]
    lm_cfg = LMConfig(
        num_codebooks=codec.num_codebooks, codebook_size=codec.codebook_size, dim=preset.dim, num_heads=preset.heads,
        num_layers=preset.layers, ffn_dim=preset.ffn, conditioning="prefix" if cfg.melody else "cross",
    )
    with torch.random.fork_rng(), tempfile.TemporaryDirectory() as tokenizer_dir:
        torch.manual_seed(cfg.seed)
        lm = TransformerLM(lm_cfg)
        init_weights(lm)
        if cfg.text_encoder is not None:
            try:
                text = T5Conditioner.from_pretrained(cfg.text_encoder, dim=preset.dim)
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot load --text-encoder {cfg.text_encoder}: {str(e).splitlines()[0]}") from None
        else:
            captions = sorted({f.caption for f in files if f.caption and f.split == "train"})
            if not captions:
                raise UsageError("no training file has a caption to build a tokenizer from; give --text-encoder")
            text = T5Conditioner.from_captions(
                captions, preset.dim, tokenizer_dir, vocab_size=TOKENIZER_VOCAB, d_model=preset.t5_dim,
                num_layers=preset.t5_layers, num_heads=preset.t5_heads, d_kv=preset.t5_dim // preset.t5_heads,
                d_ff=preset.t5_ffn, seed=cfg.seed,
            )
        chroma = None
        if cfg.melody:  # the chroma of one training segment (the extractor's defaults: 32 kHz, hop 4096)
            seconds = max(1, round(cfg.segment_seconds * codec.frame_rate)) / codec.frame_rate
            chroma = ChromaConditioner(preset.dim, chroma_length=chroma_frames(seconds, ChromaExtractor()))
        model = MusicGen(lm, codec, text, chroma, max_duration=cfg.segment_seconds, extend_stride=0.6 * cfg.segment_seconds)
        model.save_pretrained(path)
    return None


def trainable_state(model: MusicGen) -> dict[str, Tensor]:
    """Everything a checkpoint holds: the model without the codec, a frozen text encoder and a melody prior
    (trained by train.py prior, carried along unchanged)."""
    frozen = ("codec.", "melody_prior.") + (("text.encoder.",) if model.text.freeze else ())
    return {k: v for k, v in model.state_dict().items() if not k.startswith(frozen)}


class TeacherForcing(nn.Module):
    """The trainable parts of a MusicGen and one teacher-forced pass over a batch of segments:
    -> (summed cross-entropy [K], scored codes [K]) per codebook, and the loss to minimise.

    A segment's opening (its first `opening_steps` pattern steps) is where only the conditions tell
    which pitches come: later, the codes so far give the key away. The loss can weight the opening's
    codes more (`opening_weight`), and add an auxiliary pitch loss (`pitch_weight`): a linear head
    that reads the LM's states over the opening and predicts the segment's pitch-class distribution
    (the histogram of the mix's chromagram), which pays for carrying the key a caption names into
    the first steps' states. The head is part of training only; the model never holds it. What
    both did to a trained model is in docs/MODEL_CARD.md."""

    def __init__(self, model: MusicGen, opening_steps: int = 0, opening_weight: float = 1.0, pitch_weight: float = 0.0):
        super().__init__()
        self.lm, self.text, self.chroma = model.lm, model.text, model.chroma
        self.pattern = model.pattern
        self.batch_like_transformers = model.batch_like_transformers
        self.opening_steps, self.opening_weight, self.pitch_weight = opening_steps, opening_weight, pitch_weight
        self.pitch_head = None
        if pitch_weight > 0:
            if model.chroma is None:
                raise UsageError("the pitch loss needs a melody model (its targets are the mix's chromagram)")
            self.pitch_head = nn.Linear(model.lm.cfg.dim, model.chroma.num_chroma)
            nn.init.zeros_(self.pitch_head.weight)  # starts at the uniform guess, and alike in every run
            nn.init.zeros_(self.pitch_head.bias)

    def forward(self, codes: Tensor, valid: Tensor, texts: list[str], captioned: Tensor, chroma: Tensor | None,
                condition_dropout: float, melody_dropout: float, generator: torch.Generator | None,
                mix_chroma: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.lm.cfg
        emb, mask = self.text(texts)  # [B, L, D], [B, L]
        tokens = mask  # each row's own text length, also where its condition is dropped (as at generation)
        feats = None if chroma is None else F.one_hot(chroma, self.chroma.num_chroma).float()  # [B, C, 12]
        if generator is not None:  # training: guidance dropout of text and melody together, and of the melody alone
            emb, mask, feats = drop_conditions(emb, mask, feats, condition_dropout, generator, melody_dropout)
        emb = emb * captioned[:, None, None]  # an uncaptioned row always gets the null text
        mask = mask * captioned[:, None]
        text_tokens = None if self.batch_like_transformers else tokens  # each row at its own positions
        cond = layout_conditions(cfg.conditioning, emb, mask, self.chroma, feats, text_tokens)
        seq = self.pattern.build(codes, cfg.special_token)  # [B, K, S]
        real = self.pattern.build(valid[:, None].expand(-1, cfg.num_codebooks, -1).long(), 0).bool()  # [B, K, S]
        states = self.lm.states(seq[:, :, :-1], cond)  # [B, S-1, D]
        logits = self.lm.logits(states)  # [B, K, S-1, codebook_size]: step s predicts step s + 1
        scored = real[:, :, 1:]  # a real code (not an empty pattern slot, not past the clip's end)
        targets = seq[:, :, 1:].masked_fill(~scored, -100)
        ce = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), ignore_index=-100, reduction="none")
        ce = ce.view_as(targets)  # [B, K, S-1]
        weight = torch.ones(targets.shape[-1], device=ce.device)  # [S-1]
        weight[: self.opening_steps] = self.opening_weight
        counted = scored * weight
        loss = ((ce * weight).sum(dim=(0, 2)) / counted.sum(dim=(0, 2)).clamp(min=1)).mean()
        if self.pitch_head is not None and mix_chroma is not None:
            target = F.one_hot(mix_chroma, self.chroma.num_chroma).float().mean(dim=1)  # [B, 12]
            guess = F.log_softmax(self.pitch_head(states[:, : max(1, self.opening_steps)]).float(), dim=-1)  # [B, O, 12]
            loss = loss + self.pitch_weight * -(target[:, None] * guess).sum(-1).mean()
        return ce.sum(dim=(0, 2)), scored.sum(dim=(0, 2)), loss  # [K], [K], []


def publish(model: MusicGen, run: Path) -> None:
    """Write the model into the run folder itself (config.json, model.safetensors, codec/,
    text_encoder/) beside checkpoints/ and log.csv: staged in full, then each entry renamed into place,
    config.json last."""
    staged = run / ".final"
    model.save_pretrained(staged)
    move_entries(staged, run)
    staged.rmdir()


def remove_leftovers(run: Path) -> None:
    """Temporary files and folders of writes that a killed run left half done."""
    for path in [*(run / "checkpoints").glob(".*"), *run.glob(".old-*"), *run.glob("..final.*"), run / ".final"]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def weights_digest(model: MusicGen) -> str:
    return state_digest(trainable_state(model))


