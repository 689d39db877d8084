"""A written tune as the melody condition: the argmax chroma of a MIDI file's melody line, frame by frame.

A hum goes  wav -> ChromaExtractor -> argmax bottleneck;  a MIDI file goes  notes -> `melody_line` (the
skyline, the rule training hums are sung from) -> the extractor's frames -> the same argmax. Frame t
of the extractor is centred on sample t * hop (4096 at 32 kHz, 128 ms) and sees a periodic Hann window
w of n_fft samples (16384). A line note n covering samples [a_n, b_n) is taken as a steady tone at its
fundamental f_n, so its power in frame t grows with the square of the window mass it covers:

    m[t, n]      = sum of w(s - t * hop + n_fft / 2) over s in [a_n, b_n)
    energy[t, c] = sum over notes n of  filters[c, bin(f_n)] * m[t, n]^2

with `filters` the extractor's own chroma filter bank, so notes are weighted across octaves exactly
as a hum's fundamentals are. The signal is reflected at both ends (the extractor pads with
reflection) and, like a waveform shorter than n_fft, a tune shorter than one window is centred in one.

Rests: a frame whose window no note reaches has no energy; its argmax is bin 0 (C). That is what the
extractor makes of digital silence (the all-zero chroma row), and the "no melody" condition's bin, so a
rest in a MIDI file means what a silent stretch of a recording means. Near a note a rest frame still
hears that note through the 512 ms window, as it would in a recording.
"""

from __future__ import annotations

from pathlib import Path

import mido
import numpy as np
import torch
from torch import Tensor

from conditioning.chroma import ChromaExtractor, argmax_bottleneck
from conditioning.melody_line import LineNote, melody_line

MIDI_SUFFIXES = (".mid", ".midi")
PERCUSSION_CHANNEL = 9  # General MIDI drums: no pitch to hum


def is_midi(melody: object) -> bool:
    """Whether a melody argument names a MIDI file (a str or Path ending in .mid or .midi)."""
    return isinstance(melody, (str, Path)) and Path(melody).suffix.lower() in MIDI_SUFFIXES


def read_midi_notes(path: str | Path) -> tuple[list[tuple[float, float, int]], float]:
    """(start s, end s, MIDI pitch) of every pitched note in a MIDI file (tempo changes applied,
    percussion channel left out), and the file's length in seconds.

    Raises FileNotFoundError for a missing file and a one-line ValueError for one mido cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"melody file not found: {path}")
    try:
        messages = list(mido.MidiFile(str(path)))  # all tracks merged, msg.time = seconds since the previous one
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as error:
        raise ValueError(f"{path} is not a MIDI file mido can read ({error})") from None
    now = 0.0
    sounding: dict[tuple[int, int], list[float]] = {}  # (channel, pitch) -> start times, oldest first
    notes = []
    for msg in messages:
        now += msg.time
        if msg.type not in ("note_on", "note_off") or msg.channel == PERCUSSION_CHANNEL:
            continue
        key = (msg.channel, msg.note)
        if msg.type == "note_on" and msg.velocity > 0:
            sounding.setdefault(key, []).append(now)
        elif sounding.get(key):
            notes.append((sounding[key].pop(0), now, msg.note))
    notes += [(start, now, pitch) for (_, pitch), starts in sounding.items() for start in starts]
    return notes, now


def line_chroma(line: list[LineNote], seconds: float, extractor: ChromaExtractor) -> Tensor:
    """A monophonic line lasting `seconds` -> one-hot chroma [frames, num_chroma] at the extractor's frames,
    frames = 1 + max(N, n_fft) // hop with N = round(seconds * sample_rate) (as for a waveform of N samples)."""
    sr, n_fft, hop = extractor.sample_rate, extractor.n_fft, extractor.hop_length
    length = min(round(seconds * sr), extractor.max_samples)
    shift = max(0, n_fft - length) // 2  # a short signal is centred in n_fft samples
    frames = 1 + max(length, n_fft) // hop
    times = np.round(np.array([(n.start, n.end) for n in line]) * sr).astype(np.int64)  # [notes, 2] samples
    times = np.minimum(times, length) + shift  # the extractor keeps the first 30 s
    starts, ends = times[:, 0], times[:, 1]
    pitches = np.array([n.pitch for n in line], dtype=np.int64)
    length = max(length, n_fft)
    # reflection padding: sample -s holds sample s, sample L-1+s holds sample L-1-s (s >= 1)
    starts, ends = (np.concatenate([starts, 1 - ends, np.maximum(2 * length - 1 - ends, length)]),
                    np.concatenate([ends, np.minimum(1 - starts, 0), 2 * length - 1 - starts]))
    pitches = np.tile(pitches, 3)
    window = extractor.window.double().numpy()  # [n_fft]
    mass = np.concatenate([[0.0], np.cumsum(window)])  # mass[k] = sum of w[:k]
    left = np.arange(frames)[:, None] * hop - n_fft // 2  # [T, 1] first sample each window sees
    lo = np.clip(starts[None] - left, 0, n_fft)  # [T, notes]
    hi = np.clip(ends[None] - left, 0, n_fft)
    covered = mass[hi] - mass[lo]  # [T, notes]
    hz = 440.0 * 2.0 ** ((pitches - 69) / 12)
    bins = np.clip(np.round(hz * n_fft / sr).astype(np.int64), 0, n_fft // 2)
    weights = extractor.filters.double().numpy()[:, bins]  # [num_chroma, notes]
    energy = (covered**2) @ weights.T  # [T, num_chroma]
    return argmax_bottleneck(torch.from_numpy(energy).float()[None])[0]


def midi_chroma(path: str | Path, extractor: ChromaExtractor) -> Tensor:
    """The melody condition of a MIDI file: one-hot chroma [frames, num_chroma] of its `melody_line`.

    Raises a one-line ValueError when the file holds no pitched notes.
    """
    notes, seconds = read_midi_notes(path)
    line = melody_line(notes)
    if not line:
        raise ValueError(f"{Path(path)} holds no notes; a melody needs at least one")
    return line_chroma(line, max(seconds, line[-1].end), extractor)
