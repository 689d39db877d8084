"""Train an EnCodec-architecture audio codec and save it in transformers' EncodecModel format.

    python train.py codec --data DIR --out RUN [options]

The codec is transformers' SEANet encoder/decoder (`EncodecEncoder`, `EncodecDecoder`)
around our trainable residual VQ (codebooks/rvq.py):

    wav [B, 1, N] --encoder--> latents [B, D, T] --RVQ--> codes [B, K, T], quantized [B, D, T]
    quantized [B, D, T] --decoder--> recon [B, 1, T * hop],   T = N / hop (N a multiple of hop)

Losses, per step:
    L1 and MSE on the waveform;
    multi-scale log-mel L1 (STFT sizes 256..2048), its weight ramped in from 0;
    the RVQ commitment loss (codewords themselves follow EMAs, not gradients);
    with --adversarial, EnCodec's multi-scale STFT discriminator: hinge loss and
    feature matching for the codec, hinge loss for the discriminator.

Early on, a step applies quantization only with probability --quantize-prob (the decoder
sees the encoder's latents otherwise): the encoder and decoder learn a usable latent
space while codebooks follow it, instead of collapsing onto a few codewords.

With --codec DIR a run starts from a trained codec instead (a mono transformers EncodecModel without
normalisation or chunks: its architecture, weights, codebooks and their EMA state; no k-means, no
warm-ups), e.g. to fine-tune it on other audio or continue it at another rate. Its codes then drift
from the original's, so an LM trained on those moves with it: `train.py lm --model M --codec C`.
A --codebook-size that is a power-of-two multiple of the codec's grows its codebooks: each
codeword is split into copies a hair apart that training pulls onto parts of its cluster (one bit
more per code for each doubling, the same K codebooks).

The run directory RUN holds:
    config.json, model.safetensors   the codec in transformers format, refreshed at every
                                     checkpoint: EncodecCodec.from_pretrained(RUN) loads it
    checkpoints/step-XXXXXXXX.pt     full training state (last --keep-checkpoints kept; the LM
                                     trainer's checksummed format, musicgen_lite.training.checkpoints)
    log.csv                          training losses, steps/s, validation SI-SDR and mel distance
    tensorboard/                     with --tensorboard: the same numbers, and validation reconstructions

Re-running the same command resumes from the newest checkpoint. Steps whose loss or
gradients are not finite are skipped, and nothing non-finite is ever saved.

Audio: every .wav/.flac/.ogg/.mp3 under --data (recursively), read with soundfile a segment at a time,
mixed to mono and resampled to the codec rate; unreadable files are skipped with a
warning. Whole files go to train or validation: by the "split" field of DIR/metadata.jsonl
(lines like {"path": "audio/x.wav", "split": "valid"}; "test" files are left out) where
it names the file, otherwise by a hash of the file's path.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import EncodecConfig, EncodecModel

from codebooks.audio import LazyAudio, move_entries
from codebooks.trainable import Codec

from ..audio_data import DataError, read_metadata, scan, stable_hash
from ..cli_errors import UsageError
from ..evaluate.signal import si_sdr
from ..quiet import transformers_silenced
from ..run_lock import RunInUse, RunLock
from .checkpoints import all_finite, restore_latest, rng_state, save_step, set_rng_state
from .codec_config import (ARCHITECTURE, LR_FLOOR, OLD_DEFAULTS, PROG, TrainConfig, _as_tuple, _fmt, build_codec, build_parser,
                           read_source_config)
from .codec_losses import MultiScaleMelLoss, MultiScaleSTFTDiscriminator, discriminator_loss, generator_adversarial_losses
from .log import RunLog, require_tensorboard
from .processes import resolve_device
from .run import flag, run_training

SILENCE_RMS = 1e-4  # validation segments quieter than this (-80 dBFS) have no meaningful SI-SDR
LOSS_TERMS = ("l1", "mse", "mel", "commit", "adv", "feat", "disc")
LOG_COLUMNS = (
    "step", "elapsed_s", "steps_per_s", "loss", *LOSS_TERMS, "skipped", "valid_si_sdr", "valid_mel", "valid_codes_used"
)  # fmt: skip
TENSORBOARD_SAMPLES = 2  # validation reconstructions logged at each evaluation


# ----------------------------------------------------------------------------- data


@dataclass
class AudioData:
    train: list["LazyAudio"]
    valid: list["LazyAudio"]
    left_out: int  # files marked "test"
    skipped: int  # unreadable files



def load_audio_data(root: Path, sample_rate: int, valid_fraction: float) -> AudioData:
    """Every readable audio file under root, split by whole files as `train.py lm` splits them
    (musicgen_lite.audio_data.scan), read lazily, a segment at a time."""
    if not root.is_dir():
        raise UsageError(f"--data {root} is not a directory")
    try:
        files, metadata = scan(root, valid_fraction), read_metadata(root.resolve())
    except DataError as e:
        raise UsageError(str(e)) from None
    waves: dict[str, list[LazyAudio]] = {"train": [], "valid": [], "test": []}
    hashed: list[tuple[str, LazyAudio]] = []  # (relative path, audio) of files split by hash
    skipped = 0
    for file in files:
        try:
            wav = LazyAudio(file.path, sample_rate)
        except Exception as e:  # any failure to decode makes the file unusable, whatever raised it
            reason = " ".join(str(e).split()) or type(e).__name__
            print(f"warning: skipping unreadable audio file {file.path}: {reason}", file=sys.stderr, flush=True)
            skipped += 1
            continue
        waves[file.split].append(wav)
        if not metadata.get(file.rel, {}).get("split"):
            hashed.append((file.rel, wav))
    if hashed and not waves["valid"] and len(waves["train"]) > 1:
        # Too few files for the fraction to pick one: hold out the hashed file with the lowest hash.
        _, lowest = min(hashed, key=lambda item: stable_hash(item[0]))
        waves["train"].remove(lowest)
        waves["valid"].append(lowest)
    if not waves["train"] or not waves["valid"]:
        readable = sum(len(w) for w in waves.values())
        raise UsageError(
            f"need audio for both training and validation under {root}: found {len(waves['train'])} train and "
            f"{len(waves['valid'])} validation files ({readable} readable, {skipped} unreadable)"
        )
    return AudioData(waves["train"], waves["valid"], len(waves["test"]), skipped)


def sample_batch(waves: list[LazyAudio], batch_size: int, length: int, generator: torch.Generator) -> Tensor:
    """Random segments [B, 1, length]: files drawn in proportion to their length, short ones zero-padded."""
    sizes = torch.tensor([len(w) for w in waves], dtype=torch.float)
    picks = torch.multinomial(sizes, batch_size, replacement=True, generator=generator)
    batch = torch.zeros(batch_size, 1, length)
    for row, i in enumerate(picks.tolist()):
        wav = waves[i]
        start = int(torch.randint(max(1, len(wav) - length + 1), (1,), generator=generator))
        piece = wav.read(start, length)
        batch[row, 0, : len(piece)] = piece
    return batch


def validation_segments(files: list[LazyAudio], length: int, max_segments: int) -> Tensor:
    """Consecutive non-silent segments [M, 1, length] of the validation files, at most max_segments, evenly spread."""
    segments = []
    for file in files:
        wav = file.read()
        for start in range(0, max(1, len(wav) - length + 1), length):
            piece = F.pad(wav[start : start + length], (0, max(0, length - (len(wav) - start))))
            if piece.pow(2).mean().sqrt() > SILENCE_RMS and piece.max() > piece.min():  # SI-SDR needs a varying reference
                segments.append(piece)
    if not segments:
        raise UsageError("the validation audio is silent")
    if len(segments) > max_segments:
        keep = torch.linspace(0, len(segments) - 1, max_segments).round().long().tolist()
        segments = [segments[i] for i in keep]
    return torch.stack(segments)[:, None]  # [M, 1, length]


# ----------------------------------------------------------------------------- training


@dataclass
class Trainer:
    cfg: TrainConfig
    model: Codec
    optimizer: torch.optim.Optimizer
    mel_loss: MultiScaleMelLoss
    disc: MultiScaleSTFTDiscriminator | None
    disc_optimizer: torch.optim.Optimizer | None
    generator: torch.Generator  # data sampling and quantization coin flips
    step: int = 0
    schedule_steps: int = 0  # where a cosine learning rate ends: the max_steps of the run's first invocation

    def learning_rate(self) -> float:
        """The rate of the coming step: --lr, or its cosine from --lr down to LR_FLOOR x --lr at
        schedule_steps (then flat), so that a run extended with a larger --max-steps never jumps up."""
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        done = min(self.step, self.schedule_steps) / self.schedule_steps
        return self.cfg.lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * done)))


def build_trainer(cfg: TrainConfig, device: torch.device, config: EncodecConfig | None = None) -> Trainer:
    """A trainer of a codec of `config` (the codec a run started from), else of the architecture options."""
    torch.manual_seed(cfg.seed)
    model = build_codec(cfg, config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    disc = disc_optimizer = None
    if cfg.adversarial:
        disc = MultiScaleSTFTDiscriminator(cfg.disc_filters).to(device)
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    mel_loss = MultiScaleMelLoss(cfg.sample_rate).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    return Trainer(cfg, model, optimizer, mel_loss, disc, disc_optimizer, generator, schedule_steps=cfg.max_steps)


def grads_finite(params) -> bool:
    norm = torch.nn.utils.clip_grad_norm_(list(params), float("inf"))  # only measures: max_norm is infinite
    return bool(torch.isfinite(norm))


def train_step(t: Trainer, wav: Tensor) -> dict[str, float] | None:
    """One optimisation step on wav [B, 1, N]; None (and no update) if the loss or a gradient is not finite."""
    cfg, model = t.cfg, t.model
    model.train()
    in_warmup = t.step < cfg.quantize_warmup
    quantize = not in_warmup or float(torch.rand((), generator=t.generator)) < cfg.quantize_prob
    out = model(wav, quantize)  # the RVQ's EMA update happens here (skipped by it for non-finite latents)

    mel_weight = cfg.mel_weight * (min(1.0, t.step / cfg.mel_ramp_steps) if cfg.mel_ramp_steps else 1.0)
    terms = {
        "l1": F.l1_loss(out.recon, wav),
        "mse": F.mse_loss(out.recon, wav),
        "mel": t.mel_loss(out.recon, wav),
        "commit": out.commit_loss,
    }
    loss = cfg.l1_weight * terms["l1"] + cfg.mse_weight * terms["mse"] + mel_weight * terms["mel"]
    loss = loss + cfg.commit_weight * terms["commit"]
    if t.disc is not None:
        t.disc.requires_grad_(False)  # the codec's step does not train the discriminator
        with torch.no_grad():
            real = t.disc(wav)
        terms["adv"], terms["feat"] = generator_adversarial_losses(t.disc(out.recon), real)
        loss = loss + cfg.adv_weight * terms["adv"] + cfg.feat_weight * terms["feat"]
        t.disc.requires_grad_(True)
    if not torch.isfinite(loss):
        return None
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if not grads_finite(model.parameters()):
        t.optimizer.zero_grad(set_to_none=True)
        return None

    lr = t.learning_rate()
    for group in t.optimizer.param_groups + (t.disc_optimizer.param_groups if t.disc is not None else []):
        group["lr"] = lr
    if t.disc is not None:
        disc_loss = discriminator_loss(t.disc(out.recon.detach()), t.disc(wav))
        t.disc_optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(disc_loss):
            return None
        disc_loss.backward()
        if not grads_finite(t.disc.parameters()):
            t.disc_optimizer.zero_grad(set_to_none=True)
            return None
        t.disc_optimizer.step()
        terms["disc"] = disc_loss
    t.optimizer.step()
    stats = {name: value.item() for name, value in terms.items()}
    stats["loss"] = loss.item()
    return stats


@torch.no_grad()
def initialize_codebooks(t: Trainer, data: AudioData, device: torch.device) -> None:
    """k-means for every codebook on the encoder's latents of the first `kmeans_batches` batches."""
    t.model.eval()
    latents = [
        t.model.encoder(sample_batch(data.train, t.cfg.batch_size, t.cfg.segment_samples, t.generator).to(device))
        for _ in range(t.cfg.kmeans_batches)
    ]  # each [B, D, T]
    t.model.quantizer.initialize(torch.cat(latents), batches=t.cfg.kmeans_batches)


