"""Voice-like hummed melodies: the reference input of melody-adherence measurements and of tests.

A hum is what a user would record: a sine-rich voice that glides between notes, wavers with vibrato
and carries a little breath noise. `random_melody` writes a plausible tune for it to hum: a stepwise
walk through a major or natural-minor scale that starts and ends on the tonic.
"""

from __future__ import annotations

import numpy as np

GLIDE_SECONDS = 0.08  # portamento between consecutive notes
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)  # natural minor
LOWEST_TONIC, HIGHEST_TONIC = 55, 66  # G3..F#4: a comfortable humming range with room above
LOWEST_DEGREE, HIGHEST_DEGREE = -3, 9  # how far the tune may wander below the tonic / above the octave
STEPS = (-4, -2, -1, 1, 2, 4)  # scale-degree moves: mostly steps and thirds, sometimes a fifth
STEP_WEIGHTS = (0.05, 0.2, 0.25, 0.25, 0.2, 0.05)


def synth_hum(notes: list[int], sample_rate: int = 32000, note_seconds: float = 0.6, seed: int = 0) -> np.ndarray:
    """MIDI note numbers -> mono float32 hum [samples]; 80 ms glides join consecutive notes.

    The length is len(notes) * note_seconds + (len(notes) - 1) * 0.08 seconds (whole samples).
    """
    rng = np.random.default_rng(seed)
    n_note, n_glide = int(note_seconds * sample_rate), int(GLIDE_SECONDS * sample_rate)
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


def random_melody(seed: int, n_notes: int = 8) -> list[int]:
    """A tune of `n_notes` MIDI notes (at least 2) in a random major or natural-minor key.

    The first and last notes are the tonic; in between, each note moves through the scale by a
    step, a third or (rarely) a fifth, staying between a fourth below the tonic and a third above
    its octave.
    """
    if n_notes < 2:
        raise ValueError(f"a melody needs at least 2 notes, got {n_notes}")
    rng = np.random.default_rng(seed)
    tonic = int(rng.integers(LOWEST_TONIC, HIGHEST_TONIC + 1))
    scale = MAJOR_SCALE if rng.random() < 0.5 else MINOR_SCALE
    degrees = [0]
    for _ in range(n_notes - 2):
        step = int(rng.choice(STEPS, p=STEP_WEIGHTS))
        nxt = degrees[-1] + step
        if not LOWEST_DEGREE <= nxt <= HIGHEST_DEGREE:
            nxt = degrees[-1] - step  # bounce back into range
        degrees.append(nxt)
    degrees.append(0 if abs(degrees[-1]) <= abs(degrees[-1] - 7) else 7)  # home to the nearer tonic
    return [tonic + 12 * (d // 7) + scale[d % 7] for d in degrees]
