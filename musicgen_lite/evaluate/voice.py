"""A singer training never heard: new tunes sung by a source-filter voice, for melody-adherence tests.

Training hums (`musicgen_lite.hum` and the data builder's melody tracks) are additive: a sum of sine
harmonics under a formant envelope, legato glides, a steady sine vibrato. The test voice here is made
another way, so a model cannot pass by recognising the timbre:

    glottal source   Rosenberg pulses (open 40 %, closing 16 % of each period), differentiated for
                     lip radiation, plus aspiration noise gated by the open phase
    vocal tract      a cascade of second-order resonators (Klatt's digital formant filters) at the
                     formants of a sung vowel; one vowel per note ("oo", "oh", "eh")
    articulation     each note is its own syllable: 25 ms onset ramp, a 35-cent scoop up to pitch,
                     vibrato that fades in after 200 ms at 4.5-6.5 Hz, random pitch drift (jitter),
                     and a short breath gap before the next note

`new_tune` writes the tunes: phrases of mixed rhythms (not `random_melody`'s even notes) in a major or
minor key, drawn from their own seed family (`TUNE_SEED_FAMILY` is part of every generator's seed,
so no seed here reproduces a `random_melody` or test-fixture tune), ending each phrase on a chord tone
and the last on the tonic, with rests between phrases.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.signal import lfilter

TUNE_SEED_FAMILY = 0x51C6  # the first word of every seed sequence here; random_melody seeds have one word
MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)
RHYTHMS = (  # beat lengths of one bar of 4/4, to pick from for each bar
    (1, 1, 1, 1), (2, 1, 1), (1, 1, 2), (1.5, 0.5, 1, 1), (0.5, 0.5, 1, 2), (1, 0.5, 0.5, 2), (3, 1),
)
MOVES = (-3, -2, -1, 1, 2, 3, 4)  # scale-degree steps between notes
MOVE_WEIGHTS = (0.07, 0.18, 0.25, 0.25, 0.15, 0.06, 0.04)
# (frequency Hz, bandwidth Hz) of the first three formants of sung vowels. An open "a" (F1 800 Hz) is
# left out: below C4 it lifts the third harmonic (a fifth up) over the fundamental's pitch class in the
# chroma argmax in a third of the frames, so the hum itself would no longer carry its tune.
VOWELS = {
    "o": ((450, 70), (800, 80), (2830, 100)),
    "u": ((325, 50), (700, 60), (2700, 170)),
    "e": ((400, 60), (1600, 80), (2700, 120)),
}
OPEN_PHASE, CLOSING_PHASE = 0.4, 0.16  # Rosenberg pulse shape, fractions of a period


class TuneNote(NamedTuple):
    start: float  # beats
    beats: float
    pitch: int  # MIDI note number


class Tune(NamedTuple):
    notes: list[TuneNote]
    beats: float  # total length in beats, the last rest included
    tonic: int  # pitch class
    mode: str  # "major" | "minor"


def new_tune(seed: int, bars: int = 4) -> Tune:
    """A tune of `bars` 4/4 bars in two phrases (a beat of rest closes the first); its tonic lies between G3
    and F#4 and the tune between a fourth below it and a tenth above its octave."""
    rng = np.random.default_rng([TUNE_SEED_FAMILY, seed])
    tonic = int(rng.integers(0, 12))
    mode = "major" if rng.random() < 0.5 else "minor"
    scale = MAJOR if mode == "major" else MINOR
    home = 60 + tonic if tonic < 7 else 48 + tonic  # the tonic between G3 and F#4
    degree, notes, now = int(rng.choice([0, 2, 4])), [], 0.0
    for bar in range(bars):
        lengths = list(RHYTHMS[int(rng.integers(len(RHYTHMS)))])
        phrase_end = bar == bars // 2 - 1
        if phrase_end:  # breathe: the bar's last beat is a rest
            lengths = lengths[:-1] + ([lengths[-1] - 1] if lengths[-1] > 1 else [])
        for i, length in enumerate(lengths):
            last = bar == bars - 1 and i == len(lengths) - 1
            if last:
                degree = 0 if abs(degree) < abs(degree - 7) else 7
            elif phrase_end and i == len(lengths) - 1:
                degree = min((0, 2, 4, 7), key=lambda d: abs(d - degree))  # a chord tone
            notes.append(TuneNote(now, length, home + 12 * (degree // 7) + scale[degree % 7]))
            now += length
            step = int(rng.choice(MOVES, p=MOVE_WEIGHTS))
            degree = degree + step if -3 <= degree + step <= 9 else degree - step
        if phrase_end:
            now = float(bar + 1) * 4
    return Tune(notes, float(bars * 4), tonic, mode)


def transpose(tune: Tune, semitones: int) -> Tune:
    """The same tune `semitones` higher."""
    notes = [n._replace(pitch=n.pitch + semitones) for n in tune.notes]
    return tune._replace(notes=notes, tonic=(tune.tonic + semitones) % 12)


def note_times(tune: Tune, bpm: float) -> list[tuple[float, float, int]]:
    """(start s, end s, pitch) of each note at `bpm` quarter notes per minute."""
    beat = 60.0 / bpm
    return [(n.start * beat, (n.start + n.beats) * beat, n.pitch) for n in tune.notes]


def _resonator(x: np.ndarray, hz: float, bandwidth: float, sr: int) -> np.ndarray:
    """Klatt's second-order digital resonator: unity gain at 0 Hz, a peak at `hz`."""
    c = -np.exp(-2 * np.pi * bandwidth / sr)
    b = 2 * np.exp(-np.pi * bandwidth / sr) * np.cos(2 * np.pi * hz / sr)
    a = 1 - b - c
    return lfilter([a], [1, -b, -c], x)


def _glottal_pulses(hz: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Differentiated Rosenberg pulses following the frequency track `hz` [N], and the open-phase gate."""
    phase = np.cumsum(hz / sr) % 1.0
    rising = phase < OPEN_PHASE
    closing = (phase >= OPEN_PHASE) & (phase < OPEN_PHASE + CLOSING_PHASE)
    flow = np.where(rising, 0.5 * (1 - np.cos(np.pi * phase / OPEN_PHASE)), 0.0)
    flow = np.where(closing, np.cos(0.5 * np.pi * (phase - OPEN_PHASE) / CLOSING_PHASE), flow)
    return np.diff(flow, prepend=0.0) * sr / hz.mean(), (rising | closing).astype(np.float64)


def sing(notes: list[tuple[float, float, int]], seconds: float, sr: int = 32000, seed: int = 0) -> np.ndarray:
    """(start s, end s, MIDI pitch) notes -> mono float64 [round(seconds * sr)] sung by the source-filter voice."""
    rng = np.random.default_rng([TUNE_SEED_FAMILY, 1, seed])
    out = np.zeros(round(seconds * sr))
    rate, depth = rng.uniform(4.5, 6.5), rng.uniform(0.25, 0.45)  # Hz, semitones
    for start, end, pitch in notes:
        gap = min(0.06, 0.2 * (end - start))  # breath before the next syllable
        first, last = round(start * sr), min(out.shape[0], round((end - gap) * sr))
        if last - first < 0.02 * sr:
            continue
        t = np.arange(last - first) / sr
        scoop = -0.35 * np.exp(-t / 0.03)  # semitones: starts a little flat and slides up
        vibrato = depth * np.minimum(1.0, np.maximum(0.0, t - 0.2) / 0.3) * np.sin(2 * np.pi * rate * t + rng.uniform(0, 6.3))
        drift = np.cumsum(rng.standard_normal(t.shape[0])) * 0.04 / np.sqrt(sr)  # a slow random walk, semitones
        hz = 440.0 * 2.0 ** ((pitch - 69 + scoop + vibrato + drift) / 12)
        pulses, gate = _glottal_pulses(hz, sr)
        source = pulses + 0.03 * gate * rng.standard_normal(t.shape[0])  # aspiration while the glottis is open
        vowel = VOWELS[list(VOWELS)[int(rng.integers(len(VOWELS)))]]
        voice = source
        for hz_formant, bandwidth in vowel:
            voice = _resonator(voice, hz_formant, bandwidth, sr)
        envelope = np.minimum(1.0, t / 0.025) * np.minimum(1.0, (t[-1] - t) / 0.04)
        out[first:last] += envelope * voice
    peak = np.abs(out).max()
    return 0.5 * out / peak if peak > 0 else out