@torch.no_grad()
def evaluate(t: Trainer, segments: Tensor, device: torch.device, log: RunLog | None = None) -> dict[str, float | str]:
    """Quantized reconstruction of the validation segments [M, 1, S]: mean SI-SDR, mel distance, codes in use.
    The first reconstructions also go to TensorBoard when the log writes there."""
    t.model.eval()
    sdrs, mels, codes = [], [], []
    for batch in segments.split(t.cfg.batch_size):
        batch = batch.to(device)
        out = t.model(batch)
        sdrs.append(si_sdr(batch.flatten(1), out.recon.flatten(1)))
        mels.append(t.mel_loss(out.recon, batch) * len(batch))
        codes.append(out.codes)
        if log is not None and len(sdrs) == 1:
            for i, wav in enumerate(out.recon[:TENSORBOARD_SAMPLES, 0]):
                log.audio(f"valid/reconstruction_{i}", wav, t.cfg.sample_rate, t.step)
    codes_used = [len(torch.unique(k)) for k in torch.cat(codes).transpose(0, 1).flatten(1)]  # per codebook
    return {
        "valid_si_sdr": float(np.concatenate(sdrs).mean()),
        "valid_mel": float(torch.stack(mels).sum() / len(segments)),
        "valid_codes_used": "/".join(map(str, codes_used)),
    }


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(t: Trainer, run: Path) -> Path:
    """Write the training state as step-N.pt, keep the newest few, refresh the exported codec."""
    state = {
        "step": t.step,
        "schedule_steps": t.schedule_steps,
        "config": asdict(t.cfg),
        "encodec": t.model.config.to_dict(),  # the architecture, also for a codec started from (--codec)
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "rng": rng_state(t.generator, next(t.model.parameters()).device),
    }
    if t.disc is not None:
        state["disc"] = t.disc.state_dict()
        state["disc_optimizer"] = t.disc_optimizer.state_dict()
    if not (all_finite(state["model"]) and (t.disc is None or all_finite(state["disc"]))):
        raise RuntimeError(f"refusing to save non-finite weights at step {t.step}")
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = save_step(state, folder, t.step, t.cfg.keep_checkpoints)
    export_codec(t.model, run)
    return path


