"""Train or fine-tune the MusicGen language model on a folder of audio.

    python train.py lm --data DIR --out RUN --codec CODEC_DIR --preset small-cpu   # from scratch
    python train.py lm --data DIR --out RUN --model path/to/musicgen-small         # fine-tune
    python train.py lm --data DIR --out RUN --model MODEL --codec CODEC_DIR         # move onto another codec
    torchrun --nproc_per_node=4 train.py lm --data DIR --out RUN ...               # data parallel

Top to bottom:
  1. scan DIR (captions, train/valid/test by file) and encode every file once with the codec
     into a token cache (musicgen_lite.audio_data), so that epochs read tokens, not audio
  2. RUN/checkpoints/base: the model every checkpoint of the run applies to (architecture, codec,
     tokenizer), written on the first run from --model (moved onto --codec if given: retarget.py),
     or from --preset + --codec + a T5
  3. resume from the newest readable RUN/checkpoints/step-*.pt (or start at step 0)
  4. each step: B segments of codes [B, K, T] -> the model's pattern [B, K, S]; the LM reads steps
     [:-1] and is scored on steps [1:] with one cross-entropy per codebook, only where a slot holds
     a real code; text (and melody) conditions are dropped for classifier-free guidance; AdamW,
     warmup + cosine, gradients clipped at 1.0
  5. a non-finite loss or gradient skips the step; three in a row roll back to the last checkpoint
     and halve the learning rate
  6. validation, checkpoints (atomic, checksummed; the last --keep and best.pt), RUN/log.csv and, with
     --tensorboard, RUN/tensorboard (scalars, and samples generated from validation captions)
  7. the final model is written into RUN: musicgen_lite.load_model(RUN) loads it

Options live in lm_config, batches in lm_batches, the model and its loss in lm_model; checkpoints,
logs and processes are shared with the codec trainer.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from conditioning.null import NO_CAPTION

from ..audio_data import Clip, DataError, TokenCache, scan
from ..cli_errors import UsageError
from ..model import MusicGen
from ..run_lock import RunInUse, RunLock
from ..sampling import SamplingParams
from .checkpoints import (
    CorruptCheckpoint,
    all_finite,
    link_best,
    restore_latest,
    rng_state,
    save_step,
    seed_everything,
    set_rng_state,
)
from .lm_batches import Batch, Segments, augment_caption, chroma_frames, make_batch, validation_segments
from .lm_config import PROG, Config, check_architecture, parse_args
from .lm_model import TeacherForcing, build_base, publish, remove_leftovers, trainable_state, weights_digest
from .log import RunLog
from .processes import Dist, autocast_dtype, setup_processes
from .run import TrainingDiverged, run_training

TIMING_STEPS = 20  # --time-limit times this many steps after skipping as many (start-up, caches)
TIME_LIMIT_MARGIN = 0.92  # share of the remaining time planned for steps: validation and saving take the rest
MAX_BAD_STEPS = 3  # non-finite steps in a row before rolling back
MIN_LR_SCALE = 1 / 1024  # give up after ten halvings
MIN_LR_RATIO = 0.1  # the cosine ends at this fraction of --lr


def log_columns(num_codebooks: int) -> list[str]:
    train_ppl, val_ppl = ([f"{split}_ppl_{k}" for k in range(num_codebooks)] for split in ("train", "val"))
    return ["step", "epoch", "lr", "train_loss", *train_ppl, "val_loss", *val_ppl, "steps_per_s", "event"]


def loss_fields(prefix: str, ce_sum: Tensor, count: Tensor) -> tuple[float, dict[str, float]]:
    """Mean cross-entropy over codebooks and per-codebook perplexities from summed CE / counts [K]."""
    ce = (ce_sum / count.clamp(min=1)).tolist()
    return sum(ce) / len(ce), {f"{prefix}_ppl_{k}": math.exp(min(v, 50.0)) for k, v in enumerate(ce)}



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
        self.segments = Segments(train_clips, self.frames, cfg.seed, cfg.melody_track_prob if cfg.melody else 0.0)
        self.valid_segments = validation_segments(valid_clips, self.frames, cfg.eval_batches * cfg.batch_size)
        self.rows = cfg.batch_size // d.world  # segments per process per step

        self.max_steps = cfg.max_steps or math.ceil((cfg.epochs or 10.0) * self.segments.n / cfg.batch_size)
        self.lr = cfg.lr or (1e-4 if cfg.model else 5e-4)
        self.warmup = min(500, self.max_steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps

        opening = round(cfg.opening_seconds * model.frame_rate)
        self.net = TeacherForcing(model, opening, cfg.opening_weight, cfg.pitch_loss).to(d.device)
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
        self.fitted_max_steps: int | None = None  # --max-steps as lowered by --time-limit
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
            "fitted_max_steps": self.fitted_max_steps,
            "lr_scale": self.lr_scale,
            "best_val": self.best_val,
            "model": trainable_state(self.model),
            "pitch_head": None if self.net.pitch_head is None else self.net.pitch_head.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self.d.gather(rng_state(self.generator, self.d.device)),
        }

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or any(not k.startswith(("codec.", "text.encoder.", "melody_prior.")) for k in missing):
            raise CorruptCheckpoint("its weights do not fit this model")
        head = state.get("pitch_head")
        if (head is None) != (self.net.pitch_head is None):
            raise UsageError(f"the run was trained {'without' if head is None else 'with'} --pitch-loss; "
                             "repeat the original options to resume, or choose a new --out")
        if head is not None:
            self.net.pitch_head.load_state_dict(head)
        self.opt.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the checkpoint was written without fp16 loss scaling
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.lr_scale, self.best_val = state["step"], state["lr_scale"], state["best_val"]
        self.fitted_max_steps = state.get("fitted_max_steps")
        if self.fitted_max_steps is not None:
            self.max_steps = min(self.max_steps, self.fitted_max_steps)
        if len(state["rng"]) == self.d.world:
            set_rng_state(state["rng"][self.d.rank], self.generator, self.d.device)
        else:
            seed_everything(self.cfg.seed + self.d.rank + 7919 * self.step, self.generator)
            self.log.line(f"the checkpoint was written by {len(state['rng'])} processes, this run has {self.d.world}: "
                          "random states re-seeded")

    def restore_latest(self) -> Path | None:
        """Load the newest readable checkpoint; None when there is none."""
        return restore_latest(self.ckpt_dir, self.load_state_dict, self.log.line)

    def save(self) -> bool:
        """Write step-N.pt (and best.pt when this step set the best validation loss); refuses to write
        non-finite weights and returns False then."""
        state = self.state_dict()
        if not all_finite(state["model"]):
            return False
        if self.d.main:
            save_step(state, self.ckpt_dir, self.step, self.cfg.keep)
        self.d.barrier()
        return True

    def save_best(self) -> None:
        if self.d.main:
            link_best(self.ckpt_dir, self.step)

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
    def batch(self, segs: list[tuple[int, int]], clips: list[Clip], with_mix: bool = False) -> Batch:
        special = self.model.lm.cfg.special_token
        return make_batch(clips, segs, self.frames, special, self.chroma_rate, self.chroma_length, self.model.frame_rate,
                          with_mix)

    def losses(self, batch: Batch, train: bool) -> tuple[Tensor, Tensor, Tensor]:
        dev = self.d.device
        captions = batch.captions
        if train and self.cfg.caption_augment:
            captions = [None if c is None else augment_caption(c, self.generator, self.cfg.plain_tempo_words) for c in captions]
        texts = [c or NO_CAPTION for c in captions]
        captioned = torch.tensor([c is not None for c in captions], device=dev)
        chroma = None if batch.chroma is None else batch.chroma.to(dev)
        mix = None if batch.mix_chroma is None else batch.mix_chroma.to(dev)
        with torch.autocast(dev.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            module = self.ddp if train else self.net
            return module(batch.codes.to(dev), batch.valid.to(dev), texts, captioned, chroma,
                          self.cfg.condition_dropout, self.cfg.melody_dropout, self.generator if train else None, mix)

    def train_step(self) -> tuple[str, Tensor]:
        """One optimizer step on batch `self.step` -> (status, global CE sums and counts [2K]). Status "ok";
        "bad": a non-finite loss or gradient, no update; "overflow": fp16 gradients overflowed, the grad
        scaler skipped the update and lowered its scale (routine, not counted as bad)."""
        start = self.step * self.cfg.batch_size + self.d.rank * self.rows
        batch = self.batch([self.segments[p] for p in range(start, start + self.rows)], self.train_clips,
                           with_mix=self.net.pitch_head is not None)  # the pitch loss's targets
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        ce_sum, count, loss = self.losses(batch, train=True)
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
            ce_sum, count, _ = self.losses(self.batch(mine[i : i + self.rows], self.valid_clips), train=False)
            sums += torch.cat([ce_sum.float(), count.float()])
        self.net.train()
        self.d.all_sum(sums)
        return sums[: self.num_codebooks], sums[self.num_codebooks :]

    @torch.no_grad()
    def log_samples(self) -> None:
        """With --tensorboard: audio generated from the first validation captions (seeded by the step, so
        the training's own random streams are untouched)."""
        captions = [c.file.caption for c in self.valid_clips if c.file.caption][: self.cfg.tensorboard_samples]
        if self.log.writer is None or not captions:
            return
        self.net.eval()
        generators = [torch.Generator().manual_seed(self.cfg.seed + self.step + i) for i in range(len(captions))]
        tokens = self.model.generate_tokens(captions, self.frames, SamplingParams(), generators)  # [B, K, T]
        audio = self.model.codec.decode(tokens).mean(dim=1)  # [B, N]
        self.net.train()
        for i, wav in enumerate(audio):
            self.log.audio(f"samples/{i}", wav, self.model.sample_rate, self.step)

    # -- the loop ------------------------------------------------------------------------------
    def fit_time_limit(self, started: float, timed_from: tuple[int, float] | None) -> tuple[int, float] | None:
        """--time-limit: time steps TIMING_STEPS..2*TIMING_STEPS of this invocation, then lower max_steps to
        what the remaining time allows (the same on every process); stop at once when time is up."""
        limit, now = self.cfg.time_limit * 60, time.perf_counter()
        out_of_time = torch.tensor([int(self.d.main and now - started >= limit)], device=self.d.device)
        if int(self.d.all_sum(out_of_time)):  # the main process decides for all
            self.max_steps = self.fitted_max_steps = self.step
            return timed_from
        if timed_from is None:
            return (self.step, now) if self.step >= TIMING_STEPS else None
        first, t0 = timed_from
        if first >= 0 and self.step - first >= TIMING_STEPS:
            seconds_per_step = (now - t0) / (self.step - first)
            fits = self.step + int(TIME_LIMIT_MARGIN * (limit - (now - started)) / seconds_per_step)
            fits = int(self.d.all_sum(torch.tensor([fits if self.d.main else 0], device=self.d.device)))
            if fits < self.max_steps:
                self.max_steps = self.fitted_max_steps = max(fits, self.step + 1)
                self.log.line(f"--time-limit: {seconds_per_step * 1000:.0f} ms per step; training to step {fits}")
            return (-1, 0.0)  # done timing
        return timed_from

    def fit(self) -> None:
        cfg, log = self.cfg, self.log
        started, timed_from = time.perf_counter(), None
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
            if cfg.time_limit is not None:
                timed_from = self.fit_time_limit(started, timed_from)
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
                self.log_samples()
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



def train(cfg: Config) -> int:
    d = setup_processes(cfg.device, cfg.batch_size)
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
    error, note, lock = None, None, RunLock(run, PROG)
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
                    note = build_base(cfg, files, base)
                check_architecture(cfg, run)
            except UsageError as e:
                error = str(e)
                if fresh:  # a run that never started leaves nothing behind
                    lock.release()
                    shutil.rmtree(run, ignore_errors=True)
    for reported in d.gather(error):  # every process stops on the main process's usage error
        if reported:
            raise UsageError(reported)
    model = MusicGen.from_pretrained(base).to(d.device)
    model.codec.requires_grad_(False)
    model.text.freeze = not cfg.train_text_encoder
    model.text.encoder.requires_grad_(not model.text.freeze)
    log = RunLog(run / "log.csv", log_columns(model.lm.cfg.num_codebooks), d.main, cfg.tensorboard)
    if note:
        log.line(note)
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
        log.start(trainer.step)
        log.line(f"resuming from step {trainer.step} ({resumed.name})")
        log.row(step=trainer.step, event=f"resuming from step {trainer.step}")
    else:
        seed_everything(cfg.seed + d.rank, trainer.generator)
        trainer.save()
        log.start(0)
    log.line(f"model: {sum(p.numel() for p in model.lm.parameters()) / 1e6:.2f}M LM parameters, "
             f"{'melody + text' if model.has_melody else 'text'} conditioning; {trainer.max_steps} steps of "
             f"{cfg.batch_size} x {cfg.segment_seconds:g} s on {d.world} x {d.device}")

    # 4. train, then put the final model into the run folder
    trainer.fit()
    log.close()
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
    return run_training(PROG, lambda: train(parse_args(argv)))
