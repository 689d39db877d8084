"""Waveform metrics: SI-SDR, log-mel distance, and Opus round trips to compare a codec against."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from transformers.audio_utils import mel_filter_bank

from codebooks.audio import read_audio
from codebooks.audio import resample as resample_tensor

SAMPLE_RATE = 32000  # every metric works at this rate; other rates are resampled to it first

# log-mel distance
MEL_N_FFT, MEL_HOP, MEL_BANDS = 2048, 512, 80
MEL_FLOOR = 1e-5  # magnitudes below this count as this (-100 dB), so silence does not dominate


# Opus
OPUS_RATE = 48000  # libopus codes at 48 kHz; other input rates are resampled to it
OPUS_MAX_LAG = 0.1  # seconds of codec delay searched when aligning the decoded signal

OPUS_KBPS = 6.0


def to_mono(wav: np.ndarray | Tensor) -> np.ndarray:
    """[N] or [C, N] samples -> float64 [N] (channels averaged)."""
    wav = np.asarray(wav.detach().cpu() if isinstance(wav, Tensor) else wav, dtype=np.float64)
    if wav.ndim == 2:
        wav = wav.mean(axis=0)
    if wav.ndim != 1 or wav.shape[0] == 0:
        raise ValueError(f"expected a non-empty waveform [N] or [C, N], got shape {wav.shape}")
    return wav


def resample(wav: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float64 [N] from `rate` to `target` Hz (julius' windowed-sinc resampler)."""
    return resample_tensor(torch.from_numpy(wav), rate, target).numpy()


def stft_magnitude(wav: np.ndarray, n_fft: int, hop: int, center: bool = True) -> np.ndarray:
    """|STFT| [n_fft // 2 + 1, frames] with a periodic Hann window and frame t starting at t * hop.

    center=True: the signal is first reflect-padded by n_fft // 2 on both sides (zero-padded to
    n_fft // 2 + 1 samples when shorter), so frame t is centred on sample t * hop; 1 + N // hop frames.
    center=False: only whole windows inside the signal (zero-padded to n_fft samples when shorter);
    1 + (N - n_fft) // hop frames.
    """
    shortest = n_fft // 2 + 1 if center else n_fft
    x = torch.from_numpy(np.pad(wav, (0, max(0, shortest - wav.shape[0]))))
    window = torch.hann_window(n_fft, periodic=True, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop, window=window, center=center, pad_mode="reflect", return_complex=True)
    return spec.abs().numpy()