def export_codec(model: Codec, run: Path) -> None:
    """Save the codec as a transformers EncodecModel into run/ (each file written aside, then renamed)."""
    save_encodec(model.to_encodec(), run)


def save_encodec(model: EncodecModel, run: Path) -> None:
    """A transformers EncodecModel into run/: written aside, then each file renamed in, config.json last."""
    # transformers silenced: save_pretrained would draw a progress bar for a single small file
    with transformers_silenced(), tempfile.TemporaryDirectory(dir=run, prefix=".export-") as tmp:
        model.save_pretrained(tmp)
        move_entries(Path(tmp), run)  # config.json last: it marks completeness


def load_latest_checkpoint(run: Path, cfg: TrainConfig) -> tuple[Path, dict] | None:
    """The newest readable checkpoint of the run and its state, or None; a UsageError if it holds a
    different codec, or only checkpoints of the format before step-N.pt."""
    folder = run / "checkpoints"
    found: dict = {}

    def check(state: dict) -> None:
        started_from = state["config"].get("codec")
        if started_from != cfg.codec:
            raise UsageError(f"{run} holds a run started from {started_from or 'scratch'}, not from "
                             f"{cfg.codec or 'scratch'}; pass the same --codec or a new --out")
        saved = state["config"]
        saved = {k: saved.get(k, OLD_DEFAULTS.get(k)) for k in ARCHITECTURE}
        changed = [k for k in ARCHITECTURE if _as_tuple(saved[k]) != _as_tuple(getattr(cfg, k))]
        if changed:
            detail = ", ".join(f"{flag(k)} {_fmt(saved[k])} (now {_fmt(getattr(cfg, k))})" for k in changed)
            raise UsageError(f"{run} holds a run with a different codec: {detail}; pass the same options or a new --out")
        found["state"] = state

    path = restore_latest(folder, check, lambda text: print(text, flush=True))
    if path is None and any(folder.glob("step_*.pt")):
        raise UsageError(f"{folder} holds step_N.pt checkpoints of an earlier version, which do not resume; "
                         "choose a new --out")
    return None if path is None else (path, found["state"])


