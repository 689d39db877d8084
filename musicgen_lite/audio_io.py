"""Writing generated audio: WAV or FLAC, optional loudness normalisation, never a half-written file.

Loudness follows ITU-R BS.1770-4 (the measure behind the LUFS targets of streaming services):

    audio [C, N] -> K-weighting (high shelf, then high pass) per channel
      -> mean square over 400 ms blocks every 100 ms (75 % overlap)
      -> absolute gate at -70 LUFS, then a relative gate 10 LU below the loudness of what is left
      -> L = -0.691 + 10 log10(sum over channels of the gated mean square)

Channels are weighted 1.0, the standard's weight for left, right and centre: the models here make
mono or stereo. Normalising to a target raises quiet generations and tames loud ones so that outputs
sit at a common level; a true-peak ceiling (-1 dBTP by default) then scales the result down where
the gain would push peaks into clipping, as audiocraft's `audio_write` limits peaks after its
loudness step.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

FORMATS = {".wav": "WAV", ".flac": "FLAC"}
SUBTYPES = ("PCM_16", "FLOAT")
BLOCK_SECONDS = 0.4
HOP_SECONDS = 0.1  # 75 % overlap between consecutive 400 ms blocks
ABSOLUTE_GATE = -70.0  # LUFS
RELATIVE_GATE = -10.0  # LU below the loudness of the blocks that pass the absolute gate
OFFSET = -0.691  # cancels the K-weighting's +0.691 dB at 997 Hz, so a sine reads its RMS level
OVERSAMPLING = 4  # BS.1770-4 Annex 2: the peak of a 4x oversampled signal estimates the true peak

# Analog prototypes of the K-weighting filters: centre frequency (Hz), Q and, for the shelf, its
# high-frequency gain (dB) and the exponent that sets its band term. Bilinear-transformed with
# pre-warping they reproduce the standard's 48 kHz coefficients and keep the response at other rates.
SHELF_HZ, SHELF_Q, SHELF_DB, SHELF_BAND = 1681.974450955533, 0.7071752369554196, 3.999843853973347, 0.4996667741545416
HIGHPASS_HZ, HIGHPASS_Q = 38.13547087602444, 0.5003270373238773


def k_weighting(sample_rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The K-weighting pre-filter at `sample_rate` as two biquads (b, a), a[0] = 1: a high shelf
    (the acoustic effect of the head), then a high pass (the revised low-frequency B-curve)."""
    _check_rate(sample_rate)
    k = math.tan(math.pi * SHELF_HZ / sample_rate)
    vh = 10.0 ** (SHELF_DB / 20.0)
    vb = vh**SHELF_BAND
    norm = 1.0 + k / SHELF_Q + k * k
    shelf_b = np.array([vh + vb * k / SHELF_Q + k * k, 2.0 * (k * k - vh), vh - vb * k / SHELF_Q + k * k]) / norm
    shelf_a = np.array([norm, 2.0 * (k * k - 1.0), 1.0 - k / SHELF_Q + k * k]) / norm
    k = math.tan(math.pi * HIGHPASS_HZ / sample_rate)
    norm = 1.0 + k / HIGHPASS_Q + k * k
    highpass_b = np.array([1.0, -2.0, 1.0])
    highpass_a = np.array([norm, 2.0 * (k * k - 1.0), 1.0 - k / HIGHPASS_Q + k * k]) / norm
    return [(shelf_b, shelf_a), (highpass_b, highpass_a)]


