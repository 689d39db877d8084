"""A look-ahead true-peak limiter, so that a loudness target is reached with peaks under a ceiling.

Piano transients sit 18-22 dB above the loudness of the music around them: scaled to -14 LUFS, their
peaks would pass 0 dBFS. Scaling the whole file down until they fit lands it at -18 to -22 LUFS;
instead the limiter turns down only the moments that peak, smoothly, and the loudness is raised again
until the target is met. Per sample n, in dB of attenuation (0 = untouched):

    needed[n]  = true peak of the samples around n (4x oversampled) above the ceiling, at most MAX_REDUCTION_DB
    held[n]    = max(needed[n - look-ahead .. n + look-ahead])   the gain is down before the peak arrives
    released[n]= max(held[n], released[n-1] * decay)      it comes back up with time constant RELEASE_SECONDS
    gain[n]    = mean(released[n - look-ahead .. n])      a linear ramp, never above what n needs

The mean of `released` over the window is at least needed[n] (every term is, by the hold), so the
peaks meet the ceiling wherever MAX_REDUCTION_DB suffices. Where it does not, the limiter stops at the
bound and the whole file is scaled down the rest of the way (audio_io.normalize_loudness then reports
the level it reached). Bounding the reduction and the release keeps the limiter from pumping.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_REDUCTION_DB = 8.0  # the most the limiter turns any moment down
RELEASE_SECONDS = 0.05  # time constant of the gain's return after a peak
LOOKAHEAD_SECONDS = 0.005  # how early the gain starts to go down before a peak
MARGIN_DB = 0.2  # the limiter aims this far under the ceiling: other meters oversample more finely
OVERSAMPLING = 4  # BS.1770-4 Annex 2: the peak of a 4x oversampled signal estimates the true peak
PAD = 256  # zeros that keep the ends of the audio apart when it is oversampled


def oversampled(audio: np.ndarray, factor: int = OVERSAMPLING) -> np.ndarray:
    """[C, N] audio -> float32 [C, N * factor] by band-limited interpolation: the audio's spectrum, with at least
    2 * PAD zeros after it (so that its end does not wrap onto its start), and nothing above its Nyquist."""
    n = audio.shape[-1]
    size = 1 << (n + 2 * PAD - 1).bit_length()
    spectrum = np.fft.rfft(audio.astype(np.float32), size, axis=-1)  # single precision: 4x faster, ample for peaks
    spectrum[..., -1] *= 0.5  # the Nyquist bin stands for a cosine: half of it at +Nyquist, half at -Nyquist
    return np.fft.irfft(spectrum, size * factor, axis=-1)[..., : n * factor] * factor


def peak_envelope(audio: np.ndarray) -> np.ndarray:
    """[C, N] audio -> [N]: the largest absolute value of any channel within each sample period,
    4x oversampled (the true peak between sample n and n + 1 counts for n)."""
    up = np.abs(oversampled(audio)).max(axis=0)  # [N * 4]
    return np.maximum(up.reshape(-1, OVERSAMPLING).max(axis=1), np.abs(audio).max(axis=0))


def sliding_max(x: np.ndarray, half: int) -> np.ndarray:
    """[N] -> [N]: the largest of x[n - half .. n + half] (the window cut at the ends)."""
    t = torch.from_numpy(np.ascontiguousarray(x))[None, None]
    return torch.nn.functional.max_pool1d(t, 2 * half + 1, stride=1, padding=half)[0, 0].numpy()


def limiter_gain(audio: np.ndarray, sample_rate: int, ceiling_db: float, max_reduction_db: float = MAX_REDUCTION_DB) -> np.ndarray:
    """[C, N] audio -> [N] linear gains <= 1 that bring its true peaks under `ceiling_db` dBTP, where
    `max_reduction_db` suffices. See the module docstring for the four steps."""
    n = audio.shape[-1]
    with np.errstate(divide="ignore"):
        needed = np.clip(20.0 * np.log10(peak_envelope(audio)) - ceiling_db, 0.0, max_reduction_db)  # [N] dB
    ahead = max(1, round(LOOKAHEAD_SECONDS * sample_rate))
    held = sliding_max(needed, ahead)  # [N]
    # released[n] = max over k <= n of held[k] * decay^(n - k): a running maximum in the log domain
    log_decay = -1.0 / (RELEASE_SECONDS * sample_rate)
    steps = np.arange(n) * log_decay
    with np.errstate(divide="ignore"):
        released = np.exp(steps + np.maximum.accumulate(np.log(held) - steps))
    sums = np.cumsum(np.pad(released, (ahead, 0), mode="edge"))  # the window before n repeats released[0]
    ramp = (sums[ahead:] - np.concatenate([[0.0], sums[: n - 1]])) / (ahead + 1)  # mean of released[n - ahead .. n]
    return 10.0 ** (-ramp / 20.0)


def limit(audio: np.ndarray, sample_rate: int, ceiling_db: float, max_reduction_db: float = MAX_REDUCTION_DB) -> np.ndarray:
    """[C, N] audio with its true peak at most `ceiling_db` dBTP: the look-ahead limiter, then (where
    its bound was not enough) the whole signal scaled down by what is still missing."""
    out = audio * limiter_gain(audio, sample_rate, ceiling_db - MARGIN_DB, max_reduction_db)[None, :]
    ceiling = 10.0 ** (ceiling_db / 20.0)
    highest = peak_envelope(out).max()
    return out * (ceiling / highest) if highest > ceiling else out
