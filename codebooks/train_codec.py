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

The run directory RUN holds:
    config.json, model.safetensors   the codec in transformers format, refreshed at every
                                     checkpoint: EncodecCodec.from_pretrained(RUN) loads it
    checkpoints/step_XXXXXXXX.pt     full training state (last --keep-checkpoints kept)
    log.csv                          training losses, steps/s, validation SI-SDR and mel distance

Re-running the same command resumes from the newest checkpoint. Steps whose loss or
gradients are not finite are skipped, and nothing non-finite is ever saved.

Audio: every .wav/.flac/.ogg/.mp3 under --data (recursively), read with soundfile a segment at a time,
mixed to mono and resampled to the codec rate; unreadable files are skipped with a
warning. Whole files go to train or validation: by the "split" field of DIR/metadata.jsonl
(lines like {"path": "audio/x.wav", "split": "valid"}; "test" files are left out) where
it names the file, otherwise by a hash of the file's path.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import julius
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import EncodecConfig, EncodecModel
from transformers.audio_utils import mel_filter_bank
from transformers.models.encodec.modeling_encodec import EncodecResidualVectorQuantizer
from transformers.utils import logging as hf_logging

from codebooks.rvq import ResidualVQ
from musicgen_lite.audio_data import DataError, read_metadata, scan
from musicgen_lite.run_lock import RunInUse, RunLock

PROG = "train.py codec"
MEL_FFT_SIZES = (256, 512, 1024, 2048)
DISC_FFT_SIZES = (2048, 1024, 512)
SILENCE_RMS = 1e-4  # validation segments quieter than this (-80 dBFS) have no meaningful SI-SDR
# Fields that fix the shapes of the saved weights: a resumed run must keep them.
ARCHITECTURE = ("sample_rate", "ratios", "filters", "hidden_size", "lstm_layers", "codebooks", "codebook_size")
LOSS_TERMS = ("l1", "mse", "mel", "commit", "adv", "feat", "disc")
LOG_COLUMNS = (
    "step", "elapsed_s", "steps_per_s", "loss", *LOSS_TERMS, "skipped", "valid_si_sdr", "valid_mel", "valid_codes_used"
)  # fmt: skip


