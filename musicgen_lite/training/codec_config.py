"""The codec trainer's options: TrainConfig, the command line, and the transformers config of the codec it builds."""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path

from transformers import EncodecConfig
from transformers.models.encodec.modeling_encodec import EncodecResidualVectorQuantizer

from codebooks.trainable import Codec

from ..cli_errors import ArgumentParser, UsageError
from .codec_losses import MEL_FFT_SIZES
from .run import check_all, flag

PROG = "train.py codec"
# Fields that fix the shapes of the saved weights: a resumed run must keep them.
ARCHITECTURE = ("sample_rate", "ratios", "filters", "hidden_size", "lstm_layers", "codebooks", "codebook_size", "causal")
OLD_DEFAULTS = {"causal": True}  # runs saved before a field existed were trained with this value
LR_SCHEDULES = ("constant", "cosine")
LR_FLOOR = 0.1  # where the cosine schedule ends, as a fraction of --lr
WARMUP_STEPS = 1000  # default quantizer warm-up and mel ramp of a codec trained from scratch (none from --codec)
DEFAULT_CODEBOOK_SIZE = 1024  # codewords per codebook of a codec trained from scratch


@dataclass
class TrainConfig:
    data: str
    out: str
    codec: str | None = None  # start from this trained codec (a transformers EncodecModel dir), not from scratch
    # codec architecture
    sample_rate: int = 32_000
    ratios: tuple[int, ...] = (8, 5, 4, 4)  # decoder upsampling ratios; hop = product = 640 -> 50 frames/s
    filters: int = 16
    hidden_size: int = 64  # latent width D
    lstm_layers: int = 1
    codebooks: int = 4  # K
    codebook_size: int | None = None  # C (None: DEFAULT_CODEBOOK_SIZE, or --codec's own)
    causal: bool = False  # causal convolutions (streamable) or centred ones (MusicGen's 32 kHz EnCodec)
    # quantizer
    ema_decay: float = 0.99
    dead_threshold: float = 0.1  # EMA cluster size below which a codeword is replaced
    kmeans_batches: int = 4  # batches of latents the k-means initialisation sees
    commit_weight: float = 0.25
    quantize_prob: float = 0.5  # probability that a warm-up step quantizes
    quantize_warmup: int | None = None  # steps before every step quantizes (None: WARMUP_STEPS, 0 from --codec)
    beam_width: int | None = None  # RVQ beam search width, saved in the codec's config (None: 1, or --codec's own)
    # reconstruction losses
    l1_weight: float = 1.0
    mse_weight: float = 10.0
    mel_weight: float = 0.1
    mel_ramp_steps: int | None = None  # the mel weight grows from 0 over these steps (None: WARMUP_STEPS, 0 from --codec)
    # adversarial training (EnCodec's MS-STFT discriminator)
    adversarial: bool = False
    adv_weight: float = 3.0
    feat_weight: float = 3.0
    disc_filters: int = 32
    # optimisation
    max_steps: int = 10_000
    time_limit: float | None = None  # minutes of training for this invocation (a cosine still ends at max_steps)
    batch_size: int = 8
    segment_seconds: float = 1.0
    lr: float = 3e-4
    lr_schedule: str = "constant"  # EnCodec's constant rate, or "cosine": down to LR_FLOOR x lr at the run's max_steps
    # bookkeeping
    log_every: int = 50
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 3
    valid_fraction: float = 0.1
    valid_segments: int = 64
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = False

    @property
    def hop(self) -> int:
        return math.prod(self.ratios)

    @property
    def segment_samples(self) -> int:
        """Training segment length, rounded to whole frames."""
        return max(1, round(self.segment_seconds * self.sample_rate / self.hop)) * self.hop

    def __post_init__(self) -> None:
        # a trained codec needs no warm-ups: its latents and codebooks already agree
        for name in ("quantize_warmup", "mel_ramp_steps"):
            if getattr(self, name) is None:
                setattr(self, name, 0 if self.codec else WARMUP_STEPS)
        if self.codebook_size is None and not self.codec:
            self.codebook_size = DEFAULT_CODEBOOK_SIZE

    def start_from(self, source: EncodecConfig) -> None:
        """Take the architecture of the trained codec the run starts from; an architecture option given
        with another value is an error, but for a --codebook-size a power-of-two multiple of the codec's
        (its codebooks are grown by splitting each codeword)."""
        for name, value in architecture_of(source).items():
            given = getattr(self, name)
            if name == "codebook_size" and (given is None or (given > value and given % value == 0)):
                self.codebook_size = given or value  # validate() checks that a grown size is a power of two
                continue
            if _as_tuple(given) not in (_as_tuple(value), _as_tuple(getattr(TrainConfig, name))):
                raise UsageError(f"{flag(name)} {_fmt(given)} differs from --codec {self.codec}'s {_fmt(value)}; "
                                 "leave it out: the codec sets the architecture")
            setattr(self, name, value)

    def validate(self) -> None:
        positive = ("sample_rate", "filters", "hidden_size", "lstm_layers", "codebooks", "kmeans_batches",
                    "disc_filters", "max_steps", "batch_size", "log_every", "eval_every", "save_every",
                    "keep_checkpoints", "valid_segments")  # fmt: skip
        check_all({flag(name): getattr(self, name) for name in positive}, lambda v: v >= 1, "must be >= 1")
        non_negative = ("commit_weight", "l1_weight", "mse_weight", "mel_weight", "adv_weight", "feat_weight",
                        "dead_threshold", "quantize_warmup", "mel_ramp_steps")  # fmt: skip
        check_all({flag(name): getattr(self, name) for name in non_negative}, lambda v: v >= 0, "must be >= 0")
        if not self.ratios or any(r < 1 for r in self.ratios):
            raise UsageError(f"--ratios must be positive integers, got {','.join(map(str, self.ratios))}")
        if self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1):
            raise UsageError(f"--codebook-size must be a power of two >= 2, got {self.codebook_size}")
        if self.beam_width is not None and self.beam_width < 1:
            raise UsageError(f"--beam-width must be >= 1, got {self.beam_width}")
        if not 0.0 < self.ema_decay < 1.0:
            raise UsageError(f"--ema-decay must lie in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.quantize_prob <= 1.0:
            raise UsageError(f"--quantize-prob must lie in [0, 1], got {self.quantize_prob}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise UsageError(f"--valid-fraction must lie in (0, 1), got {self.valid_fraction}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise UsageError(f"--time-limit must be > 0 minutes, got {self.time_limit}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not self.segment_seconds > 0 or self.segment_samples < max(MEL_FFT_SIZES):
            raise UsageError(
                f"--segment-seconds {self.segment_seconds} is too short: segments need at least "
                f"{max(MEL_FFT_SIZES)} samples ({max(MEL_FFT_SIZES) / self.sample_rate:.3f} s)"
            )


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
        use_causal_conv=cfg.causal,
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


def architecture_of(config: EncodecConfig) -> dict:
    """The ARCHITECTURE fields of a transformers EnCodec config."""
    return dict(sample_rate=config.sampling_rate, ratios=tuple(config.upsampling_ratios), filters=config.num_filters,
                hidden_size=config.hidden_size, lstm_layers=config.num_lstm_layers, codebooks=config.num_quantizers,
                codebook_size=config.codebook_size, causal=config.use_causal_conv)


def read_source_config(path: str) -> EncodecConfig:
    """The config of a codec to start from, or a UsageError if it is not a codec this trainer can train on."""
    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"--codec {path} is not a codec directory (no config.json)")
    try:
        config = EncodecConfig.from_pretrained(path)
    except Exception as e:  # a config of another model type, or unreadable JSON
        raise UsageError(f"--codec {path} is not an EnCodec codec: {' '.join(str(e).split())[:200]}") from None
    if config.audio_channels != 1 or config.normalize or config.chunk_length_s is not None:
        raise UsageError(f"--codec {path} cannot be trained here: this trainer trains mono codecs without "
                         f"normalisation or chunks (audio_channels={config.audio_channels}, "
                         f"normalize={config.normalize}, chunk_length_s={config.chunk_length_s})")
    return config


def build_codec(cfg: TrainConfig, config: EncodecConfig | None = None) -> Codec:
    """A trainable codec of `config` (a codec started from), else of the architecture options."""
    if config is not None:
        config = copy.deepcopy(config)
        if config.codebook_size != cfg.codebook_size:  # grown codebooks: more bits per code, the same K codebooks
            config.codebook_size = cfg.codebook_size
            config.target_bandwidths = encodec_config(cfg).target_bandwidths
    else:
        config = encodec_config(cfg)
    if cfg.beam_width is not None:
        config.rvq_beam_width = cfg.beam_width
    return Codec(config, cfg.ema_decay, cfg.dead_threshold)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _fmt(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)



def _ratios(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,5,4,4, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig  # defaults
    p = ArgumentParser(
        prog=PROG,
        description="Train an EnCodec-style audio codec, saved in transformers' EncodecModel format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, default=argparse.SUPPRESS, help="folder of audio files (recursive)")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS, help="run folder: codec, checkpoints/, log.csv")
    p.add_argument("--codec", help="start from this trained codec (a transformers EncodecModel dir: its architecture, "
                   "weights, codebooks and their EMA state) instead of from scratch, e.g. to fine-tune it on other audio")
    g = p.add_argument_group("codec")
    g.add_argument("--sample-rate", type=int, default=d.sample_rate, help="codec sample rate (Hz)")
    g.add_argument("--ratios", type=_ratios, default=_fmt(d.ratios), help="upsampling ratios; their product is the hop")
    g.add_argument("--filters", type=int, default=d.filters, help="base convolution filters")
    g.add_argument("--hidden-size", type=int, default=d.hidden_size, help="latent width")
    g.add_argument("--lstm-layers", type=int, default=d.lstm_layers, help="LSTM layers in encoder and decoder")
    g.add_argument("--codebooks", type=int, default=d.codebooks, help="RVQ codebooks K")
    g.add_argument("--codebook-size", type=int, default=d.codebook_size,
                   help=f"codewords per codebook, a power of 2 (default {DEFAULT_CODEBOOK_SIZE}; from --codec, its own, "
                        "or a multiple of it: each codeword is split)")
    g.add_argument("--causal", action=argparse.BooleanOptionalAction, default=d.causal,
                   help="causal convolutions (default: centred, as MusicGen's 32 kHz EnCodec)")
    g = p.add_argument_group("quantizer")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help="codebook EMA decay")
    g.add_argument("--dead-threshold", type=float, default=d.dead_threshold,
                   help="EMA cluster size below which a codeword moves to a batch latent")  # fmt: skip
    g.add_argument("--kmeans-batches", type=int, default=d.kmeans_batches, help="batches for k-means initialisation")
    g.add_argument("--beam-width", type=int, default=argparse.SUPPRESS,
                   help="codes chosen by a beam search of this width over the codebooks' sums, in training and "
                        "whenever the codec encodes (default: 1, greedy residual VQ; with --codec, its own)")
    g.add_argument("--commit-weight", type=float, default=d.commit_weight, help="commitment loss weight")
    g.add_argument("--quantize-prob", type=float, default=d.quantize_prob, help="chance that a warm-up step quantizes")
    g.add_argument("--quantize-warmup", type=int, default=argparse.SUPPRESS,
                   help=f"steps before every step quantizes (default: {WARMUP_STEPS}; 0 with --codec)")
    g = p.add_argument_group("losses")
    g.add_argument("--l1-weight", type=float, default=d.l1_weight, help="waveform L1 weight")
    g.add_argument("--mse-weight", type=float, default=d.mse_weight, help="waveform MSE weight")
    g.add_argument("--mel-weight", type=float, default=d.mel_weight, help="multi-scale log-mel L1 weight")
    g.add_argument("--mel-ramp-steps", type=int, default=argparse.SUPPRESS,
                   help=f"steps for the mel weight to reach it (default: {WARMUP_STEPS}; 0 with --codec)")
    g.add_argument("--adversarial", action="store_true", help="add EnCodec's multi-scale STFT discriminator")
    g.add_argument("--adv-weight", type=float, default=d.adv_weight, help="adversarial (hinge) loss weight")
    g.add_argument("--feat-weight", type=float, default=d.feat_weight, help="feature-matching loss weight")
    g.add_argument("--disc-filters", type=int, default=d.disc_filters, help="discriminator channels")
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="train up to this step")
    g.add_argument("--time-limit", type=float, metavar="MIN", help="stop after MIN minutes of training (and save)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="segments per batch")
    g.add_argument("--segment-seconds", type=float, default=d.segment_seconds, help="segment length (s)")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (betas 0.5, 0.9)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help=f"constant (EnCodec's), or cosine: down to {LR_FLOOR} x --lr at the --max-steps the run "
                        "started with (a resumed run never raises its rate)")  # fmt: skip
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validations")
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept")
    g.add_argument("--valid-fraction", type=float, default=d.valid_fraction,
                   help="share of files held out for validation where metadata.jsonl gives no split")  # fmt: skip
    g.add_argument("--valid-segments", type=int, default=d.valid_segments, help="validation segments evaluated")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    g.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard: losses, validation "
                   "SI-SDR and mel distance, and validation reconstructions (needs the [tensorboard] extra)")
    return p

