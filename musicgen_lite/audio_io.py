"""Writing generated audio: WAV or FLAC, optional loudness normalisation, never a half-written file.

Loudness follows ITU-R BS.1770-4 (the measure behind the LUFS targets of streaming services):

    audio [C, N] -> K-weighting (high shelf, then high pass) per channel
      -> mean square over 400 ms blocks every 100 ms (75 % overlap)
      -> absolute gate at -70 LUFS, then a relative gate 10 LU below the loudness of what is left
      -> L = -0.691 + 10 log10(sum over channels of the gated mean square)

Channels are weighted 1.0, the standard's weight for left, right and centre: the models here make
mono or stereo. Normalising to a target raises quiet generations and tames loud ones so that outputs
sit at a common level; where the gain would push true peaks over a ceiling (-1 dBTP by default), a
look-ahead limiter (limiter.py) turns those moments down, and the gain is corrected for the loudness
the limiter took, until the target is met or the limiter's bound is reached.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

from codebooks.audio import TOKEN_BYTES, replacing, temporary_name

from .limiter import MAX_REDUCTION_DB, limit, peak_envelope

FORMATS = {".wav": "WAV", ".flac": "FLAC"}
SUBTYPES = ("PCM_16", "FLOAT")
BLOCK_SECONDS = 0.4
HOP_SECONDS = 0.1  # 75 % overlap between consecutive 400 ms blocks
ABSOLUTE_GATE = -70.0  # LUFS
RELATIVE_GATE = -10.0  # LU below the loudness of the blocks that pass the absolute gate
OFFSET = -0.691  # cancels the K-weighting's +0.691 dB at 997 Hz, so a sine reads its RMS level
PEAK_CEILING = -1.0  # dBTP, the ceiling of every loudness-normalised output
TOLERANCE_LU = 0.1  # close enough to a loudness target
MAX_PASSES = 6  # limiting lowers the loudness a little: re-measure and correct the gain at most this often

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


def k_weighted(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """[C, N] audio through the K-weighting biquads from rest, as a product of spectra: the filters'
    frequency responses on an FFT grid that leaves a second of zeros after the audio, which their
    impulse responses (the slowest decays by e^-240 in a second) cannot reach across. The same numbers
    as the recursion to float64 rounding, in a fraction of its time."""
    n = audio.shape[-1]
    size = 1 << (n + sample_rate - 1).bit_length()  # >= n + one second
    z = np.exp(-1j * np.pi * np.arange(size // 2 + 1) / (size // 2))  # e^-jw on the rfft grid
    response = np.ones_like(z)
    for b, a in k_weighting(sample_rate):
        response *= np.polyval(b[::-1], z) / np.polyval(a[::-1], z)  # sum_i b_i z^i / sum_i a_i z^i
    return np.fft.irfft(np.fft.rfft(audio, size, axis=-1) * response, size, axis=-1)[..., :n]


def loudness(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness in LUFS of [C, N] (or mono [N]) audio; -inf when every block is gated.

    Audio shorter than one 400 ms block is measured as a single block, so that short generations
    can still be normalised.
    """
    audio = _as_channels(audio)
    power = _block_power(k_weighted(audio.astype(np.float64), sample_rate), sample_rate)  # [C, blocks]
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
    return float(peak_envelope(_as_channels(audio).astype(np.float64)).max())


class LoudnessWarning(UserWarning):
    """A loudness target was not reached: the peak limiter's bound stopped the gain."""


def normalize_loudness(audio: np.ndarray, sample_rate: int, target: float = -14.0, peak: float = PEAK_CEILING) -> np.ndarray:
    """[C, N] audio scaled to `target` LUFS with true peaks at most `peak` dBTP: a look-ahead limiter
    (limiter.py) turns the peaks down, and the gain is raised by the loudness the limiter took until
    the target is met. Where that would need more than MAX_REDUCTION_DB of limiting, the limiter stops
    at its bound, the result reads below the target and a LoudnessWarning gives the level reached.
    Silence is returned unchanged."""
    out, reached = _normalized(audio, sample_rate, target, peak)
    if short := _shortfall(reached, target, peak):
        warnings.warn(short, LoudnessWarning, stacklevel=2)
    return out


