"""Train or fine-tune the MusicGen language model on a folder of audio.

    python train.py lm --data DIR --out RUN --codec CODEC_DIR --preset small-cpu   # from scratch
    python train.py lm --data DIR --out RUN --model path/to/musicgen-small         # fine-tune
    torchrun --nproc_per_node=4 train.py lm --data DIR --out RUN ...               # data parallel

Top to bottom:
  1. scan DIR (captions, train/valid/test by file) and encode every file once with the codec
     into a token cache (musicgen_lite.audio_data), so that epochs read tokens, not audio
  2. RUN/checkpoints/base: the model every checkpoint of the run applies to (architecture, codec,
     tokenizer), written on the first run from --model, or from --preset + --codec + a T5
  3. resume from the newest readable RUN/checkpoints/step-*.pt (or start at step 0)
  4. each step: B segments of codes [B, K, T] -> the model's pattern [B, K, S]; the LM reads steps
     [:-1] and is scored on steps [1:] with one cross-entropy per codebook, only where a slot holds
     a real code; text (and melody) conditions are dropped for classifier-free guidance; AdamW,
     warmup + cosine, gradients clipped at 1.0
  5. a non-finite loss or gradient skips the step; three in a row roll back to the last checkpoint
     and halve the learning rate
  6. validation, checkpoints (atomic, checksummed; the last --keep and best.pt), RUN/log.csv
  7. the final model is written into RUN: musicgen_lite.load_model(RUN) loads it
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from codebooks.codec import EncodecCodec
from conditioning.chroma import ChromaConditioner, ChromaExtractor
from conditioning.null import drop_conditions
from conditioning.text import T5Conditioner

from .audio_data import AudioFile, Clip, DataError, TokenCache, chroma_span, scan
from .checkpoints import load_model
from .cli import UsageError, _Parser
from .lm import LMConditions, LMConfig, TransformerLM
from .model import MusicGen, prefix_conditions
from .run_lock import RunInUse, RunLock

PROG = "train.py lm"


# -----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Preset:
    dim: int
    layers: int
    heads: int
    ffn: int
    t5_dim: int  # the T5 encoder trained with the LM when no --text-encoder is given
    t5_layers: int
    t5_heads: int
    t5_ffn: int


PRESETS = {
    "tiny": Preset(64, 2, 4, 256, 64, 2, 4, 256),
    "small-cpu": Preset(256, 4, 4, 1024, 128, 2, 4, 512),
    "base": Preset(512, 8, 8, 2048, 256, 4, 4, 1024),
    "big": Preset(768, 12, 12, 3072, 512, 6, 8, 2048),
    "musicgen-small": Preset(1024, 24, 16, 4096, 768, 12, 12, 3072),  # t5-base for the text
}
DEFAULT_PRESET = "small-cpu"
TOKENIZER_VOCAB = 2048  # upper bound; sentencepiece stops at what the captions support
NO_CAPTION = "none"  # what the text encoder reads for an uncaptioned row, whose condition is then nulled
MAX_BAD_STEPS = 3  # non-finite steps in a row before rolling back
MIN_LR_SCALE = 1 / 1024  # give up after ten halvings
MIN_LR_RATIO = 0.1  # the cosine ends at this fraction of --lr
CHECKSUM_MAGIC = b"MGLCKPT1"
ARCHITECTURE_KEYS = ("model", "preset", "codec", "text_encoder", "melody", "train_text_encoder", "segment_seconds")


@dataclass
class Config:
    data: str
    out: str
    model: str | None = None
    preset: str | None = None
    codec: str | None = None
    text_encoder: str | None = None
    melody: bool = False
    train_text_encoder: bool | None = None  # default: train a T5 built from the captions, freeze a pretrained one
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    lr: float | None = None  # None: 1e-4 when fine-tuning, 5e-4 from scratch
    warmup_steps: int | None = None  # None: a tenth of the run, at most 500
    weight_decay: float = 0.1
    segment_seconds: float = 10.0
    cfg_dropout: float = 0.1
    caption_augment: bool = True
    precision: str = "auto"
    save_every: int = 500
    eval_every: int = 500
    eval_batches: int = 16
    log_every: int = 10
    keep: int = 3
    valid_fraction: float = 0.05
    chunk_seconds: float = 600.0
    cache_dir: str | None = None
    seed: int = 0
    device: str | None = None
    num_workers: int = 2


def build_parser() -> argparse.ArgumentParser:
    c = Config
    p = _Parser(
        prog=PROG,
        description="Train (or fine-tune) the MusicGen LM on a folder of audio. Running the same command "
        "again resumes from the latest checkpoint in --out.",
    )
    p.add_argument("--data", required=True, help="folder of wav/flac/ogg/mp3 files (searched recursively), "
                   "captions in name.txt sidecars or metadata.jsonl")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, log.csv, cache/ and the final model")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="fine-tune this model: a musicgen_lite directory or a transformers "
                   "MusicGen / MusicGen-Melody checkpoint directory")
    g.add_argument("--preset", choices=sorted(PRESETS), help=f"model size when training from scratch (default "
                   f"{DEFAULT_PRESET}): " + ", ".join(f"{k} ({v.dim}x{v.layers})" for k, v in PRESETS.items()))
    g.add_argument("--codec", help="trained codec directory (transformers EncodecModel format); required from scratch")
    g.add_argument("--text-encoder", help="pretrained T5 directory (with tokenizer) for a model trained from "
                   "scratch; default: a small T5 with a tokenizer built from the captions, trained jointly")
    g.add_argument("--melody", action="store_true", help="train a MusicGen-Melody-style model conditioned on "
                   "the chroma of each training clip")
    g.add_argument("--train-text-encoder", dest="train_text_encoder", action="store_true", default=None,
                   help="update the T5 encoder too (default when it is built from the captions)")
    g.add_argument("--freeze-text-encoder", dest="train_text_encoder", action="store_false",
                   help="keep the T5 encoder fixed (default for a pretrained one)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs worth)")
    g.add_argument("--epochs", type=float, help="passes over the training segments (default 10 without --max-steps)")
    g.add_argument("--batch-size", type=int, default=c.batch_size, help=f"segments per step, over all processes "
                   f"(default {c.batch_size})")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 fine-tuning, 5e-4 from scratch)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup (default a tenth of the run, at most 500)")
    g.add_argument("--weight-decay", type=float, default=c.weight_decay, help="AdamW decay of weight matrices")
    g.add_argument("--segment-seconds", type=float, default=c.segment_seconds, help=f"length of a training "
                   f"segment (default {c.segment_seconds:g})")
    g.add_argument("--cfg-dropout", type=float, default=c.cfg_dropout, help="probability of replacing a row's "
                   f"text and melody by the null condition (default {c.cfg_dropout:g})")
    g.add_argument("--caption-augment", action=argparse.BooleanOptionalAction, default=c.caption_augment,
                   help="train on random subsets and orders of a caption's comma-separated fields (default on)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=c.precision,
                   help="autocast dtype; auto = bf16 (or fp16) on CUDA, fp32 on CPU")
    g = p.add_argument_group("run")
    g.add_argument("--save-every", type=int, default=c.save_every, help=f"steps between checkpoints ({c.save_every})")
    g.add_argument("--eval-every", type=int, default=c.eval_every, help=f"steps between validations ({c.eval_every})")
    g.add_argument("--eval-batches", type=int, default=c.eval_batches, help="validation batches (evenly spread "
                   f"over the validation files; default {c.eval_batches})")
    g.add_argument("--log-every", type=int, default=c.log_every, help=f"steps per log line ({c.log_every})")
    g.add_argument("--keep", type=int, default=c.keep, help=f"step checkpoints kept, besides best.pt ({c.keep})")
    g.add_argument("--valid-fraction", type=float, default=c.valid_fraction, help="share of files held out for "
                   "validation when metadata.jsonl gives no split (by a hash of the path)")
    g.add_argument("--chunk-seconds", type=float, default=c.chunk_seconds, help="long files are encoded in "
                   f"chunks of at most this length (default {c.chunk_seconds:g})")
    g.add_argument("--cache-dir", help="token cache folder (default RUN/cache)")
    g.add_argument("--seed", type=int, default=c.seed)
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cuda when available)")
    g.add_argument("--num-workers", type=int, default=c.num_workers, help="processes reading audio while the "
                   "token cache is built")
    return p


def parse_args(argv: list[str] | None) -> Config:
    cfg = Config(**vars(build_parser().parse_args(argv)))
    positive = {"--batch-size": cfg.batch_size, "--save-every": cfg.save_every, "--eval-every": cfg.eval_every,
                "--eval-batches": cfg.eval_batches, "--log-every": cfg.log_every, "--keep": cfg.keep,
                "--segment-seconds": cfg.segment_seconds, "--chunk-seconds": cfg.chunk_seconds}
    for flag, value in positive.items():
        if not value > 0:
            raise UsageError(f"{flag} must be > 0, got {value}")
    for flag, value in {"--max-steps": cfg.max_steps, "--epochs": cfg.epochs, "--lr": cfg.lr}.items():
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be > 0, got {value}")
    if not 0 <= cfg.cfg_dropout <= 1 or not 0 <= cfg.valid_fraction < 1:
        raise UsageError("--cfg-dropout must be in [0, 1] and --valid-fraction in [0, 1)")
    if cfg.num_workers < 0 or (cfg.warmup_steps is not None and cfg.warmup_steps < 0) or cfg.weight_decay < 0:
        raise UsageError("--num-workers, --warmup-steps and --weight-decay must be >= 0")
    if cfg.model is not None:
        for flag, value in {"--preset": cfg.preset, "--codec": cfg.codec, "--text-encoder": cfg.text_encoder}.items():
            if value is not None:
                raise UsageError(f"{flag} applies to training from scratch; --model brings its own")
    elif cfg.codec is None:
        raise UsageError("training from scratch needs --codec CODEC_DIR (or fine-tune with --model)")
    else:
        cfg.preset = cfg.preset or DEFAULT_PRESET
    if cfg.train_text_encoder is None:
        cfg.train_text_encoder = cfg.model is None and cfg.text_encoder is None
    return cfg


# -----------------------------------------------------------------------------------------------
# processes, devices, precision


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def setup_processes(cfg: Config) -> Dist:
    """One process, or one of torchrun's (RANK / WORLD_SIZE / LOCAL_RANK): gloo on CPU, nccl on CUDA."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    return Dist(rank, world, device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# -----------------------------------------------------------------------------------------------
