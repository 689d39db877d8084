"""Augmented renderings: each excerpt of a piece played in several keys and tempi, captioned by what was played.

A score exists in one key at one tempo, so a model trained on plain renderings can read a piece's
identity instead of its key and tempo words. Rendering every excerpt several times breaks that link:

    piece --cut--> excerpts of `excerpt_seconds` (score time x tempo factor, so each renders that long)
      for each of `variants` draws (distinct transpositions; tempo words drawn evenly):
        notes + k semitones (kept on the keyboard), times / factor  ->  humanised piano     audio/<id>.wav
        the melody line (skyline) of the same notes, hummed by a random voice              melody/<id>.wav
        caption from the facts: key (estimated key + k), BPM (base BPM x factor) and its tempo word,
        metre, composer and form, in varied wording                                        audio/<id>.txt

Tempo words follow quarter-note BPM ranges (TEMPO_WORDS). Whole works keep one split, as plain
renderings do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from conditioning.melody_line import melody_line

from .captions import CaptionFields, _sharps_for, key_name, split_for, tonic_pitch_class
from .performance import Humanize, Note, Performance, PieceInfo, _dominant, describe, humanize
from .render import SAMPLE_RATE, Job, _synth, normalize_rms, piece_rng, write_text, write_wav
from .voice import random_voice, sing

# (word, lowest quarter-note BPM): a tempo belongs to the last word whose bound it reaches
TEMPO_WORDS = (("largo", 0.0), ("adagio", 60.0), ("andante", 76.0), ("moderato", 108.0), ("allegro", 120.0),
               ("presto", 168.0))
TEMPO_RANGE = (40.0, 208.0)  # rendered tempi stay within this (quarter notes per minute)
FACTOR_RANGE = (0.6, 1.6)  # and within this factor of the score's tempo
TRANSPOSE_RANGE = (-6, 5)  # semitones: twelve keys around the written one
PIANO_RANGE = (21, 108)
RELEASE_SECONDS = 0.6  # notes still sounding at the excerpt's end ring this much longer
MIN_EXCERPT_NOTES = 4
ENHARMONIC = {"C#": "Db", "Db": "C#", "D#": "Eb", "Eb": "D#", "F#": "Gb", "Gb": "F#", "G#": "Ab", "Ab": "G#",
              "A#": "Bb", "Bb": "A#"}
# no global tempo change when humanising: the caption's BPM is the rendered one
STEADY = Humanize(tempo_spread=0.0)


def tempo_word(quarter_bpm: float) -> str:
    """``tempo_word(132)`` -> ``"allegro"``."""
    return [word for word, low in TEMPO_WORDS if quarter_bpm >= low][-1]


def transpose_key(key: str, semitones: int) -> str:
    """``transpose_key("Bb major", 2)`` -> ``"C major"``; '' stays ''. Spelled as in a key signature."""
    if not key:
        return ""
    tonic, mode = key.split()
    minor = mode == "minor"
    return key_name(_sharps_for((tonic_pitch_class(tonic) + semitones) % 12, minor, None), minor)


@dataclass(frozen=True)
class Variant:
    semitones: int
    factor: float  # rendered tempo / score tempo


def choose_variants(rng: np.random.Generator, pitches: list[int], base_bpm: float, count: int) -> list[Variant]:
    """`count` variants with distinct transpositions on the keyboard and tempo words drawn evenly.

    The word is drawn first among those reachable from `base_bpm`, then a BPM inside it, so each word
    is about as common as any other whatever the piece's own tempo.
    """
    low, high = min(pitches), max(pitches)
    shifts = [s for s in range(TRANSPOSE_RANGE[0], TRANSPOSE_RANGE[1] + 1)
              if PIANO_RANGE[0] <= low + s and high + s <= PIANO_RANGE[1]] or [0]
    shifts = list(rng.permutation(shifts))
    lo_bpm = max(TEMPO_RANGE[0], base_bpm * FACTOR_RANGE[0])
    hi_bpm = min(TEMPO_RANGE[1], base_bpm * FACTOR_RANGE[1])
    bounds = [low_w for _, low_w in TEMPO_WORDS] + [math.inf]
    spans = [(max(a, lo_bpm), min(b, hi_bpm)) for a, b in zip(bounds, bounds[1:]) if min(b, hi_bpm) > max(a, lo_bpm)]
    variants = []
    for i in range(count):
        a, b = spans[int(rng.integers(len(spans)))] if spans else (base_bpm, base_bpm)
        bpm = float(np.exp(rng.uniform(np.log(a), np.log(b)))) if b > a else a
        variants.append(Variant(int(shifts[i % len(shifts)]), bpm / base_bpm))
    return variants


def excerpt(perf: Performance, t0: float, t1: float, semitones: int = 0, factor: float = 1.0) -> Performance:
    """Notes starting in [t0, t1) of `perf`, moved to time 0, transposed and played `factor` times faster."""
    notes = [
        Note((n.start - t0) / factor, (min(n.end, t1 + RELEASE_SECONDS) - t0) / factor, n.pitch + semitones,
             n.velocity, n.channel)
        for n in perf.notes if t0 <= n.start < t1
    ]

    def moved(t: float) -> float:  # events before the excerpt take effect at its start
        return max(0.0, t - t0) / factor

    return Performance(
        notes=notes,
        controls=[(moved(t), c, cc, v) for t, c, cc, v in perf.controls if t < t1],
        tempos=[(moved(t), bpm * factor) for t, bpm in perf.tempos if t < t1],
        metres=[(moved(t), m) for t, m in perf.metres if t < t1],
        keys=[(moved(t), k) for t, k in perf.keys if t < t1],
        texts=[(moved(t), p) for t, p in perf.texts if t < t1],
        names=list(perf.names),
    )


def excerpt_starts(perf: Performance, seconds: float) -> list[float]:
    """Score times where excerpts of `seconds` begin: every `seconds`, moved back to the nearest onset."""
    onsets = sorted({round(n.start, 3) for n in perf.notes})
    starts = []
    t = 0.0
    while t < perf.duration - seconds / 4:
        starts.append(max([o for o in onsets if o <= t + 1e-6], default=t))
        t += seconds
    return starts


def spell_key(rng: np.random.Generator, key: str) -> str:
    """The key as people write it: sometimes the enharmonic tonic (Eb / D#), sometimes in words (B flat)."""
    tonic, mode = key.split()
    if tonic in ENHARMONIC and rng.random() < 0.25:
        tonic = ENHARMONIC[tonic]
    if len(tonic) == 2 and rng.random() < 0.25:
        tonic = f"{tonic[0]} {'sharp' if tonic[1] == '#' else 'flat'}"
    return f"{tonic} {mode}"


def caption(rng: np.random.Generator, fields: CaptionFields, key: str, bpm: float) -> str:
    """Varied wording of what was rendered: tempo word and/or BPM, key, and some of the context words."""
    composer = fields.composer if rng.random() < 0.7 else ""
    genre = fields.genre if rng.random() < 0.7 else ""
    who = " ".join(x for x in (composer, genre) if x)
    word = tempo_word(bpm)
    tempo_forms = (word, f"{word}, {round(bpm)} bpm", f"{round(bpm)} bpm", f"{word} tempo", f"{word} ({round(bpm)} bpm)")
    tempo = tempo_forms[int(rng.choice(len(tempo_forms), p=(0.35, 0.25, 0.1, 0.15, 0.15)))]
    parts = [tempo]
    if key and rng.random() < 0.92:
        key = spell_key(rng, key)
        key_forms = (key, f"in {key}", f"key of {key}", f"{key} key")
        parts.append(key_forms[int(rng.choice(len(key_forms), p=(0.5, 0.3, 0.1, 0.1)))])
    if fields.form and fields.form not in who and rng.random() < 0.5:
        parts.append(fields.form)
    if fields.metre and rng.random() < 0.4:
        parts.append(fields.metre)
    rng.shuffle(parts)
    instrument = ("piano", "piano", "solo piano", "piano piece")[int(rng.integers(4))]
    head = [who] if who else []
    return ", ".join(head + parts + [instrument]) if rng.random() < 0.8 else ", ".join([instrument] + head + parts)


def render_variants(perf: Performance, info: PieceInfo, job: Job) -> list[dict[str, Any]]:
    """Render `job.variants` augmented versions of each excerpt of one piece; return their metadata rows."""
    if not perf.notes:
        raise ValueError("no pitched notes")
    split = split_for(info.work_id)
    out = Path(job.out)
    rows = []
    for index, t0 in enumerate(excerpt_starts(perf, job.excerpt_seconds)):
        rng = piece_rng(job.seed, f"{info.piece_id}/{index}")  # the same excerpt and seed, the same variants
        base_bpm = _dominant(perf.tempos, t0, t0 + job.excerpt_seconds) or 120.0
        window = [n.pitch for n in perf.notes if t0 <= n.start < t0 + job.excerpt_seconds]
        if len(window) < MIN_EXCERPT_NOTES:
            continue
        for v, variant in enumerate(choose_variants(rng, window, base_bpm, job.variants)):
            t1 = t0 + job.excerpt_seconds * variant.factor  # renders as excerpt_seconds
            played = excerpt(perf, t0, t1, variant.semitones, variant.factor)
            if len(played.notes) < MIN_EXCERPT_NOTES:
                continue
            fields = describe(replace(perf, notes=[n for n in perf.notes if t0 <= n.start < t1]), info, t0, t1)
            key = transpose_key(fields.key, variant.semitones)
            bpm = base_bpm * variant.factor
            played = humanize(played, rng, STEADY)
            samples = int(round((job.excerpt_seconds + RELEASE_SECONDS) * SAMPLE_RATE))
            audio = _synth(job.soundfont).render(played)[:samples]
            audio = normalize_rms(np.pad(audio, (0, samples - len(audio))))
            line = melody_line([(n.start, n.end, n.pitch) for n in played.notes])
            hum = sing(line, samples, random_voice(rng), rng)
            name = f"{info.piece_id}-x{index:03d}-v{v}"
            wav = out / "audio" / info.folder / f"{name}.wav"
            hum_path = out / "melody" / info.folder / f"{name}.wav"
            text = caption(rng, fields, key, bpm)
            write_wav(hum_path, hum)
            write_wav(wav, audio)
            write_text(wav.with_suffix(".txt"), text)
            rows.append({
                "path": wav.relative_to(out).as_posix(),
                "text": text,
                "melody": hum_path.relative_to(out).as_posix(),
                "piece": info.piece_id,
                "work": info.work_id,
                "split": split,
                "seconds": round(samples / SAMPLE_RATE, 3),
                "composer": info.composer or info.folder,
                "source": info.source,
                "key": key,
                "bpm": round(bpm, 2),
                "tempo": tempo_word(bpm),
                "transpose": variant.semitones,
                "tempo_factor": round(variant.factor, 4),
            })
    return rows