def _normalized(audio: np.ndarray, sample_rate: int, target: float, peak: float) -> tuple[np.ndarray, float]:
    """normalize_loudness's audio, and the loudness it reached (-inf for silence)."""
    _check_db("target", target)
    _check_db("peak", peak)
    audio = _as_channels(audio).astype(np.float32)
    measured = loudness(audio, sample_rate)
    if measured == -math.inf:
        return audio.copy(), measured
    gain_db, best, best_level = target - measured, None, -math.inf
    for _ in range(MAX_PASSES):
        out = limit(audio.astype(np.float64) * 10.0 ** (gain_db / 20.0), sample_rate, peak)
        level = loudness(out, sample_rate)
        improved = best is None or abs(level - target) < abs(best_level - target)
        if improved:
            best, best_level = out, level
        if abs(level - target) <= TOLERANCE_LU or not improved:
            break  # met, or more gain only presses harder against the limiter's bound
        gain_db += target - level
    return best.astype(np.float32), best_level


def _shortfall(reached: float, target: float, peak: float) -> str | None:
    """What to say when the limiter's bound left a (not silent) output short of its target."""
    if not math.isfinite(reached) or reached >= target - TOLERANCE_LU:
        return None
    return (f"reached {reached:.1f} LUFS, not {target:g}: the peaks would need more than "
            f"{MAX_REDUCTION_DB:g} dB of limiting to stay under {peak:g} dBTP")


def write_audio(
    path: str | Path,
    audio: np.ndarray,
    sample_rate: int,
    *,
    subtype: str = "PCM_16",
    loudness: float | None = None,
) -> Path:
    """Write [C, N] float audio to `path` (.wav or .flac, chosen by the suffix); see write_audio_files."""
    return write_audio_files([path], [audio], sample_rate, subtype=subtype, loudness=loudness)[0]


def write_audio_files(
    paths: list[str | Path],
    audios: list[np.ndarray],
    sample_rate: int,
    *,
    subtype: str = "PCM_16",
    loudness: float | None = None,
) -> list[Path]:
    """Write [C, N] float audio to each path (.wav or .flac, chosen by the suffix), all or nothing.

    `subtype` "PCM_16" clips to [-1, 1]; "FLOAT" (WAV only) keeps 32-bit float samples as they are.
    `loudness` (LUFS) normalises first, with a -1 dBTP ceiling (a LoudnessWarning naming the file
    gives the level reached where the limiter's bound stops short of the target). Every path is
    checked before anything is written; each file is encoded in memory, written beside its destination
    under a temporary name, and the names are swapped in only once every file is written. A write that
    fails (a full disk) raises an OSError naming the file and leaves none of them.
    """
    paths = [check_output(p, subtype=subtype, loudness=loudness) for p in paths]
    _check_rate(sample_rate)
    encoded = [_encode(p, a, sample_rate, subtype, loudness) for p, a in zip(paths, audios, strict=True)]
    current = paths[0]
    try:
        with ExitStack() as renames:  # on leaving: every temporary file renamed onto its path, or all removed
            for current, data in zip(paths, encoded):
                renames.enter_context(replacing(current)).write_bytes(data)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {current}: {e.strerror}") from None
    return paths


def _encode(path: Path, audio: np.ndarray, sample_rate: int, subtype: str, loudness: float | None) -> bytes:
    """The bytes of the .wav / .flac file for [C, N] audio, normalised to `loudness` LUFS if given."""
    audio = _as_channels(audio, mono_ok=False)
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples")
    if loudness is not None:
        audio, reached = _normalized(audio, sample_rate, loudness, PEAK_CEILING)
        if short := _shortfall(reached, loudness, PEAK_CEILING):
            warnings.warn(f"{path}: {short}", LoudnessWarning, stacklevel=3)
    if subtype == "PCM_16":
        audio = np.clip(audio, -1.0, 1.0)
    buffer = io.BytesIO()
    sf.write(buffer, np.ascontiguousarray(audio.T), sample_rate, subtype=subtype, format=FORMATS[path.suffix.lower()])
    return buffer.getvalue()


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
    longest = len(temporary_name(path.name, "0" * 2 * TOKEN_BYTES).encode())  # the name written first
    limit = _name_max(parent)
    if longest > limit:
        extra = longest - len(path.name.encode())
        raise ValueError(f"output file name {path.name[:24]}... is too long: {len(path.name.encode())} bytes, "
                         f"at most {limit - extra} here (the file system allows {limit}, less a temporary suffix)")
    return path


def _name_max(directory: Path) -> int:
    """The longest file name, in bytes, that `directory`'s file system allows."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer: the common limit
        return 255


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
