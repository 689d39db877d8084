"""A one-page picture of a generation: waveform, spectrogram and chromagram, and the melody's chromagram.

The chromagrams are the max-normalised chroma the melody conditioner computes before its argmax
bottleneck, so the two panels show what the model was asked to follow next to what it produced.
Figures are drawn with matplotlib's object API (the Agg renderer, no pyplot state), which keeps
plotting safe from worker threads such as the web page's, and needs no display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from conditioning.chroma import ChromaExtractor

from codebooks.audio import replacing

PITCH_CLASSES = ("C", "C♯", "D", "D♯", "E", "F", "F♯", "G", "G♯", "A", "A♯", "B")
SPECTROGRAM_FFT = 2048
SPECTROGRAM_HOP = 512
DYNAMIC_RANGE_DB = 80.0  # the spectrogram shows this much below its loudest bin
WAVEFORM_SPANS = 2000  # at most: about two per pixel column of the waveform panel
WAVEFORM_MIN_SPAN = 0.01  # seconds: a 100 Hz period
SPECTROGRAM_FRAMES = 1500  # at most; longer audio gets a longer hop
LOWEST_HZ = 40.0  # bottom of the spectrogram's log frequency axis


def plot_generation(
    path: str | Path,
    audio: np.ndarray,
    sample_rate: int,
    *,
    melody: np.ndarray | None = None,
    melody_sample_rate: int | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of `audio` [C, N]; with `melody` ([N] or [C, N] at `melody_sample_rate`) its
    chromagram is drawn beside the output's. Written under a temporary name and renamed."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {path.name}")
    if not path.parent.is_dir():
        raise ValueError(f"output directory {path.parent} does not exist")
    audio = _channels(audio, "audio", mono_ok=False)
    _check_rate(sample_rate, "sample_rate")
    if melody is not None:
        melody = _channels(melody, "melody", mono_ok=True)
        _check_rate(melody_sample_rate, "melody_sample_rate")
    elif melody_sample_rate is not None:
        raise ValueError("melody_sample_rate was given without a melody")

    figure = Figure(figsize=(10, 8.5 if melody is not None else 7.5), dpi=100, layout="constrained")
    grid = figure.add_gridspec(3, 2, height_ratios=(1, 1.6, 1.2))
    seconds = audio.shape[-1] / sample_rate
    _waveform(figure.add_subplot(grid[0, :]), audio, sample_rate)
    _spectrogram(figure, figure.add_subplot(grid[1, :]), audio.mean(axis=0), sample_rate)
    if melody is None:
        _chromagram(figure, figure.add_subplot(grid[2, :]), audio.mean(axis=0), sample_rate, "Chromagram of the output")
    else:
        _chromagram(figure, figure.add_subplot(grid[2, 0]), audio.mean(axis=0), sample_rate, "Chromagram of the output")
        _chromagram(figure, figure.add_subplot(grid[2, 1]), melody.mean(axis=0), melody_sample_rate, "Chromagram of the melody")
    figure.suptitle(title or f"Generated audio, {seconds:.2f} s at {sample_rate} Hz", fontsize=13)

    with replacing(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def _waveform(ax, audio: np.ndarray, sample_rate: int) -> None:
    """Each channel's min/max envelope over short spans, the usual picture of a waveform: one line
    per sample would cost seconds per minute of audio, and spans shorter than a bass period would
    break the envelope into stripes."""
    span = min(audio.shape[-1], max(audio.shape[-1] // WAVEFORM_SPANS, round(WAVEFORM_MIN_SPAN * sample_rate)))
    spans = audio.shape[-1] // span
    time = (np.arange(spans) * span + span / 2) / sample_rate
    names = ("left", "right") if audio.shape[0] == 2 else [f"channel {i}" for i in range(audio.shape[0])]
    for channel, name in zip(audio, names):
        chunks = channel[: spans * span].reshape(spans, span)
        label = name if audio.shape[0] > 1 else None
        ax.fill_between(time, chunks.min(axis=1), chunks.max(axis=1), linewidth=0.5, alpha=0.7 if label else 1.0, label=label)
    if audio.shape[0] > 1:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(0, audio.shape[-1] / sample_rate)
    limit = max(1.0, float(np.abs(audio).max()))
    ax.set_ylim(-limit, limit)
    ax.set_title("Waveform", fontsize=10, loc="left")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("amplitude")
    ax.grid(alpha=0.3)


def _spectrogram(figure: Figure, ax, mono: np.ndarray, sample_rate: int) -> None:
    wav = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))
    n_fft = SPECTROGRAM_FFT
    if wav.shape[-1] < n_fft:  # a very short clip is padded so that one frame exists
        wav = torch.nn.functional.pad(wav, (0, n_fft - wav.shape[-1]))
    window = torch.hann_window(n_fft)
    hop = max(SPECTROGRAM_HOP, -(-wav.shape[-1] // SPECTROGRAM_FRAMES))
    spec = torch.stft(wav, n_fft, hop, window=window, center=True, return_complex=True).abs()
    db = 20 * torch.log10(spec / window.sum() * 2 + 1e-10).numpy()  # a full-scale sine reads 0 dB
    top = max(float(db.max()), -100.0)
    hz = np.arange(db.shape[0]) * sample_rate / n_fft
    time = np.arange(db.shape[1]) * hop / sample_rate
    # a log frequency axis gives each octave the same height, as a keyboard does; the DC bin is dropped
    image = ax.pcolormesh(time, hz[1:], db[1:], shading="nearest", cmap="magma", vmin=top - DYNAMIC_RANGE_DB, vmax=top, rasterized=True)
    ax.set_yscale("log")
    ax.set_ylim(LOWEST_HZ, sample_rate / 2)
    ax.set_xlim(0, mono.shape[-1] / sample_rate)
    ticks = [f for f in (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000) if f < sample_rate / 2]
    ax.set_yticks(ticks, [f"{f // 1000} k" if f >= 1000 else str(f) for f in ticks])
    ax.yaxis.set_minor_formatter(NullFormatter())
    figure.colorbar(image, ax=ax, label="dB", pad=0.01)
    ax.set_title("Spectrogram (log magnitude)", fontsize=10, loc="left")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")


def _chromagram(figure: Figure, ax, mono: np.ndarray, sample_rate: int, title: str) -> None:
    seconds = mono.shape[-1] / sample_rate
    extractor = ChromaExtractor(sample_rate=sample_rate, chunk_length=seconds + 1.0)
    chroma = extractor(torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))[None])[0]  # [T, 12]
    frame = extractor.hop_length / sample_rate
    image = ax.imshow(
        chroma.numpy().T,
        origin="lower",
        aspect="auto",
        cmap="Blues",
        vmin=0.0,
        vmax=1.0,
        extent=(-frame / 2, chroma.shape[0] * frame - frame / 2, -0.5, 11.5),
        interpolation="nearest",
    )
    figure.colorbar(image, ax=ax, label="relative energy", pad=0.01)
    ax.set_xlim(0, seconds)
    ax.set_yticks(range(12), PITCH_CLASSES, fontsize=8)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("pitch class")


def _channels(audio: np.ndarray, name: str, mono_ok: bool) -> np.ndarray:
    """[C, N] float32; a bare [N] is accepted where `mono_ok` (a melody, as load_melody takes it)."""
    array = np.asarray(audio)
    if array.ndim == 1 and mono_ok:
        array = array[None]
    if array.ndim != 2 or array.shape[-1] == 0 or array.shape[0] == 0:
        shapes = "[samples] or [channels, samples]" if mono_ok else "[channels, samples]"
        raise ValueError(f"{name} must be {shapes}, got shape {np.shape(audio)}")
    if array.shape[0] > array.shape[1]:
        raise ValueError(f"{name} of shape {array.shape} looks like [samples, channels]; pass [channels, samples]")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError(f"{name} must hold finite floating-point samples")
    return array.astype(np.float32, copy=False)


def _check_rate(rate, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{name} must be a positive integer, got {rate!r}")
