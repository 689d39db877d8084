"""Music metrics: MusicGen's chroma cosine, the key and mode of a recording, and its onset rate."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from conditioning.chroma import ChromaExtractor, argmax_bottleneck

from ..data.scores.captions import KK_MAJOR, KK_MINOR
from .signal import SAMPLE_RATE, resample, stft_magnitude, to_mono

# onset rate
ONSET_N_FFT, ONSET_HOP = 1024, 256  # 32 ms windows every 8 ms
ONSET_TOP_DB = 80.0  # spectrogram floor below the loudest bin
ONSET_PEAK_FRAMES = 3  # a peak is the largest flux within +-3 frames (+-24 ms)
ONSET_MEAN_FRAMES = 12  # ... and exceeds the mean flux within +-12 frames (+-96 ms) ...
ONSET_DELTA_DB = 1.0  # ... by this many dB
ONSET_MIN_GAP = 0.05  # seconds; a second peak closer than this to the previous onset is dropped

PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

_CHROMA = ChromaExtractor()  # MusicGen's: 32 kHz, n_fft 16384, hop 4096 (128 ms), 12 bins from C


def chroma(wav: np.ndarray | Tensor, sr: int) -> np.ndarray:
    """MusicGen's max-normalised chromagram [frames, 12] (`conditioning.chroma.ChromaExtractor`) of
    the first 30 s of a waveform, resampled to 32 kHz; frames = 1 + max(N, 16384) // 4096."""
    wav = resample(to_mono(wav), sr, _CHROMA.sample_rate)
    return _CHROMA(torch.from_numpy(wav).float()[None])[0].double().numpy()


def chroma_cosine(a_wav: np.ndarray | Tensor, b_wav: np.ndarray | Tensor, sr: int) -> float:
    """MusicGen's melody metric: frame-wise cosine similarity of argmax chromagrams, averaged.

    a = argmax_bottleneck(chroma(a_wav)) and b likewise are one-hot [frames, 12] (the dominant pitch
    class of each 128 ms frame; a silent frame counts as C). Over the first T = min(T_a, T_b)
    frames (both signals start at time 0):

        cosine = (1 / T) sum_t <a_t, b_t> / (|a_t| |b_t|)

    which, for one-hot rows, is the fraction of frames whose dominant pitch classes agree.
    """
    a = argmax_bottleneck(torch.from_numpy(chroma(a_wav, sr)))
    b = argmax_bottleneck(torch.from_numpy(chroma(b_wav, sr)))
    frames = min(a.shape[0], b.shape[0])
    return float(F.cosine_similarity(a[:frames], b[:frames], dim=-1).mean())


def key_scores(wav: np.ndarray | Tensor, sr: int) -> np.ndarray | None:
    """Pearson correlations [2, 12] of the mean chroma with the Krumhansl-Kessler profiles rotated to
    each tonic (row 0 major, row 1 minor; column = tonic pitch class from C), or None when the mean
    chroma is flat (silence), which fits no key."""
    mean = chroma(wav, sr).mean(axis=0)  # [12]
    if np.ptp(mean) == 0:
        return None
    return np.array([[np.corrcoef(mean, np.roll(profile, tonic))[0, 1] for tonic in range(12)]
                     for profile in (KK_MAJOR, KK_MINOR)])


def estimate_mode(wav: np.ndarray | Tensor, sr: int) -> tuple[str, str] | None:
    """The key that best fits a waveform, e.g. ("C", "major"): the tonic and mode whose rotated
    Krumhansl-Kessler profile correlates best with the mean `chroma` over all frames (24 candidate
    keys). None for silence."""
    scores = key_scores(wav, sr)
    if scores is None:
        return None
    mode, tonic = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return PITCH_CLASSES[tonic], ("major", "minor")[mode]


def onset_envelope(wav: np.ndarray | Tensor, sr: int) -> np.ndarray:
    """Spectral flux [frames] of a waveform resampled to 32 kHz, in dB per frequency bin.

    L = 20 log10(max(|X|, |X|_max * 10^-4)), X the STFT of `stft_magnitude` with n_fft 1024, hop 256
    (8 ms) and whole windows only (center=False: padding would invent an onset at either end), so
    the spectrogram spans 80 dB below its loudest bin and the flux does not depend on the gain.
    flux[t] = mean over bins f of max(0, L[f, t] - L[f, t - 1]); flux[0] = 0 (nothing to rise from).
    """
    mag = stft_magnitude(resample(to_mono(wav), sr), ONSET_N_FFT, ONSET_HOP, center=False)  # [F, T]
    peak = mag.max()
    if peak == 0:
        return np.zeros(mag.shape[1])
    level = 20 * np.log10(np.maximum(mag, peak * 10 ** (-ONSET_TOP_DB / 20)))
    rise = np.maximum(0.0, np.diff(level, axis=1)).mean(axis=0)
    return np.concatenate([[0.0], rise])


def onset_times(wav: np.ndarray | Tensor, sr: int) -> np.ndarray:
    """Onset times in seconds: the frames t whose `onset_envelope` value e[t]

      * is the maximum of e over frames [t - 3, t + 3] (+-24 ms),
      * exceeds the mean of e over frames [t - 12, t + 12] (+-96 ms) by at least 1 dB, and
      * comes at least 50 ms after the previous onset (earlier peaks win),

    reported at the window's centre (t * 256 + 512) / 32000 s.
    """
    env = onset_envelope(wav, sr)
    onsets: list[float] = []
    for t in range(env.shape[0]):
        near = env[max(0, t - ONSET_PEAK_FRAMES) : t + ONSET_PEAK_FRAMES + 1]
        around = env[max(0, t - ONSET_MEAN_FRAMES) : t + ONSET_MEAN_FRAMES + 1]
        time = (t * ONSET_HOP + ONSET_N_FFT // 2) / SAMPLE_RATE
        if env[t] == near.max() and env[t] >= around.mean() + ONSET_DELTA_DB:
            if not onsets or time - onsets[-1] >= ONSET_MIN_GAP:
                onsets.append(time)
    return np.array(onsets)


def onset_rate(wav: np.ndarray | Tensor, sr: int) -> float:
    """Onsets per second: len(onset_times(wav, sr)) / (N / sr)."""
    wav = to_mono(wav)
    return len(onset_times(wav, sr)) / (wav.shape[0] / sr)