def resume(t: Trainer, state: dict) -> None:
    """Continue from a checkpoint: weights, codebooks, optimizer moments, random streams and step."""
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    if t.disc is not None and "disc" in state:
        t.disc.load_state_dict(state["disc"])
        t.disc_optimizer.load_state_dict(state["disc_optimizer"])
    elif t.disc is not None:
        print("note: the checkpoint has no discriminator; a new one starts now", flush=True)
    set_rng_state(state["rng"], t.generator, next(t.model.parameters()).device)
    t.step = state["step"]
    t.schedule_steps = state.get("schedule_steps", state["config"]["max_steps"])


# ----------------------------------------------------------------------------- main


def train(
    cfg: TrainConfig, device: torch.device, data: AudioData, run: Path, checkpoint: tuple[Path, dict] | None,
    source: EncodecConfig | None = None,
) -> None:
    """Train from scratch or from the codec cfg.codec (of config `source`), or on from `checkpoint` (its
    path and state), up to cfg.max_steps."""
    if checkpoint is not None and "encodec" in checkpoint[1]:
        source = EncodecConfig.from_dict(checkpoint[1]["encodec"])
    t = build_trainer(cfg, device, source)
    if checkpoint is not None:
        print(f"resuming from step {checkpoint[1]['step']} ({checkpoint[0]})", flush=True)
        resume(t, checkpoint[1])
    elif cfg.codec:
        print(f"starting from {cfg.codec}: its weights, codebooks and their EMA state", flush=True)
        t.model.load_encodec(load_source_codec(cfg.codec))
    else:
        initialize_codebooks(t, data, device)
    log = RunLog(run / "log.csv", list(LOG_COLUMNS), tensorboard=cfg.tensorboard)
    log.start(t.step)
    segments = validation_segments(data.valid, cfg.segment_samples, cfg.valid_segments)
    n_params = sum(p.numel() for p in t.model.parameters())
    print(
        f"codec: {n_params / 1e6:.2f} M parameters, {cfg.codebooks} x {cfg.codebook_size} codebooks of width "
        f"{cfg.hidden_size}, {cfg.sample_rate / cfg.hop:g} frames/s; device {device}",
        flush=True,
    )
    if t.step >= cfg.max_steps:
        print(f"already at step {t.step} (--max-steps {cfg.max_steps}); nothing to do", flush=True)
        return

    sums: dict[str, float] = {}  # loss terms summed since the last log row
    counted = skipped = 0  # steps since the last log row
    train_time, started = 0.0, time.perf_counter()  # train_time: seconds in train_step since the last row
    last = False
    while not last:
        wav = sample_batch(data.train, cfg.batch_size, cfg.segment_samples, t.generator).to(device)  # [B, 1, S]
        tic = time.perf_counter()
        stats = train_step(t, wav)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - tic
        t.step += 1
        if stats is None:
            skipped += 1
            print(f"warning: step {t.step}: non-finite loss or gradient, step skipped", file=sys.stderr, flush=True)
        else:
            counted += 1
            for name, value in stats.items():
                sums[name] = sums.get(name, 0.0) + value

        out_of_time = cfg.time_limit is not None and time.perf_counter() - started >= 60 * cfg.time_limit
        last = t.step == cfg.max_steps or out_of_time
        row: dict = {}
        if t.step % cfg.eval_every == 0 or last:
            row.update(evaluate(t, segments, device, log))
            print(
                f"eval step {t.step} | SI-SDR {row['valid_si_sdr']:.2f} dB | mel {row['valid_mel']:.4f} | "
                f"codes used {row['valid_codes_used']} of {cfg.codebook_size}",
                flush=True,
            )
        if t.step % cfg.log_every == 0 or row:
            row.update({name: total / counted for name, total in sums.items()} if counted else {})
            row.update(step=t.step, elapsed_s=time.perf_counter() - started, skipped=skipped)
            row["steps_per_s"] = (counted + skipped) / train_time
            log.row(**row)
            if counted:
                terms = " ".join(f"{k} {row[k]:.4g}" for k in LOSS_TERMS if k in row)
                print(
                    f"step {t.step}/{cfg.max_steps} | loss {row['loss']:.4f} | {terms} | "
                    f"{row['steps_per_s']:.2f} steps/s",
                    flush=True,
                )
            sums, counted, skipped, train_time = {}, 0, 0, 0.0
        if t.step % cfg.save_every == 0 or last:
            save_checkpoint(t, run)
    log.close()
    print(f"saved codec to {run} (step {t.step})", flush=True)


