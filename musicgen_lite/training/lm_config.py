"""The LM trainer's options: presets, the run's Config, the command line and the architecture a rerun must repeat."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ..cli_errors import ArgumentParser, UsageError
from .log import require_tensorboard
from .run import check_all, flag

PROG = "train.py lm"



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
    "medium-cpu": Preset(256, 6, 4, 1024, 192, 3, 4, 768),  # the default model v2: >= 10x real time on 2 cores
    "base": Preset(512, 8, 8, 2048, 256, 4, 4, 1024),
    "big": Preset(768, 12, 12, 3072, 512, 6, 8, 2048),
    "musicgen-small": Preset(1024, 24, 16, 4096, 768, 12, 12, 3072),  # t5-base for the text
}
DEFAULT_PRESET = "small-cpu"
TOKENIZER_VOCAB = 2048  # upper bound; sentencepiece stops at what the captions support
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
    time_limit: float | None = None  # minutes of training for this invocation; max_steps is lowered to fit
    epochs: float | None = None
    batch_size: int = 8
    lr: float | None = None  # None: 1e-4 when fine-tuning, 5e-4 from scratch
    warmup_steps: int | None = None  # None: a tenth of the run, at most 500
    weight_decay: float = 0.1
    segment_seconds: float = 10.0
    condition_dropout: float = 0.1
    melody_track_prob: float = 0.75  # rows conditioned on the hummed melody track where a file has one
    melody_dropout: float = 0.5  # of the rows that keep their text, those whose melody is dropped (audiocraft's 0.5)
    caption_augment: bool = True
    plain_tempo_words: bool = False  # caption augmentation also says tempo words in plain English
    opening_seconds: float = 2.0  # a segment's opening, where only the conditions tell the pitches
    opening_weight: float = 1.0  # weight of the opening's codes in the loss (1: every code alike)
    pitch_loss: float = 0.0  # weight of the auxiliary pitch-class loss over the opening (melody models)
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
    tensorboard: bool = False
    tensorboard_samples: int = 2


def build_parser() -> argparse.ArgumentParser:
    c = Config
    p = ArgumentParser(
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
    g.add_argument("--codec", help="trained codec directory (transformers EncodecModel format); required from scratch. "
                   "With --model: move that model onto this codec (its code embeddings and heads start from code "
                   "co-occurrence on the training audio) and fine-tune it there")
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
    g.add_argument("--time-limit", type=float, metavar="MIN",
                   help="train for about MIN minutes: after the first steps are timed, --max-steps is lowered to "
                        "what fits, so the learning-rate schedule still ends where it should")
    g.add_argument("--epochs", type=float, help="passes over the training segments (default 10 without --max-steps)")
    g.add_argument("--batch-size", type=int, default=c.batch_size, help=f"segments per step, over all processes "
                   f"(default {c.batch_size})")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 fine-tuning, 5e-4 from scratch)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup (default a tenth of the run, at most 500)")
    g.add_argument("--weight-decay", type=float, default=c.weight_decay, help="AdamW decay of weight matrices")
    g.add_argument("--segment-seconds", type=float, default=c.segment_seconds, help=f"length of a training "
                   f"segment (default {c.segment_seconds:g})")
    g.add_argument("--melody-track-prob", type=float, default=c.melody_track_prob,
                   help="with --melody: share of rows conditioned on the chroma of a file's hummed melody track "
                        "(metadata \"melody\"), the rest on the chroma of the mix itself "
                        f"(default {c.melody_track_prob:g})")
    g.add_argument("--melody-dropout", type=float, default=c.melody_dropout,
                   help="with --melody: probability of dropping a row's melody alone, so the model also learns text "
                        f"without a melody and has to read key and tempo words (default {c.melody_dropout:g})")
    g.add_argument("--cfg-dropout", dest="condition_dropout", type=float, default=c.condition_dropout, help="probability of replacing a row's "
                   f"text and melody by the null condition (default {c.condition_dropout:g})")
    g.add_argument("--caption-augment", action=argparse.BooleanOptionalAction, default=c.caption_augment,
                   help="train on random subsets and orders of a caption's comma-separated fields (default on)")
    g.add_argument("--plain-tempo-words", action="store_true",
                   help="caption augmentation also says the data builder's tempo words in plain English in half the "
                   "captions that name one: allegro as fast, quick or lively (with --caption-augment; default off; see the model card)")
    g.add_argument("--opening-seconds", type=float, default=c.opening_seconds,
                   help="length of a segment's opening, where only the text and melody tell which pitches come "
                        f"(default {c.opening_seconds:g})")
    g.add_argument("--opening-weight", type=float, default=c.opening_weight,
                   help="weight of the opening's codes in the loss, so the key a caption names pays there "
                        f"(default {c.opening_weight:g}: every code alike; the logged losses stay unweighted)")
    g.add_argument("--pitch-loss", type=float, default=c.pitch_loss, metavar="WEIGHT",
                   help="with --melody: add an auxiliary loss in which the LM's states over the opening predict the "
                        "segment's pitch-class distribution (the histogram of its chromagram), through a head used "
                        f"in training only (default {c.pitch_loss:g}: off)")
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
    g.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard: losses, perplexities, "
                   "learning rate and generated samples at each validation (needs the [tensorboard] extra)")
    g.add_argument("--tensorboard-samples", type=int, default=c.tensorboard_samples, help="samples generated from "
                   f"validation captions at each validation with --tensorboard (default {c.tensorboard_samples})")
    return p


def parse_args(argv: list[str] | None) -> Config:
    cfg = Config(**vars(build_parser().parse_args(argv)))
    positive = {"--batch-size": cfg.batch_size, "--save-every": cfg.save_every, "--eval-every": cfg.eval_every,
                "--eval-batches": cfg.eval_batches, "--log-every": cfg.log_every, "--keep": cfg.keep,
                "--segment-seconds": cfg.segment_seconds, "--chunk-seconds": cfg.chunk_seconds}
    check_all(positive | {"--max-steps": cfg.max_steps, "--epochs": cfg.epochs, "--lr": cfg.lr,
                          "--time-limit": cfg.time_limit},
              lambda v: v > 0, "must be > 0")
    if not all(0 <= v <= 1 for v in (cfg.condition_dropout, cfg.melody_track_prob, cfg.melody_dropout)) \
            or not 0 <= cfg.valid_fraction < 1:
        raise UsageError("--cfg-dropout, --melody-dropout and --melody-track-prob must be in [0, 1] "
                         "and --valid-fraction in [0, 1)")
    if cfg.opening_seconds < 0 or cfg.opening_weight <= 0 or cfg.pitch_loss < 0:
        raise UsageError("--opening-seconds and --pitch-loss must be >= 0 and --opening-weight > 0")
    if cfg.pitch_loss > 0 and not cfg.melody:
        raise UsageError("--pitch-loss needs --melody: its targets are the chromagrams a melody run caches")
    if cfg.num_workers < 0 or (cfg.warmup_steps is not None and cfg.warmup_steps < 0) or cfg.weight_decay < 0:
        raise UsageError("--num-workers, --warmup-steps and --weight-decay must be >= 0")
    if cfg.model is not None:
        for flag, value in {"--preset": cfg.preset, "--text-encoder": cfg.text_encoder}.items():
            if value is not None:
                raise UsageError(f"{flag} applies to training from scratch; --model brings its own")
    elif cfg.codec is None:
        raise UsageError("training from scratch needs --codec CODEC_DIR (or fine-tune with --model)")
    else:
        cfg.preset = cfg.preset or DEFAULT_PRESET
    if cfg.tensorboard_samples < 0:
        raise UsageError(f"--tensorboard-samples must be >= 0, got {cfg.tensorboard_samples}")
    if cfg.tensorboard:
        require_tensorboard()
    if cfg.train_text_encoder is None:
        cfg.train_text_encoder = cfg.model is None and cfg.text_encoder is None
    return cfg


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
            raise UsageError(f"{run} was started with {flag(k)} {before.get(k)}, not {v}; "
                             "repeat the original options to resume, or choose a new --out")