# logging: stdout lines and RUN/log.csv (main process only)


class RunLog:
    def __init__(self, path: Path, num_codebooks: int, enabled: bool):
        self.enabled, self.path = enabled, path
        train_ppl, val_ppl = ([f"{split}_ppl_{k}" for k in range(num_codebooks)] for split in ("train", "val"))
        self.columns = ["step", "epoch", "lr", "train_loss", *train_ppl, "val_loss", *val_ppl, "steps_per_s", "event"]

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a killed run got further than its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def line(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def row(self, **fields) -> None:
        if not self.enabled:
            return
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            if new:
                writer.writeheader()
            writer.writerow({k: fields.get(k, "") for k in self.columns})

    def event(self, step: int, text: str) -> None:
        self.line(f"step {step}: {text}")
        self.row(step=step, event=text)


def loss_fields(prefix: str, ce_sum: Tensor, count: Tensor) -> tuple[float, dict[str, float]]:
    """Mean cross-entropy over codebooks and per-codebook perplexities from summed CE / counts [K]."""
    ce = (ce_sum / count.clamp(min=1)).tolist()
    return sum(ce) / len(ce), {f"{prefix}_ppl_{k}": math.exp(min(v, 50.0)) for k, v in enumerate(ce)}


# -----------------------------------------------------------------------------------------------
# the model


def init_weights(lm: TransformerLM) -> None:
    """GPT-2 style: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * layers)."""
    for name, p in lm.named_parameters():
        if p.ndim == 2:
            std = 0.02 / math.sqrt(2 * lm.cfg.num_layers) if name.endswith(("out.weight", "fc2.weight")) else 0.02
            nn.init.normal_(p, 0.0, std)


def chroma_frames(seconds: float, extractor: ChromaExtractor) -> int:
    """Chroma frames the extractor gives for `seconds` of audio (1 + samples // hop, centred frames)."""
    return 1 + int(seconds * extractor.sample_rate) // extractor.hop_length


def build_base(cfg: Config, files: list[AudioFile], path: Path) -> None:
    """Write the run's starting model to `path` (from --model, or from a preset and --codec)."""
    if cfg.model is not None:
        try:
            model = load_model(cfg.model)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
        if cfg.melody and not model.has_melody:
            raise UsageError(f"--melody needs a melody model, and {cfg.model} has no melody conditioning")
        model.batch_like_transformers = False  # trained here: each row at its own positions, as generation then places it
        model.save_pretrained(path)
        return
    try:
        codec = EncodecCodec.from_pretrained(cfg.codec)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load --codec {cfg.codec}: {str(e).splitlines()[0]}") from None
    preset = PRESETS[cfg.preset]
    lm_cfg = LMConfig(
        num_codebooks=codec.num_codebooks, card=codec.cardinality, dim=preset.dim, num_heads=preset.heads,
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


def trainable_state(model: MusicGen) -> dict[str, Tensor]:
    """Everything a checkpoint holds: the model without the codec and without a frozen text encoder."""
    frozen = ("codec.",) + (("text.encoder.",) if model.text.freeze else ())
    return {k: v for k, v in model.state_dict().items() if not k.startswith(frozen)}


def all_finite(tensors: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


class TeacherForcing(nn.Module):
    """The trainable parts of a MusicGen and one teacher-forced pass over a batch of segments:
    -> (summed cross-entropy [K], scored codes [K]) per codebook."""

    def __init__(self, model: MusicGen):
        super().__init__()
        self.lm, self.text, self.chroma = model.lm, model.text, model.chroma
        self.pattern = model.pattern
        self.batch_like_transformers = model.batch_like_transformers

    def forward(self, codes: Tensor, valid: Tensor, texts: list[str], captioned: Tensor, chroma: Tensor | None,
                cfg_dropout: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        cfg = self.lm.cfg
        emb, mask = self.text(texts)  # [B, L, D], [B, L]
        tokens = mask  # each row's own text length, also where its condition is dropped (as at generation)
        feats = None if chroma is None else F.one_hot(chroma, self.chroma.num_chroma).float()  # [B, C, 12]
        if generator is not None:  # training: classifier-free guidance dropout of text and melody together
            emb, mask, feats = drop_conditions(emb, mask, feats, cfg_dropout, generator)
        emb = emb * captioned[:, None, None]  # an uncaptioned row always gets the null text
        mask = mask * captioned[:, None]
        if cfg.conditioning == "cross":
            cond = LMConditions(cross=emb, cross_mask=mask)
        else:  # same layout as MusicGen.conditions: [chroma | text], each row at its own positions
            cond = prefix_conditions(emb, None if self.batch_like_transformers else tokens, None if feats is None else self.chroma(feats))
        seq = self.pattern.build(codes, cfg.special_token)  # [B, K, S]
        real = self.pattern.build(valid[:, None].expand(-1, cfg.num_codebooks, -1).long(), 0).bool()  # [B, K, S]
        logits = self.lm(seq[:, :, :-1], cond)  # [B, K, S-1, card]: step s predicts step s + 1
        scored = real[:, :, 1:]  # a real code (not an empty pattern slot, not past the clip's end)
        targets = seq[:, :, 1:].masked_fill(~scored, -100)
        ce = F.cross_entropy(logits.float().flatten(0, 2), targets.flatten(), ignore_index=-100, reduction="none")
        return ce.view_as(targets).sum(dim=(0, 2)), scored.sum(dim=(0, 2))  # [K], [K]


# -----------------------------------------------------------------------------------------------
# batches


@dataclass
class Batch:
    codes: Tensor  # [B, K, T] long; the special token after a clip's end
    valid: Tensor  # [B, T] bool; False after a clip's end
    captions: list[str | None]
    chroma: Tensor | None  # [B, C] pitch class per chroma frame (melody models)


class Segments:
    """An endless stream of training segments of `frames` token frames. Epoch e cuts every clip into
    max(1, T // frames) segments from a random offset and shuffles them all (both from seed and e),
    so position p is segment p % n of epoch p // n and the order needs no saved state."""

    def __init__(self, clips: list[Clip], frames: int, seed: int):
        self.clips, self.frames, self.seed = clips, frames, seed
        self.counts = [max(1, c.frames // frames) for c in clips]
        self.n = sum(self.counts)
        self._epoch: tuple[int, list[tuple[int, int]]] = (-1, [])

    def epoch(self, e: int) -> list[tuple[int, int]]:
        if self._epoch[0] != e:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            segs = []
            for i, (clip, count) in enumerate(zip(self.clips, self.counts)):
                slack = clip.frames - count * self.frames
                offset = int(torch.randint(slack + 1, (1,), generator=g)) if slack > 0 else 0
                segs += [(i, offset + j * self.frames) for j in range(count)]
            self._epoch = (e, [segs[j] for j in torch.randperm(len(segs), generator=g).tolist()])
        return self._epoch[1]

    def __getitem__(self, position: int) -> tuple[int, int]:
        e, i = divmod(position, self.n)
        return self.epoch(e)[i]


def validation_segments(clips: list[Clip], frames: int, limit: int) -> list[tuple[int, int]]:
    """Non-overlapping segments of every validation clip; at most `limit`, evenly spread."""
    segs = [(i, j * frames) for i, c in enumerate(clips) for j in range(max(1, c.frames // frames))]
    if len(segs) > limit:
        segs = [segs[int(i)] for i in np.linspace(0, len(segs) - 1, limit).round()]
    return segs


def make_batch(clips: list[Clip], segs: list[tuple[int, int]], frames: int, special: int,
               chroma_rate: float | None, chroma_length: int, frame_rate: float) -> Batch:
    k = clips[0].codes.shape[0]
    codes = torch.full((len(segs), k, frames), special, dtype=torch.long)
    valid = torch.zeros(len(segs), frames, dtype=torch.bool)
    for row, (i, start) in enumerate(segs):
        part = clips[i].codes[:, start : start + frames]
        codes[row, :, : part.shape[1]] = part
        valid[row, : part.shape[1]] = True
    chroma = None
    if chroma_rate is not None:
        chroma = torch.stack([chroma_span(clips[i], s, frame_rate, chroma_rate, chroma_length) for i, s in segs]).long()
    return Batch(codes, valid, [clips[i].file.caption for i, _ in segs], chroma)


def augment_caption(caption: str, generator: torch.Generator) -> str:
    """A random non-empty subset of the caption's comma-separated fields, in random order."""
    fields = [f.strip() for f in caption.split(",") if f.strip()]
    if len(fields) < 2:
        return caption
    keep = int(torch.randint(1, len(fields) + 1, (1,), generator=generator))
    return ", ".join(fields[i] for i in torch.randperm(len(fields), generator=generator)[:keep].tolist())


# -----------------------------------------------------------------------------------------------
# checkpoints: torch.save payload + sha256 + magic, written to a temp file, fsynced, renamed


class CorruptCheckpoint(Exception):
    pass


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)


def write_checkpoint(state: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.write(writer.sha.digest() + CHECKSUM_MAGIC)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path) -> dict:
    data = path.read_bytes()
    if len(data) < 40 or data[-8:] != CHECKSUM_MAGIC:
        raise CorruptCheckpoint("truncated (no checksum trailer)")
    payload, digest = data[:-40], data[-40:-8]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpoint("checksum mismatch")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # a checksummed file that still does not load is just as unusable
        raise CorruptCheckpoint(f"unreadable ({type(e).__name__})") from None


def step_checkpoints(folder: Path) -> list[Path]:
    """step-*.pt, newest first."""
    return sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]), reverse=True)


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
        "data": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    generator.set_state(state["data"])


def seed_everything(seed: int, generator: torch.Generator) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    generator.manual_seed(seed + 1)


# -----------------------------------------------------------------------------------------------
# training


class TrainingDiverged(Exception):
    pass


class Trainer:
    """Owns the model, optimizer and the run's position (step, learning-rate scale, best validation)."""

    def __init__(self, cfg: Config, model: MusicGen, train_clips: list[Clip], valid_clips: list[Clip], run: Path,
                 log: RunLog, d: Dist):
        self.cfg, self.model, self.log, self.d = cfg, model, log, d
        self.ckpt_dir = run / "checkpoints"
        self.train_clips, self.valid_clips = train_clips, valid_clips
        lm = model.lm
        self.frames = max(1, round(cfg.segment_seconds * model.frame_rate))
        self.chroma_rate, self.chroma_length = None, 0
        if model.chroma is not None:
            ex = model.chroma.extractor
            self.chroma_rate = ex.sample_rate / ex.hop_length
            self.chroma_length = chroma_frames(self.frames / model.frame_rate, ex)
        self.segments = Segments(train_clips, self.frames, cfg.seed)
        self.valid_segments = validation_segments(valid_clips, self.frames, cfg.eval_batches * cfg.batch_size)
        self.rows = cfg.batch_size // d.world  # segments per process per step

        self.max_steps = cfg.max_steps or math.ceil((cfg.epochs or 10.0) * self.segments.n / cfg.batch_size)
        self.lr = cfg.lr or (1e-4 if cfg.model else 5e-4)
        self.warmup = min(500, self.max_steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps

        self.net = TeacherForcing(model).to(d.device)
        self.ddp = self.net
        if d.world > 1:
            ids = [d.device.index] if d.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.net, device_ids=ids)
        params = [p for p in self.net.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},  # matrices only
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.params = params
        self.opt = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.95), fused=d.device.type == "cuda")
        self.amp = autocast_dtype(cfg.precision, d.device)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.amp == torch.float16)
        self.generator = torch.Generator()  # caption augmentation and CFG dropout of this process
        self.step, self.lr_scale, self.best_val = 0, 1.0, None
        self.bad_streak = 0
        self.num_codebooks = lm.cfg.num_codebooks

    # -- position and checkpoints ------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warmup to --lr, then a cosine down to MIN_LR_RATIO * --lr at max_steps; times lr_scale."""
        if step < self.warmup:
            lr = self.lr * (step + 1) / self.warmup
        else:
            progress = min(1.0, (step - self.warmup) / max(1, self.max_steps - self.warmup))
            lr = self.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))
        return lr * self.lr_scale

    def state_dict(self) -> dict:
        """Collective: every process contributes its RNG states; only the main process's dict is complete."""
        return {
            "step": self.step,
            "lr_scale": self.lr_scale,
            "best_val": self.best_val,
            "model": trainable_state(self.model),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self.d.gather(rng_state(self.generator, self.d.device)),
        }

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or any(not k.startswith(("codec.", "text.encoder.")) for k in missing):
            raise CorruptCheckpoint("its weights do not fit this model")
        self.opt.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the checkpoint was written without fp16 loss scaling
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.lr_scale, self.best_val = state["step"], state["lr_scale"], state["best_val"]
        if len(state["rng"]) == self.d.world:
            set_rng_state(state["rng"][self.d.rank], self.generator, self.d.device)
        else:
            seed_everything(self.cfg.seed + self.d.rank + 7919 * self.step, self.generator)
            self.log.line(f"the checkpoint was written by {len(state['rng'])} processes, this run has {self.d.world}: "
                          "random states re-seeded")

    def restore_latest(self) -> Path | None:
        """Load the newest readable checkpoint; None when there is none."""
        for path in step_checkpoints(self.ckpt_dir):
            try:
                self.load_state_dict(read_checkpoint(path))
                return path
            except CorruptCheckpoint as e:
                self.log.line(f"checkpoint {path.name} is corrupt ({e}); trying the previous one")
        return None

    def save(self) -> bool:
        """Write step-N.pt (and best.pt when this step set the best validation loss); refuses to write
        non-finite weights and returns False then."""
        state = self.state_dict()
        if not all_finite(state["model"]):
            return False
        if self.d.main:
            path = self.ckpt_dir / f"step-{self.step:08d}.pt"
            write_checkpoint(state, path)
            for old in step_checkpoints(self.ckpt_dir)[self.cfg.keep :]:
                old.unlink()
        self.d.barrier()
        return True

    def save_best(self) -> None:
        if self.d.main:
            latest = self.ckpt_dir / f"step-{self.step:08d}.pt"
            tmp = self.ckpt_dir / ".best.pt.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(latest, tmp)  # same bytes as the step checkpoint just written
            except OSError:
                shutil.copyfile(latest, tmp)
            os.replace(tmp, self.ckpt_dir / "best.pt")

    def rollback(self, why: str) -> None:
        scale = self.lr_scale / 2
        if scale < MIN_LR_SCALE:
            raise TrainingDiverged(f"{why}, and the learning rate was already halved {round(-math.log2(MIN_LR_SCALE))} "
                                   "times; giving up (the checkpoints in the run folder hold the last finite weights)")
        bad_step = self.step
        if self.restore_latest() is None:
            raise TrainingDiverged(f"{why}, and there is no checkpoint to roll back to")
        self.lr_scale, self.bad_streak = scale, 0
        self.log.event(bad_step, f"{why}: rolled back to step {self.step}, learning rate x{scale:g} "
                                 f"(peak {self.lr * scale:.3g})")

    # -- one step ------------------------------------------------------------------------------
    def batch(self, segs: list[tuple[int, int]], clips: list[Clip]) -> Batch:
        special = self.model.lm.cfg.special_token
        return make_batch(clips, segs, self.frames, special, self.chroma_rate, self.chroma_length, self.model.frame_rate)

    def losses(self, batch: Batch, train: bool) -> tuple[Tensor, Tensor]:
        dev = self.d.device
        captions = batch.captions
        if train and self.cfg.caption_augment:
            captions = [None if c is None else augment_caption(c, self.generator) for c in captions]
        texts = [c or NO_CAPTION for c in captions]
        captioned = torch.tensor([c is not None for c in captions], device=dev)
        chroma = None if batch.chroma is None else batch.chroma.to(dev)
        with torch.autocast(dev.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            module = self.ddp if train else self.net
            return module(batch.codes.to(dev), batch.valid.to(dev), texts, captioned, chroma,
                          self.cfg.cfg_dropout, self.generator if train else None)

    def train_step(self) -> tuple[str, Tensor]:
        """One optimizer step on batch `self.step` -> (status, global CE sums and counts [2K]). Status "ok";
        "bad": a non-finite loss or gradient, no update; "overflow": fp16 gradients overflowed, the grad
        scaler skipped the update and lowered its scale (routine, not counted as bad)."""
        start = self.step * self.cfg.batch_size + self.d.rank * self.rows
        batch = self.batch([self.segments[p] for p in range(start, start + self.rows)], self.train_clips)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        ce_sum, count = self.losses(batch, train=True)
        loss = (ce_sum / count.clamp(min=1)).mean()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        flags = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm)]).float()
        stats = self.d.all_sum(torch.cat([ce_sum.detach().float(), count.float(), flags]))
        k = self.num_codebooks
        loss_bad, grad_bad = bool(stats[2 * k] > 0), bool(stats[2 * k + 1] > 0)
        status = "bad" if loss_bad or (grad_bad and not self.scaler.is_enabled()) else "overflow" if grad_bad else "ok"
        if status == "ok":
            self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return status, stats[: 2 * k].cpu()

    @torch.no_grad()
    def evaluate(self) -> tuple[Tensor, Tensor]:
        self.net.eval()
        mine = self.valid_segments[self.d.rank :: self.d.world]
        sums = torch.zeros(2 * self.num_codebooks, device=self.d.device)
        for i in range(0, len(mine), self.rows):
            ce_sum, count = self.losses(self.batch(mine[i : i + self.rows], self.valid_clips), train=False)
            sums += torch.cat([ce_sum.float(), count.float()])
        self.net.train()
        self.d.all_sum(sums)
        return sums[: self.num_codebooks], sums[self.num_codebooks :]

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg, log = self.cfg, self.log
        self.net.train()
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.d.main and sys.stderr.isatty()))
        acc = torch.zeros(2 * self.num_codebooks)
        acc_steps, tick = 0, time.perf_counter()
        while self.step < self.max_steps:
            step_lr = self.lr_at(self.step)
            status, stats = self.train_step()
            if status == "bad":
                self.bad_streak += 1
                log.event(self.step, f"non-finite loss or gradient: step skipped ({self.bad_streak} in a row)")
                if self.bad_streak >= MAX_BAD_STEPS:
                    self.rollback(f"{MAX_BAD_STEPS} non-finite steps in a row")
                    bar.n = self.step
                    bar.refresh()
                    acc.zero_()
                    acc_steps, tick = 0, time.perf_counter()
                    continue
            elif status == "ok":
                self.bad_streak = 0
                acc += stats
                acc_steps += 1
            bar.update(1)
            fields: dict = {}
            if acc_steps and (self.step % cfg.log_every == 0 or self.step == self.max_steps):
                rate = acc_steps / (time.perf_counter() - tick)
                loss, ppl = loss_fields("train", acc[: self.num_codebooks], acc[self.num_codebooks :])
                fields.update(train_loss=loss, lr=step_lr, steps_per_s=round(rate, 3), **ppl)
                log.line(f"step {self.step}/{self.max_steps} | loss {loss:.4f} | ppl "
                         + " ".join(f"{v:.1f}" for v in ppl.values()) + f" | lr {step_lr:.2e} | {rate:.2f} steps/s")
                bar.set_postfix(loss=f"{loss:.3f}")
                acc.zero_()
                acc_steps, tick = 0, time.perf_counter()
            new_best = False
            if self.valid_segments and (self.step % cfg.eval_every == 0 or self.step == self.max_steps):
                val, ppl = loss_fields("val", *self.evaluate())
                new_best = math.isfinite(val) and (self.best_val is None or val < self.best_val)
                self.best_val = val if new_best else self.best_val
                fields.update(val_loss=val, **ppl)
                log.line(f"step {self.step} | val loss {val:.4f} | ppl " + " ".join(f"{v:.1f}" for v in ppl.values())
                         + (" | best" if new_best else ""))
                tick = time.perf_counter()
            if fields:
                log.row(step=self.step, epoch=round(self.step * cfg.batch_size / self.segments.n, 4), **fields)
            if self.step % cfg.save_every == 0 or self.step == self.max_steps or new_best:
                if not self.save():
                    self.rollback("non-finite weights (not saved)")
                    bar.n = self.step
                    bar.refresh()
                    continue
                if new_best:
                    self.save_best()
        bar.close()


