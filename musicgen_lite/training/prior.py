"""Train a melody prior (musicgen_lite/melody_prior.py) for a melody model, on a folder's melody tracks.

    python train.py prior --model MODEL --data DIR --out RUN [--time-limit MIN] [options]

Top to bottom:
  1. scan DIR; every captioned file with a melody track (metadata "melody") is an example. Each track
     becomes its pitch class per chroma frame, through the model's own extractor and argmax
     bottleneck (what the LM hears of a hum), once: RUN/melody_lines.pt keeps them
  2. resume from the newest readable RUN/checkpoints/step-*.pt (or start a new prior at step 0)
  3. each step: B windows of the melody conditioner's length from random offsets, their captions
     augmented (a random subset of the fields, in random order) and dropped for guidance with
     --condition-dropout; loss = next-pitch cross-entropy + --key-weight x key loss; AdamW, warm-up
     and cosine decay over --max-steps, gradients clipped at 1.0
  4. validation losses every --eval-every steps into RUN/log.csv; checkpoints (atomic, checksummed)
  5. MODEL with its new prior is written into RUN: load_model(RUN) generates with it

A rerun of the same command resumes; --time-limit stops early (the model is written all the same).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from codebooks.audio import READ_ERRORS, save_torch
from conditioning.chroma import ChromaExtractor

from ..audio_data import AudioFile, DataError, one_line, scan, track_pitch_classes
from ..checkpoints import load_model
from ..cli_errors import UsageError
from ..melody_prior import MelodyPrior, PriorConfig
from ..model import MusicGen
from ..run_lock import RunInUse, RunLock
from .checkpoints import CorruptCheckpoint, restore_latest, rng_state, save_step, seed_everything, set_rng_state
from .lm_batches import augment_caption
from .lm_model import publish, remove_leftovers
from .log import RunLog
from .run import run_training

PROG = "train.py prior"
TRACK_SECONDS = 600.0  # a melody track is read in chunks of this length (the token cache's default)
COLUMNS = ["step", "seconds", "lr", "train_ce", "train_key", "valid_ce", "valid_key", "event"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the melody model the prior is for (a musicgen_lite model directory)")
    p.add_argument("--data", required=True, type=Path, help="folder of audio with metadata.jsonl naming captions and melody tracks")
    p.add_argument("--out", required=True, type=Path, help="run folder: checkpoints, log.csv, and the model with its prior")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--time-limit", type=float, metavar="MIN", help="stop after MIN minutes of this process (and write the model)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--key-weight", type=float, default=1.0, help="weight of the key loss (default 1)")
    p.add_argument("--plain-tempo-words", action="store_true", help="caption augmentation also says tempo words in "
                   "plain English, as train.py lm --plain-tempo-words does (default off; see the model card)")
    p.add_argument("--condition-dropout", type=float, default=0.15, help="share of rows trained on the null caption")
    p.add_argument("--dim", type=int, default=PriorConfig.dim)
    p.add_argument("--layers", type=int, default=PriorConfig.num_layers)
    p.add_argument("--frames-per-token", type=int, default=1, help="chroma frames a token holds (default 1; 2 halves "
                   "the decoding steps, 12^2 token ids: faster, and a little less faithful, see the model card)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--valid-rows", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("max_steps", "batch_size", "eval_every", "valid_rows", "dim", "layers", "frames_per_token"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.dim % PriorConfig.num_heads:
        raise UsageError(f"--dim must be a multiple of {PriorConfig.num_heads}, got {args.dim}")
    if not args.lr > 0 or args.warmup_steps < 0 or args.key_weight < 0:
        raise UsageError("--lr must be positive, --warmup-steps and --key-weight not negative")
    if not 0 <= args.condition_dropout < 1:
        raise UsageError(f"--condition-dropout must be in [0, 1), got {args.condition_dropout}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise UsageError(f"--time-limit must be positive, got {args.time_limit}")


def melody_lines(files: list[AudioFile], model: MusicGen, store: Path, say) -> dict[str, torch.Tensor]:
    """Pitch class per chroma frame [frames] of every readable file's melody track, by relative path
    (`audio_data.track_pitch_classes`, the token cache's reading of a track); computed once per track
    version and kept in `store`. An unreadable track is skipped with a warning."""
    saved = torch.load(store, weights_only=True) if store.is_file() else {}
    ex = model.chroma.extractor
    extractor = ChromaExtractor(ex.sample_rate, ex.n_fft, ex.hop_length, ex.num_chroma, chunk_length=TRACK_SECONDS + 1.0)
    settings = f"{ex.sample_rate}|{ex.n_fft}|{ex.hop_length}"
    lines, computed = {}, 0
    for file in tqdm(files, desc="melody tracks", unit="file", dynamic_ncols=True, mininterval=2.0):
        st = file.melody.stat()
        stamp = f"{settings}|{file.melody}|{st.st_size}|{st.st_mtime_ns}"
        entry = saved.get(file.rel)
        if entry is None or entry["stamp"] != stamp:
            try:
                line = torch.cat(track_pitch_classes(file.melody, extractor, TRACK_SECONDS))
            except READ_ERRORS as e:
                say(f"warning: skipping {file.rel}: melody track: {one_line(e)}")
                continue
            entry = {"stamp": stamp, "line": line}
            computed += 1
        lines[file.rel] = entry
    if computed:
        save_torch(lines, store)
    say(f"melody tracks: {len(lines)} ({computed} read now, {len(lines) - computed} from {store.name})")
    return {rel: entry["line"].long() for rel, entry in lines.items()}


def model_key(model: str) -> str:
    """How a run's checkpoints name the model their prior is for: its absolute path (or the hub id)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def window(line: torch.Tensor, length: int, start: int) -> torch.Tensor:
    """`length` frames of a line from `start`, tiled when the line is shorter (as a short melody is looped)."""
    if line.shape[0] < length:
        line = line.repeat(math.ceil(length / line.shape[0]))
    return line[start : start + length]


class PriorTrainer:
    def __init__(self, args: argparse.Namespace, prior: MelodyPrior, train: list[tuple[str, torch.Tensor]],
                 valid: list[tuple[str, torch.Tensor]], log: RunLog):
        self.args, self.prior, self.train, self.log = args, prior, train, log
        self.length = prior.cfg.chroma_length
        self.generator = torch.Generator()
        self.opt = torch.optim.AdamW(prior.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
        self.step = 0
        rows = valid[: args.valid_rows]
        self.valid = ([caption for caption, _ in rows], torch.stack([window(line, self.length, 0) for _, line in rows])) if rows else None

    def lr_at(self, step: int) -> float:
        a = self.args
        if step < a.warmup_steps:
            return a.lr * (step + 1) / a.warmup_steps
        done = (step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))

    def state_dict(self) -> dict:
        return {"step": self.step, "prior": self.prior.state_dict(), "optimizer": self.opt.state_dict(),
                "rng": rng_state(self.generator, torch.device("cpu")), "model": model_key(self.args.model)}

    def load_state_dict(self, state: dict) -> None:
        if state["model"] != model_key(self.args.model):
            raise UsageError(f"{self.args.out} trains a prior for {state['model']}, not {self.args.model}; use another --out")
        try:
            self.prior.load_state_dict(state["prior"])
        except RuntimeError:
            raise CorruptCheckpoint("its weights do not fit this prior (another --dim or --layers?)") from None
        self.opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], self.generator, torch.device("cpu"))
        self.step = state["step"]

    def batch(self) -> tuple[list[str | None], torch.Tensor]:
        g, texts, lines = self.generator, [], []
        for i in torch.randint(len(self.train), (self.args.batch_size,), generator=g).tolist():
            caption, line = self.train[i]
            start = int(torch.randint(max(1, line.shape[0] - self.length + 1), (1,), generator=g))
            lines.append(window(line, self.length, start))
            texts.append(augment_caption(caption, g, self.args.plain_tempo_words))
        dropped = (torch.rand(len(texts), generator=g) < self.args.condition_dropout).tolist()
        return [None if drop else text for drop, text in zip(dropped, texts)], torch.stack(lines)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.prior.eval()
        ce, key = self.prior.loss(self.valid[1], self.valid[0])
        self.prior.train()
        return ce.item(), key.item()

    def fit(self, started: float) -> None:
        a = self.args
        ckpt_dir = a.out / "checkpoints"
        self.prior.train()
        while self.step < a.max_steps:
            if a.time_limit is not None and time.perf_counter() - started > 60 * a.time_limit:
                self.log.line(f"time limit reached at step {self.step}")
                break
            lr = self.lr_at(self.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            texts, pitches = self.batch()
            ce, key = self.prior.loss(pitches, texts)
            loss = ce + a.key_weight * key
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.prior.parameters(), 1.0)
            if torch.isfinite(loss):
                self.opt.step()
            self.step += 1
            if self.step % a.eval_every == 0 or self.step == a.max_steps:
                valid = self.evaluate() if self.valid else (None, None)
                self.log.row(step=self.step, seconds=round(time.perf_counter() - started, 1), lr=lr,
                             train_ce=ce.item(), train_key=key.item(), valid_ce=valid[0], valid_key=valid[1])
                shown = "" if valid[0] is None else f" | valid ce {valid[0]:.4f}, key {valid[1]:.4f}"
                self.log.line(f"step {self.step} | ce {ce.item():.4f}, key {key.item():.4f}{shown}")
                save_step(self.state_dict(), ckpt_dir, self.step, keep=2)
        self.prior.eval()