def load_source_codec(path: str) -> EncodecModel:
    try:
        with transformers_silenced():
            return EncodecModel.from_pretrained(path).float()
    except (OSError, ValueError, RuntimeError) as e:  # missing or mismatched weights
        raise UsageError(f"--codec {path}: cannot load its weights: {' '.join(str(e).split())[:200]}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a one-line argparse error
        return int(e.code or 0)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})

    run = Path(cfg.out)
    lock = RunLock(run, PROG)

    def body() -> int:
        source = None
        if cfg.codec:
            cfg.codec = str(Path(cfg.codec).resolve())  # a resumed run compares it, from any directory
            source = read_source_config(cfg.codec)
            cfg.start_from(source)
        cfg.validate()
        if cfg.tensorboard:
            require_tensorboard()
        device = resolve_device(cfg.device)
        if run.exists() and not run.is_dir():
            raise UsageError(f"--out {run} exists and is not a directory")
        data = load_audio_data(Path(cfg.data), cfg.sample_rate, cfg.valid_fraction)
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create --out {run}: {e.strerror}") from None
        try:
            lock.acquire()  # one trainer per run folder, before reading its checkpoints
        except RunInUse as e:
            raise UsageError(str(e)) from None
        if lock.previous:
            print(f"taking over the lock of a run that ended without releasing it ({lock.previous})", flush=True)
        checkpoint = load_latest_checkpoint(run, cfg)
        minutes = [sum(len(w) for w in waves) / cfg.sample_rate / 60 for waves in (data.train, data.valid)]
        print(
            f"data: {len(data.train)} train files ({minutes[0]:.1f} min), {len(data.valid)} validation files "
            f"({minutes[1]:.1f} min), {data.left_out} test files left out, {data.skipped} unreadable skipped",
            flush=True,
        )
        train(cfg, device, data, run, checkpoint, source)
        return 0

    try:
        return run_training(PROG, body)
    finally:
        lock.release()
