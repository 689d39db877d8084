"""A voice-like hummed melody for tests: glides between notes, vibrato, soft attacks, breath noise."""

from __future__ import annotations

import numpy as np


def synth_hum(notes: list[int], sample_rate: int = 32000, note_seconds: float = 0.6, seed: int = 0) -> np.ndarray:
    """MIDI note numbers -> mono float32 hum [samples]; 80 ms glides join consecutive notes."""
    rng = np.random.default_rng(seed)
    n_note, n_glide = int(note_seconds * sample_rate), int(0.08 * sample_rate)
    pitch = []
    for i, note in enumerate(notes):
        pitch.append(np.full(n_note, float(note)))
        if i + 1 < len(notes):
            pitch.append(np.linspace(note, notes[i + 1], n_glide))
    midi = np.concatenate(pitch)
    t = np.arange(midi.shape[0]) / sample_rate
    midi = midi + 0.25 * np.sin(2 * np.pi * 5.2 * t + rng.uniform(0, 2 * np.pi))  # vibrato, +-25 cents
    hz = 440.0 * 2.0 ** ((midi - 69) / 12)
    phase = 2 * np.pi * np.cumsum(hz) / sample_rate
    voice = sum(a * np.sin(k * phase) for k, a in enumerate([1.0, 0.5, 0.25, 0.12, 0.06], start=1))
    envelope = np.minimum(1.0, t / 0.05) * np.minimum(1.0, (t[-1] - t) / 0.05)
    breath = np.convolve(rng.standard_normal(t.shape[0]), np.ones(6) / 6, mode="same")
    return (0.3 * envelope * voice + 0.02 * breath).astype(np.float32)
