"""Measure a MusicGen model: codec fidelity, LM cross-entropy, melody adherence and text adherence.

    python -m musicgen_lite.evaluate {codec,lm,melody,text,all} --model MODEL_DIR --data DATA_DIR \\
        [--split test] [--out report.json] [--max-files N] [--seconds S] [--prompts P] [--seed SEED]

prints one table and writes the same numbers (with per-file / per-prompt detail) as JSON. `--data`
is a folder laid out like `python -m musicgen_lite.data.scores` writes it (audio files and a
metadata.jsonl with "path", "text", "split"); only the codec and LM sections read it. Every number
is reproducible: excerpts are fixed, hums and generations are seeded from `--seed`.

What each section measures (the metric functions below define every quantity precisely):

codec   `--seconds` around the middle of each of up to `--max-files` held-out pieces go through
        the codec (encode, decode) and through Opus at 6 kbps, about the lowest bitrate at which
        Opus still codes music; both are scored against the original with `si_sdr` and
        `log_mel_distance`.
        The codec's bitrate is K * log2(card) * frame_rate / 1000 kbps (goal: at most 2.2).
lm      Teacher-forced cross-entropy of the LM on the same excerpts' codes (cut to the LM's
        `max_duration`), given their captions (and, for melody models, their own chroma, as in
        training), per codebook, in nats
        and as perplexity exp(CE), beside a unigram model of each codebook's code frequencies
        (estimated on as many train-split excerpts, or on the held-out codes when there is no
        train split).
melody  Hums of `random_melody` tunes (`musicgen_lite.hum`) condition generations; `chroma_cosine`
        between each hum and its output, against the same prompts and seeds without a melody
        (goals: at least 0.5 with the melody, at least 0.25 above the figure without).
text    Prompts that differ only in "<tonic> major" / "<tonic> minor": the output's mode by
        `estimate_mode` must match the prompt's (goal: 75 %); prompts that differ only in "allegro"
        / "adagio": the ratio of mean `onset_rate`s (goal: at least 1.2).

pairs   Controlled prompt pairs (key, tempo), hums of new tunes by an unheard voice and a noise
        measure, each beside its ceiling on real held-out renderings: see `musicgen_lite.eval_pairs`
        (`python -m musicgen_lite.evaluate pairs --help`).

The JSON report holds the run's settings ("sections", "split", "seconds", "seed", and "model", "data",
"max_files", "skipped_silent" where they apply) and one object per section run: "codec", "lm",
"melody", "text", each with its means, its goals and "goal_met", and the per-file or per-prompt rows.

Opus needs the ffmpeg program with libopus (Debian: apt-get install ffmpeg); without it the report
says so ("opus": null, "opus_missing") and leaves the Opus column out.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import julius
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.audio_utils import mel_filter_bank

from conditioning.chroma import ChromaExtractor, argmax_bottleneck
from conditioning.null import null_text

from .api import generate
from .audio_data import AudioFile, DataError, scan
from .checkpoints import load_model
from .data.scores.captions import _MAJOR_PROFILE, _MINOR_PROFILE
from .cli import UsageError, _Parser
from .hum import GLIDE_SECONDS, random_melody, synth_hum
from .lm import LMConditions
from .model import MusicGen

SAMPLE_RATE = 32000  # every metric works at this rate; other rates are resampled to it first

# log-mel distance
MEL_N_FFT, MEL_HOP, MEL_BANDS = 2048, 512, 80
MEL_FLOOR = 1e-5  # magnitudes below this count as this (-100 dB), so silence does not dominate

# onset rate
ONSET_N_FFT, ONSET_HOP = 1024, 256  # 32 ms windows every 8 ms
ONSET_TOP_DB = 80.0  # spectrogram floor below the loudest bin
ONSET_PEAK_FRAMES = 3  # a peak is the largest flux within +-3 frames (+-24 ms)
ONSET_MEAN_FRAMES = 12  # ... and exceeds the mean flux within +-12 frames (+-96 ms) ...
ONSET_DELTA_DB = 1.0  # ... by this many dB
ONSET_MIN_GAP = 0.05  # seconds; a second peak closer than this to the previous onset is dropped

# Opus
OPUS_RATE = 48000  # libopus codes at 48 kHz; other input rates are resampled to it
OPUS_MAX_LAG = 0.1  # seconds of codec delay searched when aligning the decoded signal

# key estimation: the Krumhansl-Kessler probe-tone profiles the data builder names keys with, index 0 = tonic
KK_MAJOR, KK_MINOR = _MAJOR_PROFILE, _MINOR_PROFILE
PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

# goals printed beside the measurements
GOAL_BITRATE_KBPS = 2.2
GOAL_MELODY_COSINE = 0.5
GOAL_MELODY_GAIN = 0.25
GOAL_MODE_ACCURACY = 0.75
GOAL_TEMPO_RATIO = 1.2

OPUS_KBPS = 6.0
MIN_PEAK = 1e-4  # an excerpt quieter than this is silence and is skipped
HUM_NOTE_SECONDS = 0.6  # about how long each hummed note lasts
PROMPT_KEYS = ("C", "G", "F", "D", "A", "Bb", "E", "Eb")
MELODY_PROMPTS = ("folk song, andante, piano", "piano sonata, moderato, 4/4, piano", "waltz, allegretto, 3/4, piano",
                  "chorale, adagio, piano")
MODE_PROMPT = "piano sonata, moderato, {key}, 4/4, piano"
TEMPO_PROMPT = "piano sonata, {tempo}, {key} major, 4/4, piano"

SECTIONS = ("codec", "lm", "melody", "text")
DATA_SECTIONS = ("codec", "lm")  # the sections that read --data


# -----------------------------------------------------------------------------------------------
# signal helpers


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
    if rate == target:
        return wav
    return julius.resample_frac(torch.from_numpy(wav), rate, target).numpy()


def stft_magnitude(wav: np.ndarray, n_fft: int, hop: int, center: bool = True) -> np.ndarray:
    """|STFT| [n_fft // 2 + 1, frames] with a periodic Hann window and frame t starting at t * hop.

    center=True: the signal is first reflect-padded by n_fft // 2 on both sides (zero-padded to
    n_fft // 2 + 1 samples when shorter), so frame t is centred on sample t * hop; 1 + N // hop frames.
    center=False: only whole windows inside the signal (zero-padded to n_fft samples when shorter);
    1 + (N - n_fft) // hop frames.
    """
    if center:
        half = n_fft // 2
        wav = np.pad(np.pad(wav, (0, max(0, half + 1 - wav.shape[0]))), half, mode="reflect")
    else:
        wav = np.pad(wav, (0, max(0, n_fft - wav.shape[0])))
    frames = np.lib.stride_tricks.sliding_window_view(wav, n_fft)[::hop]  # [T, n_fft]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    return np.abs(np.fft.rfft(frames * window, axis=-1)).T


# -----------------------------------------------------------------------------------------------
# codec metrics


def si_sdr(ref: np.ndarray | Tensor, est: np.ndarray | Tensor) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (Le Roux et al., 2019).

    With s = ref - mean(ref) and e = est - mean(est) (equal lengths), the target is the part of e
    along s, t = (<e, s> / <s, s>) s, and the distortion is what is left, d = e - t:

        SI-SDR = 10 log10((|t|^2 + eps) / (|d|^2 + eps)),   eps = 1e-20 |s|^2

    so any rescaled copy of ref scores about +200 dB (the eps ceiling) and added noise at an SNR of
    x dB scores about x dB. A silent estimate scores 0 dB.
    """
    s, e = to_mono(ref), to_mono(est)
    if s.shape != e.shape:
        raise ValueError(f"ref and est differ in length: {s.shape[0]} vs {e.shape[0]}")
    s, e = s - s.mean(), e - e.mean()
    energy = float(s @ s)
    if energy == 0.0:
        raise ValueError("the reference is constant; SI-SDR is undefined")
    target = (float(e @ s) / energy) * s
    distortion = e - target
    eps = 1e-20 * energy
    return 10.0 * math.log10((float(target @ target) + eps) / (float(distortion @ distortion) + eps))


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
        out, rate = sf.read(decoded, dtype="float64", always_2d=True)
    out = resample(out.mean(axis=1), rate, sr)
    return align(wav, out, round(OPUS_MAX_LAG * sr))


def codec_bitrate_kbps(model: MusicGen) -> float:
    """K * log2(card) * frame_rate / 1000: the bits the codes of one second take, in kbps."""
    codec = model.codec
    return codec.num_codebooks * math.log2(codec.cardinality) * codec.frame_rate / 1000


# -----------------------------------------------------------------------------------------------
# music metrics

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


# -----------------------------------------------------------------------------------------------
# data


@dataclass
class Excerpt:
    file: AudioFile
    audio: np.ndarray  # mono float64 at the codec rate
    start: float  # seconds into the file


def load_excerpt(path: Path, seconds: float, sr: int) -> tuple[np.ndarray, float]:
    """The `seconds` (at most) around the middle of an audio file, mono float64 at `sr`, and its
    start time in seconds. The middle avoids fade-ins and the silence before the first note."""
    info = sf.info(str(path))
    length = min(info.frames, round(seconds * info.samplerate))
    start = (info.frames - length) // 2
    data, rate = sf.read(str(path), start=start, stop=start + length, dtype="float64", always_2d=True)
    return resample(data.mean(axis=1), rate, sr), start / rate


def split_excerpts(
    files: list[AudioFile], split: str, count: int, seconds: float, sr: int
) -> tuple[list[Excerpt], list[str]]:
    """Excerpts of the first `count` non-silent files of `split` (sorted by path), and the paths of
    the silent ones skipped on the way."""
    excerpts, skipped = [], []
    for file in (f for f in files if f.split == split):
        if len(excerpts) == count:
            break
        audio, start = load_excerpt(file.path, seconds, sr)
        if np.abs(audio).max() < MIN_PEAK:
            skipped.append(file.rel)
            continue
        excerpts.append(Excerpt(file, audio, start))
    return excerpts, skipped


# -----------------------------------------------------------------------------------------------
# sections


def _lm_audio(model: MusicGen, ex: Excerpt) -> np.ndarray:
    """The excerpt cut to the LM's context (`max_duration`), the longest sequence it is trained on."""
    return ex.audio[: round(model.max_duration * model.sample_rate)]


def _codes(model: MusicGen, audio: np.ndarray) -> Tensor:
    """Codec codes [K, T] of a mono waveform at the codec rate."""
    return model.codec.encode(torch.from_numpy(audio).float()[None, None])[0]


def evaluate_codec(model: MusicGen, excerpts: list[Excerpt]) -> dict:
    """SI-SDR and log-mel distance of the codec's reconstruction of each excerpt, beside Opus."""
    sr = model.sample_rate
    opus = ffmpeg_available()
    rows = []
    for ex in excerpts:
        decoded = to_mono(model.codec.decode(_codes(model, ex.audio)[None])[0])[: ex.audio.shape[0]]
        row = {"path": ex.file.rel, "start_seconds": ex.start, "si_sdr_db": si_sdr(ex.audio, decoded),
               "log_mel_distance": log_mel_distance(ex.audio, decoded, sr)}
        if opus:
            coded = opus_roundtrip(ex.audio, sr, OPUS_KBPS)
            row |= {"opus_si_sdr_db": si_sdr(ex.audio, coded),
                    "opus_log_mel_distance": log_mel_distance(ex.audio, coded, sr)}
        rows.append(row)
    report = {
        "bitrate_kbps": codec_bitrate_kbps(model),
        "goal_bitrate_kbps": GOAL_BITRATE_KBPS,
        "si_sdr_db": np.mean([r["si_sdr_db"] for r in rows]),
        "log_mel_distance": np.mean([r["log_mel_distance"] for r in rows]),
        "goal_met": {"bitrate": codec_bitrate_kbps(model) <= GOAL_BITRATE_KBPS},
        "opus": None,
        "files": rows,
    }
    if opus:
        report["opus"] = {"kbps": OPUS_KBPS, "si_sdr_db": np.mean([r["opus_si_sdr_db"] for r in rows]),
                          "log_mel_distance": np.mean([r["opus_log_mel_distance"] for r in rows])}
    else:
        report["opus_missing"] = "ffmpeg not found: no Opus comparison (Debian: apt-get install ffmpeg)"
    return report


def lm_conditions(model: MusicGen, caption: str | None, audio: np.ndarray) -> LMConditions:
    """The conditions the LM is trained with for one excerpt: its caption (the null text when it
    has none) and, for melody models, the argmax chroma of the excerpt itself."""
    emb, mask = model.text([caption or ""])  # [1, L, D], [1, L]
    if caption is None:
        emb, mask = null_text(emb, mask)
    if model.lm.cfg.conditioning == "cross":
        return LMConditions(cross=emb, cross_mask=mask)
    parts = [emb]
    if model.chroma is not None:
        wav = resample(audio, model.sample_rate, model.chroma.extractor.sample_rate)
        parts.insert(0, model.chroma(model.melody_features([torch.from_numpy(wav).float()])))
    return LMConditions(prefix=torch.cat(parts, dim=1))


@torch.no_grad()
def codebook_cross_entropy(model: MusicGen, codes: Tensor, conditions: LMConditions) -> Tensor:
    """Teacher-forced cross-entropy (nats) of every code: codes [B, K, T] -> [B, K, T].

    tokens = pattern.build(codes, special) [B, K, S]; the LM reads steps 0..S-2 and its output at
    step s is the distribution of step s + 1. Shifted so that entry s predicts step s and gathered
    back to frame order with pattern.revert, code (k, t) is scored by -log p(codes[k, t]) under the
    prediction for the slot that holds it; empty pattern slots are never scored.
    """
    frames = codes.shape[-1]
    tokens = model.pattern.build(codes, model.lm.cfg.special_token)  # [B, K, S]
    logits = model.lm(tokens[:, :, :-1], conditions).float()  # [B, K, S-1, card]
    per_step = F.pad(logits, (0, 0, 1, 0))  # [B, K, S, card]: entry s predicts step s (step 0 holds no code)
    predicted = model.pattern.revert(per_step, frames)  # [B, K, T, card]
    return F.cross_entropy(predicted.flatten(0, 2), codes.flatten(), reduction="none").view_as(codes)


def unigram_cross_entropy(train_codes: list[Tensor], test_codes: list[Tensor], card: int) -> Tensor:
    """Cross-entropy (nats) per codebook [K] of held-out codes under each codebook's code frequencies.

    p_k(c) = (n_k(c) + 1) / (N_k + card), n_k(c) the count of code c in codebook k over `train_codes`
    (each [K, T]) and N_k their total (add-one smoothing keeps unseen codes finite);
    CE_k = -mean over the test codes of codebook k of log p_k(code).
    """
    counts = sum(F.one_hot(c.long(), card).sum(dim=1) for c in train_codes).double()  # [K, card]
    log_p = torch.log((counts + 1) / (counts.sum(dim=1, keepdim=True) + card))  # [K, card]
    test = torch.cat([c.long() for c in test_codes], dim=1)  # [K, sum T]
    return -log_p.gather(1, test).mean(dim=1)


def evaluate_lm(model: MusicGen, excerpts: list[Excerpt], train: list[Excerpt]) -> dict:
    """Per-codebook validation cross-entropy and perplexity beside the unigram baseline."""
    audios = [_lm_audio(model, ex) for ex in excerpts]
    codes = [_codes(model, audio) for audio in audios]
    ce = torch.cat([codebook_cross_entropy(model, c[None], lm_conditions(model, ex.file.caption, audio))[0]
                    for c, ex, audio in zip(codes, excerpts, audios)], dim=1).double().mean(dim=1)  # [K]
    baseline_codes = [_codes(model, _lm_audio(model, ex)) for ex in train] if train else codes
    unigram = unigram_cross_entropy(baseline_codes, codes, model.codec.cardinality)
    return {
        "codebooks": [{"ce_nats": float(a), "perplexity": math.exp(a), "unigram_ce_nats": float(b),
                       "unigram_perplexity": math.exp(b)} for a, b in zip(ce.tolist(), unigram.tolist())],
        "mean_ce_nats": float(ce.mean()),
        "mean_unigram_ce_nats": float(unigram.mean()),
        "scored_frames": sum(c.shape[-1] for c in codes),
        "longest_excerpt_seconds": max(c.shape[-1] for c in codes) / model.frame_rate,
        "baseline_source": "train split" if train else "the scored codes themselves (no other train split)",
        "files": [ex.file.rel for ex in excerpts],
    }


def hum_for(seed: int, seconds: float, sr: int) -> tuple[list[int], np.ndarray]:
    """A `random_melody` tune hummed for exactly `seconds`: about one note per 0.6 s, note lengths
    chosen so that notes and glides fill the time."""
    n_notes = max(2, round(seconds / (HUM_NOTE_SECONDS + GLIDE_SECONDS)))
    note_seconds = (seconds - (n_notes - 1) * GLIDE_SECONDS) / n_notes
    notes = random_melody(seed, n_notes)
    wav = synth_hum(notes, sr, note_seconds, seed).astype(np.float64)
    length = round(seconds * sr)
    return notes, np.pad(wav[:length], (0, max(0, length - wav.shape[0])))


def evaluate_melody(model: MusicGen, prompts: int, seconds: float, seed: int) -> dict:
    """Chroma cosine between each hum and the output generated with it, and without any melody."""
    if not model.has_melody:
        return {"skipped": "the model has no melody conditioning"}
    sr = model.chroma.extractor.sample_rate
    texts = [MELODY_PROMPTS[i % len(MELODY_PROMPTS)] for i in range(prompts)]
    hums = [hum_for(seed + i, seconds, sr) for i in range(prompts)]
    wavs = [torch.from_numpy(wav).float() for _, wav in hums]
    with_melody = generate(texts, melody=wavs, melody_sample_rate=sr, duration=seconds, model=model, seed=seed).audio
    without = generate(texts, duration=seconds, model=model, seed=seed).audio  # same seeds, row by row
    rows = []
    for text, (notes, hum), heard, unheard in zip(texts, hums, with_melody, without):
        rows.append({"text": text, "notes": notes,
                     "with_melody": chroma_cosine(hum, resample(to_mono(heard), model.sample_rate, sr), sr),
                     "without_melody": chroma_cosine(hum, resample(to_mono(unheard), model.sample_rate, sr), sr)})
    cos_with = float(np.mean([r["with_melody"] for r in rows]))
    cos_without = float(np.mean([r["without_melody"] for r in rows]))
    return {
        "chroma_cosine_with_melody": cos_with,
        "chroma_cosine_without_melody": cos_without,
        "gain": cos_with - cos_without,
        "goal_with_melody": GOAL_MELODY_COSINE,
        "goal_gain": GOAL_MELODY_GAIN,
        "goal_met": {"with_melody": cos_with >= GOAL_MELODY_COSINE, "gain": cos_with - cos_without >= GOAL_MELODY_GAIN},
        "prompts": rows,
    }


def evaluate_text(model: MusicGen, prompts: int, seconds: float, seed: int) -> dict:
    """Mode accuracy on parallel major/minor prompts and the allegro/adagio onset-rate ratio."""
    keys = [PROMPT_KEYS[i % len(PROMPT_KEYS)] for i in range(prompts)]
    sr = model.sample_rate
    mode_rows = []
    for mode in ("major", "minor"):
        texts = [MODE_PROMPT.format(key=f"{key} {mode}") for key in keys]
        out = generate(texts, duration=seconds, model=model, seed=seed)
        for key, text, audio in zip(keys, texts, out.audio):
            found = estimate_mode(audio, sr)
            mode_rows.append({"text": text, "mode": mode, "estimated_key": None if found is None else " ".join(found),
                              "correct": found is not None and found[1] == mode, "key_correct": found == (key, mode)})
    tempo_rows = []
    for tempo in ("allegro", "adagio"):
        texts = [TEMPO_PROMPT.format(tempo=tempo, key=key) for key in keys]
        out = generate(texts, duration=seconds, model=model, seed=seed)
        tempo_rows += [{"text": text, "tempo": tempo, "onsets_per_second": onset_rate(audio, sr)}
                       for text, audio in zip(texts, out.audio)]
    fast = float(np.mean([r["onsets_per_second"] for r in tempo_rows if r["tempo"] == "allegro"]))
    slow = float(np.mean([r["onsets_per_second"] for r in tempo_rows if r["tempo"] == "adagio"]))
    accuracy = float(np.mean([r["correct"] for r in mode_rows]))
    ratio = fast / slow if slow > 0 else None  # undefined when the adagio outputs have no onsets
    return {
        "mode_accuracy": accuracy,
        "goal_mode_accuracy": GOAL_MODE_ACCURACY,
        "key_accuracy": float(np.mean([r["key_correct"] for r in mode_rows])),  # tonic too; no goal
        "allegro_onsets_per_second": fast,
        "adagio_onsets_per_second": slow,
        "tempo_ratio": ratio,
        "goal_tempo_ratio": GOAL_TEMPO_RATIO,
        "goal_met": {"mode_accuracy": accuracy >= GOAL_MODE_ACCURACY,
                     "tempo_ratio": None if ratio is None else ratio >= GOAL_TEMPO_RATIO},
        "mode_prompts": mode_rows,
        "tempo_prompts": tempo_rows,
    }


# -----------------------------------------------------------------------------------------------
# report


def run_sections(section: str, model: MusicGen, data: Path | None, split: str = "test", max_files: int = 8,
             seconds: float = 10.0, prompts: int = 4, seed: int = 0) -> dict:
    """Run one section ("codec", "lm", "melody", "text") or "all" and return the report dict."""
    sections = SECTIONS if section == "all" else (section,)
    report: dict = {"sections": list(sections), "split": split, "seconds": seconds, "seed": seed}
    if needs_data(section):
        if data is None:
            raise UsageError(f"--data is needed for {' and '.join(needs_data(section))}")
        try:
            files = scan(data)
        except DataError as e:
            raise UsageError(str(e)) from None
        excerpts, skipped = split_excerpts(files, split, max_files, seconds, model.sample_rate)
        if not excerpts:
            present = sorted({f.split for f in files})
            raise UsageError(f"no non-silent {split} files in {data} (splits present: {', '.join(present)})")
        report |= {"data": str(data), "max_files": max_files, "skipped_silent": skipped}
        if "codec" in sections:
            report["codec"] = evaluate_codec(model, excerpts)
        if "lm" in sections:
            train = [] if split == "train" else split_excerpts(files, "train", max_files, seconds, model.sample_rate)[0]
            report["lm"] = evaluate_lm(model, excerpts, train)
    if "melody" in sections:
        report["melody"] = evaluate_melody(model, prompts, seconds, seed)
    if "text" in sections:
        report["text"] = evaluate_text(model, prompts, seconds, seed)
    return report


def needs_data(section: str) -> list[str]:
    """The sections among `section` ("all" is every one) that read the data folder."""
    return [s for s in DATA_SECTIONS if section in (s, "all")]


def _status(met: bool | None) -> str:
    return "" if met is None else ("ok" if met else "below goal")


def table_rows(report: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(section, metric, value, reference, goal, status) rows of the printed table."""
    rows = []
    if "codec" in report:
        c, opus = report["codec"], report["codec"]["opus"]

        def opus_value(key: str, spec: str) -> str:
            return f"opus {opus[key]:{spec}}" if opus else "opus: no ffmpeg"

        rows += [
            ("codec", "bitrate (kbps)", f"{c['bitrate_kbps']:.2f}", opus_value("kbps", ".2f"),
             f"<= {GOAL_BITRATE_KBPS}", _status(c["goal_met"]["bitrate"])),
            ("codec", "SI-SDR (dB)", f"{c['si_sdr_db']:.2f}", opus_value("si_sdr_db", ".2f"), "", ""),
            ("codec", "log-mel distance", f"{c['log_mel_distance']:.3f}", opus_value("log_mel_distance", ".3f"), "", ""),
        ]
    if "lm" in report:
        lm = report["lm"]
        for k, cb in enumerate(lm["codebooks"]):
            rows.append(("lm", f"codebook {k} CE nats (ppl)", f"{cb['ce_nats']:.3f} ({cb['perplexity']:.1f})",
                         f"unigram {cb['unigram_ce_nats']:.3f} ({cb['unigram_perplexity']:.1f})", "", ""))
        rows.append(("lm", "mean CE nats", f"{lm['mean_ce_nats']:.3f}", f"unigram {lm['mean_unigram_ce_nats']:.3f}",
                     "", ""))
    if "melody" in report:
        m = report["melody"]
        if "skipped" in m:
            rows.append(("melody", "chroma cosine", "skipped", m["skipped"], "", ""))
        else:
            rows += [
                ("melody", "chroma cosine with melody", f"{m['chroma_cosine_with_melody']:.3f}",
                 f"without {m['chroma_cosine_without_melody']:.3f}", f">= {GOAL_MELODY_COSINE}",
                 _status(m["goal_met"]["with_melody"])),
                ("melody", "gain over no melody", f"{m['gain']:+.3f}", "", f">= {GOAL_MELODY_GAIN}",
                 _status(m["goal_met"]["gain"])),
            ]
    if "text" in report:
        t = report["text"]
        ratio = "n/a" if t["tempo_ratio"] is None else f"{t['tempo_ratio']:.2f}"
        rows += [
            ("text", "major/minor mode accuracy", f"{100 * t['mode_accuracy']:.0f} %",
             f"key {100 * t['key_accuracy']:.0f} %", f">= {100 * GOAL_MODE_ACCURACY:.0f} %",
             _status(t["goal_met"]["mode_accuracy"])),
            ("text", "allegro/adagio onset-rate ratio", ratio,
             f"{t['allegro_onsets_per_second']:.2f} / {t['adagio_onsets_per_second']:.2f} per s",
             f">= {GOAL_TEMPO_RATIO}",
             _status(t["goal_met"]["tempo_ratio"])),
        ]
    return rows


def format_table(report: dict) -> str:
    header = ("section", "metric", "value", "reference", "goal", "status")
    rows = [header, *table_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m musicgen_lite.evaluate",
                description="Measure codec fidelity, LM cross-entropy, melody and text adherence of a model.")
    p.add_argument("section", choices=(*SECTIONS, "all"))
    p.add_argument("--model", required=True, help="model directory (ours or a transformers MusicGen checkpoint)")
    p.add_argument("--data", type=Path, help="data folder (audio + metadata.jsonl); needed by codec and lm")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"), help="held-out split (default test)")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    p.add_argument("--max-files", type=_positive(int), default=8, help="held-out files to score (default 8)")
    p.add_argument("--seconds", type=_positive(float), default=10.0,
                   help="seconds per excerpt and per generation (default 10)")
    p.add_argument("--prompts", type=_positive(int), default=4,
                   help="prompts per condition for melody and text (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hums and of generation (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pairs"]:
        from .eval_pairs import main as pairs_main

        return pairs_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if needs_data(args.section) and args.data is None:  # before the (slow) model load
            raise UsageError(f"--data is needed for {' and '.join(needs_data(args.section))}")
        try:
            model = load_model(args.model)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
        report = {"model": str(args.model)} | run_sections(args.section, model, args.data, args.split, args.max_files,
                                                        args.seconds, args.prompts, args.seed)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