def si_sdr(reference: np.ndarray | Tensor, estimate: np.ndarray | Tensor) -> np.ndarray:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019), of every signal pair:
    reference and estimate [..., N] (equal shapes) -> [...] (a float64 scalar for one pair [N]).

    With s = ref - mean(ref) and e = est - mean(est), the target is the part of e along s,
    t = (<e, s> / <s, s>) s, and the distortion is what is left, d = e - t:

        SI-SDR = 10 log10((|t|^2 + eps) / (|d|^2 + eps)),   eps = 1e-20 |s|^2

    so any rescaled copy of ref scores about +200 dB (the eps ceiling) and added noise at an SNR of
    x dB scores about x dB. A silent estimate scores 0 dB; a constant reference is an error.
    """
    s, e = (np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64) for x in (reference, estimate))
    if s.shape != e.shape:
        raise ValueError(f"reference and estimate differ in length: shapes {s.shape} vs {e.shape}")
    s = s - s.mean(axis=-1, keepdims=True)
    e = e - e.mean(axis=-1, keepdims=True)
    energy = (s * s).sum(axis=-1, keepdims=True)  # [..., 1]
    if (energy == 0.0).any():
        raise ValueError("the reference is constant; SI-SDR is undefined")
    target = (e * s).sum(axis=-1, keepdims=True) / energy * s
    distortion = e - target
    eps = 1e-20 * energy[..., 0]
    return 10.0 * np.log10(((target * target).sum(axis=-1) + eps) / ((distortion * distortion).sum(axis=-1) + eps))


_MEL_FILTERS = mel_filter_bank(
    num_frequency_bins=MEL_N_FFT // 2 + 1, num_mel_filters=MEL_BANDS, min_frequency=0.0,
    max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
)  # [1025, 80]


def log_mel(wav: np.ndarray | Tensor, sr: int) -> np.ndarray:
    """log10 mel magnitude spectrogram [80, 1 + N // 512] of a waveform (resampled to 32 kHz).

    M = F^T |X|, X the STFT of `stft_magnitude` with n_fft 2048 and hop 512, F the 80 Slaney-normalised
    mel filters over 0-16 kHz of transformers' `mel_filter_bank`; the result is log10(max(M, 1e-5)).
    """
    mag = stft_magnitude(resample(to_mono(wav), sr), MEL_N_FFT, MEL_HOP)  # [1025, T]
    return np.log10(np.maximum(_MEL_FILTERS.T @ mag, MEL_FLOOR))


def log_mel_distance(ref: np.ndarray | Tensor, est: np.ndarray | Tensor, sr: int) -> float:
    """Mean absolute difference of the `log_mel` spectrograms of ref and est (equal lengths):

        D = mean over the 80 mels m and the frames t of |log10 M_ref[m, t] - log10 M_est[m, t]|

    0 for identical signals; 1 means the spectra differ by a factor of 10 on average.
    """
    a, b = log_mel(ref, sr), log_mel(est, sr)
    if a.shape != b.shape:
        raise ValueError(f"ref and est differ in length ({a.shape[1]} vs {b.shape[1]} frames)")
    return float(np.abs(a - b).mean())


def best_lag(ref: np.ndarray, est: np.ndarray, max_lag: int) -> int:
    """The delay L in [-max_lag, max_lag] samples maximising the cross-correlation
    sum_t ref[t] * est[t + L], i.e. est lags ref by L samples."""
    n = ref.shape[0] + est.shape[0]
    corr = np.fft.irfft(np.fft.rfft(est, n) * np.conj(np.fft.rfft(ref, n)), n)  # corr[L mod n]
    lags = np.arange(-max_lag, max_lag + 1)
    return int(lags[np.argmax(corr[lags % n])])


def align(ref: np.ndarray, est: np.ndarray, max_lag: int) -> np.ndarray:
    """est shifted by `best_lag` and cut or zero-padded to ref's length."""
    lag = best_lag(ref, est, max_lag)
    shifted = est[lag:] if lag >= 0 else np.concatenate([np.zeros(-lag), est])
    shifted = shifted[: ref.shape[0]]
    return np.pad(shifted, (0, ref.shape[0] - shifted.shape[0]))


def ffmpeg_available() -> bool:
    """Whether an `ffmpeg` program is on PATH (Opus comparisons need it with libopus)."""
    return shutil.which("ffmpeg") is not None


def opus_roundtrip(wav: np.ndarray | Tensor, sr: int, kbps: float = OPUS_KBPS) -> np.ndarray:
    """Encode mono audio with libopus at `kbps` (ffmpeg, 48 kHz) and decode it back: float64 [N] at
    `sr`, aligned on the input (codec delay and pre-skip removed by `best_lag` within 100 ms).

    Raises FileNotFoundError when ffmpeg is missing and RuntimeError when it fails.
    """
    wav = to_mono(wav)
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError("ffmpeg is not installed (Debian: apt-get install ffmpeg)")
    with tempfile.TemporaryDirectory() as tmp:
        source, coded, decoded = Path(tmp, "in.wav"), Path(tmp, "coded.opus"), Path(tmp, "out.wav")
        sf.write(source, wav.astype(np.float32), sr, subtype="FLOAT")
        quiet = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
        steps = (
            [*quiet, "-i", str(source), "-ac", "1", "-ar", str(OPUS_RATE), "-c:a", "libopus", "-b:a", f"{kbps:g}k",
             str(coded)],
            [*quiet, "-i", str(coded), "-ac", "1", "-ar", str(OPUS_RATE), "-c:a", "pcm_f32le", str(decoded)],
        )
        for command in steps:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"ffmpeg failed: {done.stderr.strip() or done.returncode}")
        out, rate = read_audio(decoded, dtype="float64")  # [C, N]
    out = resample(out.mean(axis=0), rate, sr)
    return align(wav, out, round(OPUS_MAX_LAG * sr))