# -----------------------------------------------------------------------------------------------
# the run


def publish(model: MusicGen, run: Path) -> None:
    """Write the model into the run folder itself (config.json, model.safetensors, codec/,
    text_encoder/) beside checkpoints/ and log.csv: staged in full, then each entry renamed into place,
    config.json last."""
    staged = run / ".final"
    model.save_pretrained(staged)
    trash = Path(tempfile.mkdtemp(prefix=".old-", dir=run))
    names = sorted(p.name for p in staged.iterdir())
    for name in [n for n in names if n != "config.json"] + ["config.json"]:
        if (run / name).exists():
            os.replace(run / name, trash / name)
        os.replace(staged / name, run / name)
    shutil.rmtree(trash)
    staged.rmdir()


def remove_leftovers(run: Path) -> None:
    """Temporary files and folders of writes that a killed run left half done."""
    for path in [*(run / "checkpoints").glob(".*"), *run.glob(".old-*"), *run.glob("..final.*"), run / ".final"]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def weights_digest(model: MusicGen) -> str:
    h = hashlib.sha256()
    for name, t in sorted(trainable_state(model).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_architecture(cfg: Config, run: Path) -> None:
    """A rerun must describe the same model as the run it resumes."""
    record = run / "checkpoints" / "base" / "train_args.json"
    wanted = {k: getattr(cfg, k) for k in ARCHITECTURE_KEYS}
    for k in ("model", "codec", "text_encoder"):
        wanted[k] = None if wanted[k] is None else str(Path(wanted[k]).expanduser().resolve())
    if not record.is_file():
        record.write_text(json.dumps(wanted, indent=2))
        return
    before = json.loads(record.read_text())
    for k, v in wanted.items():
        if before.get(k) != v:
            flag = "--" + k.replace("_", "-")
            raise UsageError(f"{run} was started with {flag} {before.get(k)}, not {v}; "
                             "repeat the original options to resume, or choose a new --out")


def train(cfg: Config) -> int:
    d = setup_processes(cfg)
    run = Path(cfg.out).expanduser().resolve()
    nearest = next(p for p in (run, *run.parents) if p.exists())
    if not nearest.is_dir():
        raise UsageError(f"--out {run}: {nearest} exists and is not a folder")
    ckpt_dir, base = run / "checkpoints", run / "checkpoints" / "base"
    try:
        files = scan(cfg.data, cfg.valid_fraction)
    except DataError as e:
        raise UsageError(str(e)) from None

    # 1. the model this run trains (written once, by the main process)
    error, lock = None, RunLock(run, PROG)
    if d.main:
        fresh = not run.exists()
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()  # one trainer per run folder: the main process holds it for every process
        except RunInUse as e:
            error = str(e)
        else:
            remove_leftovers(run)
            try:
                if not (base / "config.json").is_file():
                    build_base(cfg, files, base)
                check_architecture(cfg, run)
            except UsageError as e:
                error = str(e)
                if fresh:  # a run that never started leaves nothing behind
                    lock.release()
                    shutil.rmtree(run, ignore_errors=True)
    for error in d.gather(error):  # every process stops on the main process's usage error
        if error:
            raise UsageError(error)
    model = MusicGen.from_pretrained(base).to(d.device)
    model.codec.requires_grad_(False)
    model.text.freeze = not cfg.train_text_encoder
    model.text.encoder.requires_grad_(not model.text.freeze)
    log = RunLog(run / "log.csv", model.lm.cfg.num_codebooks, d.main)
    if lock.previous:
        log.line(f"taking over the lock of a run that ended without releasing it ({lock.previous})")

    # 2. tokens (and chroma) of every file, encoded once
    cache = TokenCache(Path(cfg.cache_dir) if cfg.cache_dir else run / "cache", model.codec, cfg.chunk_seconds,
                       model.chroma.extractor if model.chroma is not None else None)
    used = [f for f in files if f.split != "test"]
    encoded = d.all_sum(torch.tensor([cache.build(used, d.rank, d.world, cfg.num_workers)], device=d.device))
    d.barrier()
    clips, skipped = cache.load(used)
    for file, why in skipped:
        log.line(f"warning: skipping {file.rel}: {why}")
    train_clips = [c for c in clips if c.file.split == "train"]
    valid_clips = [c for c in clips if c.file.split == "valid"]

    def share(split_clips: list[Clip], split: str) -> str:
        minutes = sum(c.frames for c in split_clips) / model.frame_rate / 60
        return f"{len({c.file.rel for c in split_clips})} {split} ({minutes:.1f} min)"

    log.line(f"data: {len(files)} audio files: {share(train_clips, 'train')}, {share(valid_clips, 'valid')}, "
             f"{sum(f.split == 'test' for f in files)} test (unused), {len(skipped)} skipped (unreadable); "
             f"tokens: {int(encoded)} files encoded, {len(used) - int(encoded)} from the cache")
    if not train_clips:
        raise UsageError(f"no readable training audio in {cfg.data}")
    if not valid_clips:
        log.line("no validation files: validation loss and best.pt are skipped")

    # 3. resume, or start at step 0
    trainer = Trainer(cfg, model, train_clips, valid_clips, run, log, d)
    resumed = trainer.restore_latest()
    if resumed is not None:
        log.truncate_after(trainer.step)
        log.line(f"resuming from step {trainer.step} ({resumed.name})")
        log.row(step=trainer.step, event=f"resuming from step {trainer.step}")
    else:
        seed_everything(cfg.seed + d.rank, trainer.generator)
        trainer.save()
    log.line(f"model: {sum(p.numel() for p in model.lm.parameters()) / 1e6:.2f}M LM parameters, "
             f"{'melody + text' if model.has_melody else 'text'} conditioning; {trainer.max_steps} steps of "
             f"{cfg.batch_size} x {cfg.segment_seconds:g} s on {d.world} x {d.device}")

    # 4. train, then put the final model into the run folder
    trainer.fit()
    digests = d.gather(weights_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError("the processes ended with different weights")
    if d.main:
        publish(model, run)
        agree = f"; all {d.world} processes hold identical weights (sha256 {digests[0][:12]})" if d.world > 1 else ""
        log.line(f"done at step {trainer.step}: model written to {run}{agree}")
    d.barrier()
    lock.release()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return train(parse_args(argv))
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume from the latest checkpoint", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