def loudness(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS of [C, N] (or mono [N]) audio; -inf when every block is gated.

    Audio shorter than one 400 ms block is measured as a single block, so that short generations
    can still be normalised.
    """
    from scipy import signal  # imported on first use: a large import that streaming never needs

    audio = _as_channels(audio)
    weighted = audio.astype(np.float64)
    for b, a in k_weighting(sample_rate):
        weighted = signal.lfilter(b, a, weighted, axis=-1)
    power = _block_power(weighted, sample_rate)  # [C, blocks]
    block_loudness = _lufs(power.sum(axis=0))  # [blocks]
    kept = block_loudness > ABSOLUTE_GATE
    if not kept.any():
        return -math.inf
    relative = _lufs(power[:, kept].mean(axis=1).sum()) + RELATIVE_GATE
    kept &= block_loudness > relative
    return float(_lufs(power[:, kept].mean(axis=1).sum()))


def true_peak(audio: np.ndarray) -> float:
    """The largest absolute value of [C, N] audio after 4x oversampling (linear, not dB).

    A sine can peak between samples: at a quarter of the sample rate its samples may sit at 0.707 of
    the true peak. Oversampling by a fixed factor makes the estimate independent of the rate.
    """
    from scipy import signal  # imported on first use, see loudness

    audio = _as_channels(audio).astype(np.float64)
    upsampled = signal.resample_poly(audio, OVERSAMPLING, 1, axis=-1)
    return float(max(np.abs(audio).max(), np.abs(upsampled).max()))


def normalize_loudness(audio: np.ndarray, sample_rate: int, target: float = -14.0, peak: float = -1.0) -> np.ndarray:
    """[C, N] audio scaled to `target` LUFS, then scaled down further if its true peak would exceed
    `peak` dBTP (so the result can read below the target). Silence is returned unchanged."""
    _check_db("target", target)
    _check_db("peak", peak)
    audio = _as_channels(audio).astype(np.float32)
    measured = loudness(audio, sample_rate)
    if measured == -math.inf:
        return audio.copy()
    out = audio * np.float32(10.0 ** ((target - measured) / 20.0))
    ceiling = 10.0 ** (peak / 20.0)
    highest = true_peak(out)
    if highest > ceiling:
        out *= np.float32(ceiling / highest)
    return out


def write_audio(
    path: str | Path,
    audio: np.ndarray,
    sample_rate: int,
    *,
    subtype: str = "PCM_16",
    loudness: float | None = None,
) -> Path:
    """Write [C, N] float audio to `path` (.wav or .flac, chosen by the suffix).

    `subtype` "PCM_16" clips to [-1, 1]; "FLOAT" (WAV only) keeps 32-bit float samples as they are.
    `loudness` (LUFS) normalises first, with a -1 dBTP ceiling. The file is written beside its
    destination under a temporary name and renamed, so a failure never leaves a partial file.
    """
    path = check_output(path, subtype=subtype, loudness=loudness)
    audio = _as_channels(audio, mono_ok=False)
    _check_rate(sample_rate)
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples")
    if loudness is not None:
        audio = normalize_loudness(audio, sample_rate, target=loudness)
    if subtype == "PCM_16":
        audio = np.clip(audio, -1.0, 1.0)
    with replacing(path) as tmp:
        sf.write(tmp, np.ascontiguousarray(audio.T), sample_rate, subtype=subtype, format=FORMATS[path.suffix.lower()])
    return path


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A fresh temporary name beside `path`, renamed onto `path` when the block succeeds and removed
    when it fails, so readers see the old file or the whole new one, never a partial write.

    The file is created with the permissions a plain open() gives (mkstemp's are owner-only).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output(path: str | Path, *, subtype: str = "PCM_16", loudness: float | None = None) -> Path:
    """Refuse an output request before any work is spent on it: a suffix other than .wav/.flac, an
    unknown subtype, a bad loudness target, a directory, or a missing or read-only parent."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"output path must end in .wav or .flac, got {path.name}")
    if subtype not in SUBTYPES:
        raise ValueError(f"subtype must be one of {', '.join(SUBTYPES)}, got {subtype!r}")
    if subtype == "FLOAT" and suffix != ".wav":
        raise ValueError("32-bit float output needs a .wav path; FLAC stores integers only")
    if loudness is not None:
        _check_db("loudness", loudness)
    if path.is_dir():
        raise ValueError(f"output path {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output directory {parent} is not writable")
    return path


def _block_power(weighted: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mean square of each channel over every complete 400 ms block, hop 100 ms: [C, N] -> [C, blocks]."""
    block = round(BLOCK_SECONDS * sample_rate)
    hop = round(HOP_SECONDS * sample_rate)
    squares = weighted**2
    if squares.shape[-1] < block:
        return squares.mean(axis=-1, keepdims=True)
    return sliding_window_view(squares, block, axis=-1)[:, ::hop].mean(axis=-1)


def _lufs(power: np.ndarray | float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return OFFSET + 10.0 * np.log10(power)


def _as_channels(audio: np.ndarray, mono_ok: bool = True) -> np.ndarray:
    """[C, N] float array; [N] becomes [1, N] where `mono_ok`."""
    audio = np.asarray(audio)
    if audio.ndim == 1 and mono_ok:
        audio = audio[None]
    if audio.ndim != 2 or audio.shape[0] == 0 or audio.shape[-1] == 0:
        raise ValueError(f"audio must be [channels, samples] with both > 0, got shape {audio.shape}")
    if audio.shape[0] > audio.shape[1]:
        raise ValueError(f"audio of shape {audio.shape} looks like [samples, channels]; pass [channels, samples]")
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"audio samples must be floating point in [-1, 1], got dtype {audio.dtype}")
    return audio


def _check_db(name: str, value: float) -> None:
    """Loudness targets and peak ceilings are finite levels at or below full scale."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of dB, got {value!r}")
    if value > 0:
        raise ValueError(f"{name} must be <= 0 dB (full scale), got {value}")


def _check_rate(sample_rate: int) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