def train(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        model = load_model(args.model)
        files = scan(args.data)
    except (ValueError, FileNotFoundError, DataError) as e:
        raise UsageError(str(e)) from None
    if not model.has_melody:
        raise UsageError(f"{args.model} has no melody conditioning: a melody prior is for melody models")
    examples = [f for f in files if f.melody is not None and f.caption and f.split != "test"]
    if not any(f.split == "train" for f in examples):
        raise UsageError(f"no captioned training files with a melody track in {args.data} (metadata \"melody\")")
    (args.out / "checkpoints").mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(args.out, PROG).acquire()
    except RunInUse as e:
        raise UsageError(str(e)) from None
    remove_leftovers(args.out)
    log = RunLog(args.out / "log.csv", COLUMNS)
    lines = melody_lines(examples, model, args.out / "melody_lines.pt", log.line)
    train_rows = [(f.caption, lines[f.rel]) for f in examples if f.split == "train" and f.rel in lines]
    valid_rows = [(f.caption, lines[f.rel]) for f in examples if f.split == "valid" and f.rel in lines]
    if not train_rows:
        raise UsageError(f"no readable melody track among the training files of {args.data}")
    cfg = PriorConfig(dim=args.dim, num_layers=args.layers, chroma_length=model.chroma.chroma_length,
                      frames_per_token=args.frames_per_token)
    prior = MelodyPrior.untrained(cfg, model.text.tokenizer, seed=args.seed)
    trainer = PriorTrainer(args, prior, train_rows, valid_rows, log)
    resumed = restore_latest(args.out / "checkpoints", trainer.load_state_dict, log.line)
    if resumed is None:
        seed_everything(args.seed, trainer.generator)
        log.start(0)
    else:
        log.start(trainer.step)
        log.line(f"resuming from step {trainer.step} ({resumed.name})")
    log.line(f"prior: {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M parameters; {len(train_rows)} training "
             f"and {len(valid_rows)} validation tracks; {args.max_steps} steps of {args.batch_size} x {cfg.chroma_length} frames")
    trainer.fit(time.perf_counter())
    log.close()
    model.melody_prior = prior
    publish(model, args.out)
    log.line(f"done at step {trainer.step}: {args.model} with its melody prior written to {args.out}")
    lock.release()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_training(PROG, lambda: train(args))
