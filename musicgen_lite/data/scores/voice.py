"""A hummed melody track for training: the melody line sung by a random voice.

Users hum one line; the model learns to follow it only if it is trained on hums too. Every rendering
gets its own voice, so no single timbre becomes the condition:

    line notes -> octave into the voice's range, detune, onset jitter, glides between close notes
      -> f0 with vibrato (rate, depth, delayed onset)           control rate, then per sample
      -> harmonics k * f0 weighted by a vowel's formant envelope (additive synthesis)
      -> note envelopes (attack, release), breath noise under the voiced parts

The track has exactly the length of the piano audio, so the chroma of any segment of it lines up
with the segment's tokens. Evaluation sings with another method (a source-filter voice), so
melody adherence is never measured on this timbre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conditioning.melody_line import LineNote

CONTROL_HZ = 1000  # f0 and envelopes are computed at this rate, then interpolated
MAX_HARMONIC_HZ = 4000.0
MAX_HARMONICS = 10  # the chroma and the ear need little above the formants
# (F1, F2, F3) in Hz of sung vowels a, o, u, e and a closed-mouth hum
VOWELS = ((730, 1090, 2440), (570, 840, 2410), (300, 870, 2240), (530, 1840, 2480), (250, 1000, 2300))


@dataclass(frozen=True)
class Voice:
    """One singer: range, vibrato, vowel and manner."""

    center: int  # MIDI pitch the line's median is moved near (by octaves)
    vibrato_hz: float
    vibrato_cents: float
    vibrato_delay: float  # seconds into a note before vibrato sets in
    formants: tuple[float, float, float]
    bandwidth: float  # formant bandwidth in Hz
    tilt: float  # spectral slope of the source, dB per octave
    detune_cents: float  # the whole line is this far off pitch
    jitter: float  # std of onset timing error, seconds
    glide: float  # portamento between notes closer than 60 ms, seconds
    attack: float
    breath: float  # noise level relative to the voice


def random_voice(rng: np.random.Generator) -> Voice:
    """A singer drawn from a broad range of plausible voices."""
    vowel = VOWELS[int(rng.integers(len(VOWELS)))]
    scale = float(rng.uniform(0.85, 1.2))  # vocal tract length
    return Voice(
        center=int(rng.integers(50, 71)),
        vibrato_hz=float(rng.uniform(4.0, 6.8)),
        vibrato_cents=float(rng.choice([0.0, rng.uniform(10, 70)], p=[0.15, 0.85])),
        vibrato_delay=float(rng.uniform(0.0, 0.3)),
        formants=tuple(f * scale for f in vowel),
        bandwidth=float(rng.uniform(60, 160)),
        tilt=float(rng.uniform(-12, -4)),
        detune_cents=float(rng.uniform(-35, 35)),
        jitter=float(rng.uniform(0.0, 0.04)),
        glide=float(rng.uniform(0.02, 0.12)),
        attack=float(rng.uniform(0.02, 0.09)),
        breath=float(rng.uniform(0.0, 0.08)),
    )


def _formant_gain(hz: np.ndarray, voice: Voice) -> np.ndarray:
    """Linear amplitude of the vowel's envelope at frequencies `hz` (any shape)."""
    env = np.full(hz.shape, 0.05)
    for i, f in enumerate(voice.formants):
        env += (0.6**i) / (1.0 + ((hz - f) / voice.bandwidth) ** 2)
    tilt = 10 ** (voice.tilt * np.log2(np.maximum(hz, 50.0) / 100.0) / 20)
    return env * tilt


def sing(line: list[LineNote], samples: int, voice: Voice, rng: np.random.Generator, sample_rate: int = 32000) -> np.ndarray:
    """The line hummed by `voice`: float32 [samples], peak 0.5 (silence where the line rests)."""
    out = np.zeros(samples, dtype=np.float32)
    if not line:
        return out
    n_ctrl = samples * CONTROL_HZ // sample_rate + 2
    t_ctrl = np.arange(n_ctrl) / CONTROL_HZ
    shift = 12 * round((voice.center - float(np.median([n.pitch for n in line]))) / 12)
    midi = np.full(n_ctrl, np.nan)
    amp = np.zeros(n_ctrl)
    onset_at = np.zeros(n_ctrl)  # time since the current note began, for the vibrato delay
    previous_end, previous_pitch = None, None
    for note in line:
        start = max(0.0, note.start + float(np.clip(rng.normal(0, voice.jitter), -0.08, 0.08)))
        end = max(start + 0.04, note.end - 0.01)
        a, b = int(start * CONTROL_HZ), min(n_ctrl, int(end * CONTROL_HZ))
        if a >= b:
            continue
        pitch = note.pitch + shift + voice.detune_cents / 100
        midi[a:b] = pitch
        if previous_end is not None and start - previous_end < 0.06:  # legato: glide from the last note
            g = min(b - a, max(1, int(voice.glide * CONTROL_HZ)))
            midi[a : a + g] = np.linspace(previous_pitch, pitch, g)
        ramp = np.minimum(1.0, (t_ctrl[a:b] - t_ctrl[a]) / voice.attack)
        release = np.minimum(1.0, (t_ctrl[b - 1] - t_ctrl[a:b]) / 0.05 + 0.02)
        amp[a:b] = np.maximum(amp[a:b], ramp * np.clip(release, 0, 1))
        onset_at[a:b] = t_ctrl[a:b] - t_ctrl[a]
        previous_end, previous_pitch = end, pitch
    voiced = ~np.isnan(midi)
    if not voiced.any():
        return out
    midi = np.interp(t_ctrl, t_ctrl[voiced], midi[voiced])  # hold pitch through rests (amplitude is 0 there)
    depth = voice.vibrato_cents / 100 * np.clip((onset_at - voice.vibrato_delay) / 0.2, 0, 1)
    midi = midi + depth * np.sin(2 * np.pi * voice.vibrato_hz * t_ctrl + rng.uniform(0, 2 * np.pi))
    t = np.arange(samples) / sample_rate
    f0 = np.interp(t, t_ctrl, 440.0 * 2 ** ((midi - 69) / 12))  # [samples]
    envelope = np.interp(t, t_ctrl, amp)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    f0_ctrl = np.interp(t_ctrl, t, f0)
    rotor = np.exp(1j * phase)  # harmonic k is the imaginary part of rotor**k
    harmonic = np.ones(samples, dtype=np.complex128)
    voice_sum = np.zeros(samples)
    for k in range(1, min(MAX_HARMONICS, int(MAX_HARMONIC_HZ / f0.min())) + 1):
        harmonic *= rotor
        gain = _formant_gain(k * f0_ctrl, voice) * (k * f0_ctrl < MAX_HARMONIC_HZ)
        voice_sum += np.interp(t, t_ctrl, gain) * harmonic.imag
    noise = np.convolve(rng.standard_normal(samples), np.ones(8) / 8, mode="same")
    signal = envelope * (voice_sum / (np.abs(voice_sum).max() + 1e-9) + voice.breath * noise)
    return (0.5 * signal / (np.abs(signal).max() + 1e-9)).astype(np.float32)