class UsageError(Exception):
    """Bad command-line input or data: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    data: str
    out: str
    # codec architecture
    sample_rate: int = 32_000
    ratios: tuple[int, ...] = (8, 5, 4, 4)  # decoder upsampling ratios; hop = product = 640 -> 50 frames/s
    filters: int = 16
    hidden_size: int = 64  # latent width D
    lstm_layers: int = 1
    codebooks: int = 4  # K
    codebook_size: int = 1024  # C
    # quantizer
    ema_decay: float = 0.99
    dead_threshold: float = 0.1  # EMA cluster size below which a codeword is replaced
    kmeans_batches: int = 4  # batches of latents the k-means initialisation sees
    commit_weight: float = 0.25
    quantize_prob: float = 0.5  # probability that a warm-up step quantizes
    quantize_warmup: int = 1000  # steps before every step quantizes
    # reconstruction losses
    l1_weight: float = 1.0
    mse_weight: float = 10.0
    mel_weight: float = 0.1
    mel_ramp_steps: int = 1000  # the mel weight grows linearly from 0 over these steps
    # adversarial training (EnCodec's MS-STFT discriminator)
    adversarial: bool = False
    adv_weight: float = 3.0
    feat_weight: float = 3.0
    disc_filters: int = 32
    # optimisation
    max_steps: int = 10_000
    batch_size: int = 8
    segment_seconds: float = 1.0
    lr: float = 3e-4
    # bookkeeping
    log_every: int = 50
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 3
    valid_fraction: float = 0.1
    valid_segments: int = 64
    seed: int = 0
    device: str = "auto"

    @property
    def hop(self) -> int:
        return math.prod(self.ratios)

    @property
    def segment_samples(self) -> int:
        """Training segment length, rounded to whole frames."""
        return max(1, round(self.segment_seconds * self.sample_rate / self.hop)) * self.hop

    def validate(self) -> None:
        positive = ("sample_rate", "filters", "hidden_size", "lstm_layers", "codebooks", "kmeans_batches",
                    "disc_filters", "max_steps", "batch_size", "log_every", "eval_every", "save_every",
                    "keep_checkpoints", "valid_segments")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        non_negative = ("commit_weight", "l1_weight", "mse_weight", "mel_weight", "adv_weight", "feat_weight",
                        "dead_threshold", "quantize_warmup", "mel_ramp_steps")  # fmt: skip
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.ratios or any(r < 1 for r in self.ratios):
            raise UsageError(f"--ratios must be positive integers, got {','.join(map(str, self.ratios))}")
        if self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1):
            raise UsageError(f"--codebook-size must be a power of two >= 2, got {self.codebook_size}")
        if not 0.0 < self.ema_decay < 1.0:
            raise UsageError(f"--ema-decay must lie in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.quantize_prob <= 1.0:
            raise UsageError(f"--quantize-prob must lie in [0, 1], got {self.quantize_prob}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise UsageError(f"--valid-fraction must lie in (0, 1), got {self.valid_fraction}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if not self.segment_seconds > 0 or self.segment_samples < max(MEL_FFT_SIZES):
            raise UsageError(
                f"--segment-seconds {self.segment_seconds} is too short: segments need at least "
                f"{max(MEL_FFT_SIZES)} samples ({max(MEL_FFT_SIZES) / self.sample_rate:.3f} s)"
            )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:1 or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


# ----------------------------------------------------------------------------- data


@dataclass
class AudioData:
    train: list["LazyAudio"]
    valid: list["LazyAudio"]
    left_out: int  # files marked "test"
    skipped: int  # unreadable files


class LazyAudio:
    """One file on disk, read a span at a time (hours of audio need not fit in memory):
    len() and read() count samples at the codec rate, mono, whatever the file's own rate and channels."""

    def __init__(self, path: Path, sample_rate: int) -> None:
        info = sf.info(str(path))
        if info.frames <= 0 or info.samplerate <= 0:
            raise ValueError("no samples")
        self.path, self.rate, self.sample_rate = path, info.samplerate, sample_rate
        self.frames = info.frames  # at the file's rate
        self.length = info.frames * sample_rate // info.samplerate

    def __len__(self) -> int:
        return self.length

    def read(self, start: int = 0, length: int | None = None) -> Tensor:
        """Samples [start, start + length) at the codec rate as a float32 tensor (shorter at the end)."""
        length = self.length - start if length is None else length
        first = start * self.rate // self.sample_rate
        count = -(-length * self.rate // self.sample_rate) + 1  # one spare frame for rounding
        data, _ = sf.read(str(self.path), start=first, frames=count, dtype="float32", always_2d=True)  # [n, C]
        wav = torch.from_numpy(data).mean(dim=1).nan_to_num(0.0, 0.0, 0.0)
        if self.rate != self.sample_rate:
            wav = julius.resample_frac(wav, self.rate, self.sample_rate)
        return wav[:length]


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
        _, lowest = min(hashed, key=lambda item: hashlib.sha1(item[0].encode("utf-8")).hexdigest())
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
            if piece.pow(2).mean().sqrt() > SILENCE_RMS:
                segments.append(piece)
    if not segments:
        raise UsageError("the validation audio is silent")
    if len(segments) > max_segments:
        keep = torch.linspace(0, len(segments) - 1, max_segments).round().long().tolist()
        segments = [segments[i] for i in keep]
    return torch.stack(segments)[:, None]  # [M, 1, length]


# ----------------------------------------------------------------------------- model


def encodec_config(cfg: TrainConfig) -> EncodecConfig:
    """The transformers config of the codec, with one target bandwidth that selects exactly K codebooks."""
    base = dict(
        sampling_rate=cfg.sample_rate,
        audio_channels=1,
        normalize=False,
        chunk_length_s=None,
        overlap=None,
        num_filters=cfg.filters,
        hidden_size=cfg.hidden_size,
        upsampling_ratios=list(cfg.ratios),
        num_lstm_layers=cfg.lstm_layers,
        codebook_size=cfg.codebook_size,
    )
    # EncodecModel uses floor(1000 * bandwidth / (frame_rate * bits)) codebooks. K times the rate of one
    # codebook is exact but for rare float roundings just below K (e.g. 31 x 7 bits at 75 Hz); there, half a
    # codebook more is safe.
    bits_per_second = math.ceil(cfg.sample_rate / cfg.hop) * math.log2(cfg.codebook_size)  # of one codebook
    bandwidth = cfg.codebooks * bits_per_second / 1000
    config = EncodecConfig(**base, target_bandwidths=[bandwidth])
    rvq = EncodecResidualVectorQuantizer(config)
    if len(rvq.layers) != cfg.codebooks or rvq.get_num_quantizers_for_bandwidth(bandwidth) != cfg.codebooks:
        config = EncodecConfig(**base, target_bandwidths=[(cfg.codebooks + 0.5) * bits_per_second / 1000])
    return config


@dataclass
class CodecOutput:
    recon: Tensor  # [B, 1, N]
    codes: Tensor  # [B, K, T]
    commit_loss: Tensor  # scalar


class Codec(nn.Module):
    """transformers' EnCodec encoder and decoder around a trainable ResidualVQ."""

    def __init__(self, config: EncodecConfig, decay: float = 0.99, dead_threshold: float = 0.1) -> None:
        super().__init__()
        self.config = config
        base = EncodecModel(config)  # for transformers' weight initialisation of encoder and decoder
        self.encoder = base.encoder
        self.decoder = base.decoder
        num_codebooks = len(base.quantizer.layers)
        self.quantizer = ResidualVQ(config.codebook_dim, num_codebooks, config.codebook_size, decay, dead_threshold)

    def forward(self, wav: Tensor, quantize: bool = True) -> CodecOutput:
        """wav [B, 1, N] -> recon [B, 1, N]; with quantize=False the decoder sees the unquantized latents."""
        latents = self.encoder(wav)  # [B, D, T], T = ceil(N / hop)
        rvq = self.quantizer(latents)
        recon = self.decoder(rvq.quantized if quantize else latents)  # [B, 1, T * hop]
        return CodecOutput(recon[..., : wav.shape[-1]], rvq.codes, rvq.commit_loss)

    def to_encodec(self) -> EncodecModel:
        """A CPU transformers EncodecModel with these weights and codebooks."""
        with torch.random.fork_rng(devices=[]):  # its throwaway random init must not shift a run's random stream
            model = EncodecModel(self.config)
        model.encoder.load_state_dict(self.encoder.state_dict())
        model.decoder.load_state_dict(self.decoder.state_dict())
        self.quantizer.export_to(model.quantizer)
        return model.eval()


def build_codec(cfg: TrainConfig) -> Codec:
    return Codec(encodec_config(cfg), cfg.ema_decay, cfg.dead_threshold)


# ----------------------------------------------------------------------------- losses and metrics


def si_sdr(estimate: Tensor, reference: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant signal-to-distortion ratio in dB: [..., N] x [..., N] -> [...].

    Both signals are made zero-mean; the reference is scaled to best match the estimate,
    and SI-SDR = 10 log10(|a * ref|^2 / |est - a * ref|^2), a = <est, ref> / |ref|^2.
    """
    reference = reference - reference.mean(-1, keepdim=True)
    estimate = estimate - estimate.mean(-1, keepdim=True)
    scale = (estimate * reference).sum(-1, keepdim=True) / (reference.pow(2).sum(-1, keepdim=True) + eps)
    target = scale * reference
    noise = estimate - target
    return 10 * torch.log10((target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))


class MultiScaleMelLoss(nn.Module):
    """Mean over STFT sizes of the L1 distance between log-mel magnitude spectrograms."""

    def __init__(self, sample_rate: int, fft_sizes: tuple[int, ...] = MEL_FFT_SIZES, n_mels: int = 64) -> None:
        super().__init__()
        self.fft_sizes = fft_sizes
        for n_fft in fft_sizes:
            with warnings.catch_warnings():  # transformers warns about the all-zero bands dropped below
                warnings.simplefilter("ignore")
                bank = mel_filter_bank(n_fft // 2 + 1, n_mels, 0.0, sample_rate / 2, sample_rate)
            bank = torch.from_numpy(bank).float()  # [F, n_mels]
            # At small FFT sizes the lowest bands are narrower than one bin and catch nothing.
            self.register_buffer(f"bank_{n_fft}", bank[:, bank.sum(0) > 0], persistent=False)
            self.register_buffer(f"window_{n_fft}", torch.hann_window(n_fft), persistent=False)

    def log_mel(self, wav: Tensor, n_fft: int) -> Tensor:
        """wav [B, 1, N] -> log-mel [B, M, frames]."""
        spec = torch.stft(
            wav.flatten(0, 1), n_fft, hop_length=n_fft // 4, window=getattr(self, f"window_{n_fft}"),
            return_complex=True,
        ).abs()  # [B, F, frames]
        mel = getattr(self, f"bank_{n_fft}").t() @ spec
        return mel.clamp(min=1e-5).log()

    def forward(self, estimate: Tensor, reference: Tensor) -> Tensor:
        losses = [F.l1_loss(self.log_mel(estimate, n), self.log_mel(reference, n)) for n in self.fft_sizes]
        return torch.stack(losses).mean()


class STFTDiscriminator(nn.Module):
    """2-D convolutions over the complex STFT (real and imaginary parts as two channels) at one resolution."""

    def __init__(self, n_fft: int, channels: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        norm = nn.utils.parametrizations.weight_norm
        self.convs = nn.ModuleList(
            [norm(nn.Conv2d(2, channels, (3, 9), padding=(1, 4)))]
            + [  # strided along frequency, dilated along time
                norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4)))
                for d in (1, 2, 4)
            ]
            + [norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1)))]
        )
        self.head = norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, wav: Tensor) -> tuple[Tensor, list[Tensor]]:
        """wav [B, 1, N] -> logits [B, 1, frames, F'] and the feature map of every layer."""
        spec = torch.stft(
            wav.flatten(0, 1), self.n_fft, hop_length=self.n_fft // 4, window=self.window,
            normalized=True, center=False, return_complex=True,
        )  # fmt: skip  # [B, F, frames]
        h = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # [B, 2, frames, F]
        features = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            features.append(h)
        return self.head(h), features


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, channels: int = 32, fft_sizes: tuple[int, ...] = DISC_FFT_SIZES) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(STFTDiscriminator(n, channels) for n in fft_sizes)

    def forward(self, wav: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        return [d(wav) for d in self.discriminators]


def generator_adversarial_losses(
    fake: list[tuple[Tensor, list[Tensor]]], real: list[tuple[Tensor, list[Tensor]]]
) -> tuple[Tensor, Tensor]:
    """Hinge loss of the codec, and feature matching (L1 relative to the real features' mean magnitude)."""
    adv = torch.stack([F.relu(1 - logits).mean() for logits, _ in fake]).mean()
    feat = torch.stack(
        [
            (f - r).abs().mean() / (r.abs().mean() + 1e-8)
            for (_, fake_feats), (_, real_feats) in zip(fake, real)
            for f, r in zip(fake_feats, real_feats)
        ]
    ).mean()
    return adv, feat


def discriminator_loss(fake: list[tuple[Tensor, list[Tensor]]], real: list[tuple[Tensor, list[Tensor]]]) -> Tensor:
    """Hinge loss of the discriminator: real logits pushed above 1, fake ones below -1."""
    return torch.stack(
        [F.relu(1 - r).mean() + F.relu(1 + f).mean() for (f, _), (r, _) in zip(fake, real)]
    ).mean()


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


def build_trainer(cfg: TrainConfig, device: torch.device) -> Trainer:
    torch.manual_seed(cfg.seed)
    model = build_codec(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    disc = disc_optimizer = None
    if cfg.adversarial:
        disc = MultiScaleSTFTDiscriminator(cfg.disc_filters).to(device)
        disc_optimizer = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    mel_loss = MultiScaleMelLoss(cfg.sample_rate).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    return Trainer(cfg, model, optimizer, mel_loss, disc, disc_optimizer, generator)


def _grads_finite(params) -> bool:
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
    if not _grads_finite(model.parameters()):
        t.optimizer.zero_grad(set_to_none=True)
        return None

    if t.disc is not None:
        disc_loss = discriminator_loss(t.disc(out.recon.detach()), t.disc(wav))
        t.disc_optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(disc_loss):
            return None
        disc_loss.backward()
        if not _grads_finite(t.disc.parameters()):
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
def evaluate(t: Trainer, segments: Tensor, device: torch.device) -> dict[str, float | str]:
    """Quantized reconstruction of the validation segments [M, 1, S]: mean SI-SDR, mel distance, codes in use."""
    t.model.eval()
    sdrs, mels, codes = [], [], []
    for batch in segments.split(t.cfg.batch_size):
        batch = batch.to(device)
        out = t.model(batch)
        sdrs.append(si_sdr(out.recon.flatten(1), batch.flatten(1)))
        mels.append(t.mel_loss(out.recon, batch) * len(batch))
        codes.append(out.codes)
    codes_used = [len(torch.unique(k)) for k in torch.cat(codes).transpose(0, 1).flatten(1)]  # per codebook
    return {
        "valid_si_sdr": float(torch.cat(sdrs).mean()),
        "valid_mel": float(torch.stack(mels).sum() / len(segments)),
        "valid_codes_used": "/".join(map(str, codes_used)),
    }


# ----------------------------------------------------------------------------- checkpoints and logs


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if isinstance(v, Tensor) and v.is_floating_point())


def checkpoint_paths(run: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    return sorted((run / "checkpoints").glob("step_*.pt"))


def save_checkpoint(t: Trainer, run: Path) -> Path:
    """Write the training state (temp file + rename), drop all but the newest few, refresh the exported codec."""
    state = {
        "step": t.step,
        "config": asdict(t.cfg),
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "data": t.generator.get_state()},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    if t.disc is not None:
        state["disc"] = t.disc.state_dict()
        state["disc_optimizer"] = t.disc_optimizer.state_dict()
    if not (_all_finite(state["model"]) and (t.disc is None or _all_finite(state["disc"]))):
        raise RuntimeError(f"refusing to save non-finite weights at step {t.step}")
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{t.step:08d}.pt"
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-", suffix=".pt", delete=False) as f:
        try:
            torch.save(state, f)
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)
    for old in checkpoint_paths(run)[: -t.cfg.keep_checkpoints]:
        old.unlink()
    export_codec(t.model, run)
    return path


def export_codec(model: Codec, run: Path) -> None:
    """Save the codec as a transformers EncodecModel into run/ (each file written aside, then renamed)."""
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # save_pretrained would draw one for a single small file
    try:
        with tempfile.TemporaryDirectory(dir=run, prefix=".export-") as tmp:
            model.to_encodec().save_pretrained(tmp)
            for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):  # config last: it marks completeness
                os.replace(Path(tmp) / name, run / name)
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()


def load_latest_checkpoint(run: Path, cfg: TrainConfig, device: torch.device) -> tuple[Path, dict] | None:
    """The newest checkpoint of the run and its state, or None; a UsageError if it holds a different codec."""
    paths = checkpoint_paths(run)
    if not paths:
        return None
    state = torch.load(paths[-1], map_location=device, weights_only=True)
    saved = state["config"]
    changed = [k for k in ARCHITECTURE if _as_tuple(saved[k]) != _as_tuple(getattr(cfg, k))]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {_fmt(saved[k])} (now {_fmt(getattr(cfg, k))})" for k in changed)
        raise UsageError(f"{run} holds a run with a different codec: {detail}; pass the same options or a new --out")
    return paths[-1], state


def resume(t: Trainer, state: dict) -> None:
    """Continue from a checkpoint: weights, codebooks, optimizer moments, random streams and step."""
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    if t.disc is not None and "disc" in state:
        t.disc.load_state_dict(state["disc"])
        t.disc_optimizer.load_state_dict(state["disc_optimizer"])
    elif t.disc is not None:
        print("note: the checkpoint has no discriminator; a new one starts now", flush=True)
    torch.set_rng_state(state["rng"]["torch"].cpu())
    t.generator.set_state(state["rng"]["data"].cpu())
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    t.step = state["step"]


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _fmt(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def open_log(run: Path, step: int) -> None:
    """Start run/log.csv, keeping rows up to `step` of an earlier run (a resumed run rewrites what came after)."""
    path = run / "log.csv"
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) == LOG_COLUMNS:
                rows = [r for r in reader if r["step"].isdigit() and int(r["step"]) <= step]
    with tempfile.NamedTemporaryFile("w", dir=run, prefix=".tmp-", suffix=".csv", delete=False, newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(f.name, path)


def append_log(run: Path, row: dict) -> None:
    with open(run / "log.csv", "a", newline="") as f:
        csv.DictWriter(f, LOG_COLUMNS).writerow({k: _csv_value(row.get(k, "")) for k in LOG_COLUMNS})


def _csv_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- main


def train(
    cfg: TrainConfig, device: torch.device, data: AudioData, run: Path, checkpoint: tuple[Path, dict] | None
) -> None:
    """Train from scratch, or on from `checkpoint` (its path and state), up to cfg.max_steps."""
    t = build_trainer(cfg, device)
    if checkpoint is not None:
        print(f"resuming from step {checkpoint[1]['step']} ({checkpoint[0]})", flush=True)
        resume(t, checkpoint[1])
    else:
        initialize_codebooks(t, data, device)
    open_log(run, t.step)
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
    while t.step < cfg.max_steps:
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

        last = t.step == cfg.max_steps
        row: dict = {}
        if t.step % cfg.eval_every == 0 or last:
            row.update(evaluate(t, segments, device))
            print(
                f"eval step {t.step} | SI-SDR {row['valid_si_sdr']:.2f} dB | mel {row['valid_mel']:.4f} | "
                f"codes used {row['valid_codes_used']} of {cfg.codebook_size}",
                flush=True,
            )
        if t.step % cfg.log_every == 0 or row:
            row.update({name: total / counted for name, total in sums.items()} if counted else {})
            row.update(step=t.step, elapsed_s=time.perf_counter() - started, skipped=skipped)
            row["steps_per_s"] = (counted + skipped) / train_time
            append_log(run, row)
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
    print(f"saved codec to {run} (step {t.step})", flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors also exit 2, with one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _ratios(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,5,4,4, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig  # defaults
    p = _Parser(
        prog=PROG,
        description="Train an EnCodec-style audio codec, saved in transformers' EncodecModel format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, default=argparse.SUPPRESS, help="folder of audio files (recursive)")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS, help="run folder: codec, checkpoints/, log.csv")
    g = p.add_argument_group("codec")
    g.add_argument("--sample-rate", type=int, default=d.sample_rate, help="codec sample rate (Hz)")
    g.add_argument("--ratios", type=_ratios, default=_fmt(d.ratios), help="upsampling ratios; their product is the hop")
    g.add_argument("--filters", type=int, default=d.filters, help="base convolution filters")
    g.add_argument("--hidden-size", type=int, default=d.hidden_size, help="latent width")
    g.add_argument("--lstm-layers", type=int, default=d.lstm_layers, help="LSTM layers in encoder and decoder")
    g.add_argument("--codebooks", type=int, default=d.codebooks, help="RVQ codebooks K")
    g.add_argument("--codebook-size", type=int, default=d.codebook_size, help="codewords per codebook (power of 2)")
    g = p.add_argument_group("quantizer")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help="codebook EMA decay")
    g.add_argument("--dead-threshold", type=float, default=d.dead_threshold,
                   help="EMA cluster size below which a codeword moves to a batch latent")  # fmt: skip
    g.add_argument("--kmeans-batches", type=int, default=d.kmeans_batches, help="batches for k-means initialisation")
    g.add_argument("--commit-weight", type=float, default=d.commit_weight, help="commitment loss weight")
    g.add_argument("--quantize-prob", type=float, default=d.quantize_prob, help="chance that a warm-up step quantizes")
    g.add_argument("--quantize-warmup", type=int, default=d.quantize_warmup, help="steps before every step quantizes")
    g = p.add_argument_group("losses")
    g.add_argument("--l1-weight", type=float, default=d.l1_weight, help="waveform L1 weight")
    g.add_argument("--mse-weight", type=float, default=d.mse_weight, help="waveform MSE weight")
    g.add_argument("--mel-weight", type=float, default=d.mel_weight, help="multi-scale log-mel L1 weight")
    g.add_argument("--mel-ramp-steps", type=int, default=d.mel_ramp_steps, help="steps for the mel weight to reach it")
    g.add_argument("--adversarial", action="store_true", help="add EnCodec's multi-scale STFT discriminator")
    g.add_argument("--adv-weight", type=float, default=d.adv_weight, help="adversarial (hinge) loss weight")
    g.add_argument("--feat-weight", type=float, default=d.feat_weight, help="feature-matching loss weight")
    g.add_argument("--disc-filters", type=int, default=d.disc_filters, help="discriminator channels")
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="train up to this step")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="segments per batch")
    g.add_argument("--segment-seconds", type=float, default=d.segment_seconds, help="segment length (s)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (betas 0.5, 0.9)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validations")
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept")
    g.add_argument("--valid-fraction", type=float, default=d.valid_fraction,
                   help="share of files held out for validation where metadata.jsonl gives no split")  # fmt: skip
    g.add_argument("--valid-segments", type=int, default=d.valid_segments, help="validation segments evaluated")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a one-line argparse error
        return int(e.code or 0)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    run = Path(cfg.out)
    lock = RunLock(run, PROG)
    try:
        cfg.validate()
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
        checkpoint = load_latest_checkpoint(run, cfg, device)
        minutes = [sum(len(w) for w in waves) / cfg.sample_rate / 60 for waves in (data.train, data.valid)]
        print(
            f"data: {len(data.train)} train files ({minutes[0]:.1f} min), {len(data.valid)} validation files "
            f"({minutes[1]:.1f} min), {data.left_out} test files left out, {data.skipped} unreadable skipped",
            flush=True,
        )
        train(cfg, device, data, run, checkpoint)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
