"""Build a captioned piano dataset from symbolic scores.

Text-to-music training needs audio paired with the words a person would type.
Public-domain scores are plentiful and carry their own metadata (composer,
movement name, key, metre), so rendering them is a cheap way to get both:

    score (music21) -> MIDI forced to piano (mido) -> humanised performance
      -> SoundFont synthesis at 32 kHz (tinysoundfont) -> loudness-normalised
      wav chunks of at most ten minutes, each with a caption sidecar

The same path renders a folder of the user's own MIDI files (``--midi``).

Output layout under ``--out``::

    audio/<composer>/<piece-id>.wav   32 kHz mono 16-bit
    audio/<composer>/<piece-id>.txt   the caption
    metadata.jsonl                    one JSON line per wav
    .rendered_sources                 sources finished without failures

Whole pieces (whole works, for movement files) are held out for validation
and test by hashing their id, so no tune leaks across splits. Re-running
skips what is already there; every file is written to a temporary name and
renamed. music21, mido and tinysoundfont are imported lazily: the caption
and key helpers below work without them.

    python -m musicgen_lite.data.scores --out data/scores --composers bach mozart
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import re
import sys
import unicodedata
import uuid
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

SAMPLE_RATE = 32_000
MAX_FILE_SECONDS = 600.0  # no output file is longer than this
CUT_SEARCH_SECONDS = 15.0  # look this far back from an even split for a quiet cut
RELEASE_TAIL_SECONDS = 2.5  # let the last notes ring out
TARGET_RMS = 10 ** (-20 / 20)  # loudness of the active (non-silent) part
PEAK_CEILING = 10 ** (-1 / 20)  # never louder than -1 dBFS, so never clipped
VALID_PERCENT = 5
TEST_PERCENT = 5
DRUM_CHANNEL = 9  # General MIDI percussion, which has no piano equivalent

SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf3/MuseScore_General.sf3",
    "/usr/share/sounds/sf3/default-GM.sf3",
)

# --------------------------------------------------------------------------
# Words: tempo phrases, genres, composers, keys


def ascii_words(text: str) -> list[str]:
    """Lower-case ASCII words of ``text``; camelCase and digits split apart."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return [w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", text)]


# Beats per minute a player would take for each tempo word. The beat is the
# quarter note in simple metres; ``quarter_bpm_for_word`` adapts it to others.
TEMPO_WORD_BPM = {
    "grave": 40, "largo": 48, "lento": 54, "larghetto": 60, "adagio": 66,
    "adagietto": 72, "maestoso": 80, "andante": 84, "andantino": 92,
    "moderato": 108, "allegretto": 116, "menuetto": 126, "minuetto": 126,
    "menuet": 126, "marcia": 112, "allegro": 132, "vivace": 152,
    "vivacissimo": 168, "presto": 176, "scherzo": 184, "prestissimo": 200,
}
_TEMPO_LEAD_WORDS = {"poco", "un", "molto", "assai", "tempo", "di"}
_TEMPO_TAIL_WORDS = {"molto", "assai", "non", "troppo", "ma", "con", "brio", "moto", "tanto"}
_LOCAL_TEMPO_CHANGE = re.compile(r"\ba tempo\b|\btempo (i|1|primo)\b|\bpi[uù]\b|\bmeno\b|\bcapo\b")


def tempo_phrase(text: str) -> str | None:
    """The tempo indication in a movement name or expression, lower-cased.

    ``"Menuetto. Allegretto"`` -> ``"menuetto"``, ``"Scherzo (Allegro molto)"``
    -> ``"scherzo"``, ``"Andante con moto quasi Allegretto"`` -> ``"andante con
    moto"``. Local changes (``a tempo``, ``più mosso``) are not a movement's
    tempo and give None.
    """
    for segment in re.split(r"[.,;:()\[\]/\-–—!?\"]+", text):
        if _LOCAL_TEMPO_CHANGE.search(segment.lower()):
            continue
        words = ascii_words(segment)
        hits = [i for i, w in enumerate(words) if w in TEMPO_WORD_BPM]
        if not hits:
            continue
        start = hits[0]
        while start > 0 and words[start - 1] in _TEMPO_LEAD_WORDS:
            start -= 1
        if len(words) - start <= 4:
            return " ".join(words[start:])
        end = hits[0] + 1
        while end < len(words) and end - start < 4 and (
            words[end] in TEMPO_WORD_BPM or words[end] in _TEMPO_TAIL_WORDS
        ):
            end += 1
        return " ".join(words[start:end])
    return None


def metre_beat(metre: str) -> float:
    """Length in quarter notes of the beat a listener counts in ``metre``."""
    numerator, denominator = (int(x) for x in metre.split("/"))
    if denominator == 8 and numerator % 3 == 0 and numerator > 3:
        return 1.5
    return 2.0 if denominator == 2 else 1.0


def quarter_bpm_for_word(word_bpm: float, metre: str | None) -> float:
    """Turn a tempo word's beat rate into quarter notes per minute.

    Fast pieces in 6/8 are felt in dotted quarters and slow ones in eighths;
    alla breve is felt in halves. Without this a Presto in 2/2 would crawl.
    """
    if not metre:
        return word_bpm
    numerator, denominator = (int(x) for x in metre.split("/"))
    fast = word_bpm >= 100
    if denominator == 2:
        return word_bpm * 1.5
    if denominator == 8 and numerator % 3 == 0 and numerator > 3:
        return word_bpm * (1.2 if fast else 0.75)
    if denominator >= 8:
        return word_bpm * (0.75 if fast else 0.5)
    return word_bpm


def word_bpm(phrase: str) -> float:
    """Beat rate of the first tempo word in ``phrase``."""
    return next(TEMPO_WORD_BPM[w] for w in phrase.split() if w in TEMPO_WORD_BPM)


def bpm_bucket(quarter_bpm: float, metre: str | None = None) -> str:
    """A tempo word for pieces whose score names none, from the counted beat."""
    beat_bpm = quarter_bpm / (metre_beat(metre) if metre else 1.0)
    for limit, word in ((56, "very slow"), (80, "slow"), (126, "medium tempo"), (160, "fast")):
        if beat_bpm < limit:
            return word
    return "very fast"


# Genre and form words a user would type, canonical name first, in priority
# order: when a title matches several, the first listed is the genre.
GENRE_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("string quartet", ("string quartet", "quartet", "quartett")),
    ("piano trio", ("piano trio",)),
    ("sonatina", ("sonatina", "sonatine")),
    ("sonata", ("sonata", "sonate")),
    ("concerto", ("concerto", "konzert")),
    ("concertino", ("concertino",)),
    ("symphony", ("symphony", "sinfonia", "symphonie")),
    ("chorale", ("chorale", "choral", "chorales")),
    ("hymn", ("hymn", "hymne")),
    ("minuet", ("minuet", "menuet", "menuetto", "minuetto", "menuett")),
    ("scherzo", ("scherzo",)),
    ("rondo", ("rondo", "rondeau")),
    ("fugue", ("fugue", "fuga", "fuge")),
    ("prelude", ("prelude", "praeludium", "preludio", "preludium")),
    ("invention", ("invention",)),
    ("toccata", ("toccata",)),
    ("fantasia", ("fantasia", "fantasy", "fantasie")),
    ("variations", ("variations", "variation", "variationen")),
    ("march", ("march", "marcia", "marsch", "marche")),
    ("waltz", ("waltz", "valse", "walzer")),
    ("mazurka", ("mazurka",)),
    ("polonaise", ("polonaise",)),
    ("nocturne", ("nocturne", "notturno")),
    ("etude", ("etude", "study")),
    ("impromptu", ("impromptu",)),
    ("ballade", ("ballade",)),
    ("berceuse", ("berceuse", "lullaby")),
    ("barcarolle", ("barcarolle",)),
    ("intermezzo", ("intermezzo",)),
    ("rhapsody", ("rhapsody", "rhapsodie")),
    ("romance", ("romance", "romanze")),
    ("bagatelle", ("bagatelle",)),
    ("gavotte", ("gavotte",)),
    ("sarabande", ("sarabande",)),
    ("allemande", ("allemande",)),
    ("courante", ("courante",)),
    ("bourree", ("bourree",)),
    ("gigue", ("gigue",)),
    ("partita", ("partita",)),
    ("suite", ("suite",)),
    ("rag", ("rag", "ragtime")),
    ("tango", ("tango",)),
    ("polka", ("polka",)),
    ("reel", ("reel",)),
    ("jig", ("jig",)),
    ("hornpipe", ("hornpipe",)),
    ("strathspey", ("strathspey",)),
    ("clog", ("clog",)),
    ("fling", ("fling",)),
    ("schottische", ("schottische",)),
    ("madrigal", ("madrigal", "madrigale")),
    ("motet", ("motet", "motette")),
    ("canon", ("canon",)),
    ("aria", ("aria", "arie")),
    ("kyrie", ("kyrie",)),
    ("gloria", ("gloria",)),
    ("credo", ("credo",)),
    ("sanctus", ("sanctus",)),
    ("benedictus", ("benedictus",)),
    ("agnus dei", ("agnus dei", "agnus")),
    ("folk tune", ("folk tune", "folk song", "folksong", "folk")),
    ("song", ("song", "lied", "chanson")),
)


def genre_words(text: str) -> list[str]:
    """Canonical genre/form words found in ``text``, in priority order."""
    words = ascii_words(text)
    joined = f" {' '.join(words)} "
    return [name for name, aliases in GENRE_WORDS if any(f" {a} " in joined for a in aliases)]


# Surnames in file names or MIDI metadata that identify a composer.
KNOWN_COMPOSERS = {
    name: name
    for name in (
        "albeniz bach bartok beethoven borodin brahms bruckner buxtehude byrd chopin "
        "ciconia clementi corelli couperin czerny debussy dowland dvorak elgar faure "
        "franck gershwin gherardello granados grieg handel haydn hummel janacek joplin "
        "josquin landini liszt lusitano mahler mendelssohn monteverdi mozart mussorgsky "
        "paganini palestrina poulenc prokofiev purcell rachmaninoff rameau ravel satie "
        "scarlatti schoenberg schubert schumann scriabin shostakovich sibelius smetana "
        "stravinsky tchaikovsky telemann verdi vivaldi wagner weber webern zacara"
    ).split()
} | {"haendel": "handel", "rachmaninov": "rachmaninoff", "tschaikowsky": "tchaikovsky"}


def find_composer(*texts: str) -> str:
    """The first known composer surname among the words of ``texts``, or ''."""
    for text in texts:
        for word in ascii_words(text):
            if word in KNOWN_COMPOSERS:
                return KNOWN_COMPOSERS[word]
    return ""


# Key names by number of sharps (negative: flats), -7..7.
_MAJOR_BY_SHARPS = "Cb Gb Db Ab Eb Bb F C G D A E B F# C#".split()
_MINOR_BY_SHARPS = "Ab Eb Bb F C G D A E B F# C# G# D# A#".split()
_SHARPS_BY_NAME = {n: i - 7 for i, n in enumerate(_MAJOR_BY_SHARPS)} | {
    f"{n}m": i - 7 for i, n in enumerate(_MINOR_BY_SHARPS)
}
# Krumhansl-Kessler key profiles: how well each scale degree fits a key.
_MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
_SIGNATURE_BONUS = 0.15  # prefer the keys the written key signature allows
_TONIC_HINT_BONUS = 0.1  # per opening/closing bass note on the tonic
_MIN_KEY_CORRELATION = 0.5  # below this the music is not clearly in a key


def key_name(sharps: int, minor: bool) -> str:
    """``key_name(-2, False)`` -> ``"Bb major"``."""
    table = _MINOR_BY_SHARPS if minor else _MAJOR_BY_SHARPS
    return f"{table[sharps + 7]} {'minor' if minor else 'major'}"


def _sharps_for(tonic: int, minor: bool, signature: int | None) -> int:
    """Key signature of a key given by tonic pitch class, in its usual spelling."""
    major_tonic = (tonic + 3) % 12 if minor else tonic
    if signature is not None and (signature * 7) % 12 == major_tonic:
        return signature
    sharps = (major_tonic * 7) % 12
    return sharps - 12 if sharps > 6 else sharps


def estimate_key(pitch_weights: np.ndarray, signature: int | None, tonic_hints: tuple[int, ...] = ()) -> str:
    """Name the key of a pitch-class histogram, or '' when none fits.

    Correlation with the Krumhansl-Kessler profiles picks major or minor and
    the tonic. Pitch content alone confuses relative keys (Bb major / G minor
    share their notes), so the written signature and the bass notes that open
    and close the music (``tonic_hints``, pitch classes) each add a bonus,
    while modal music without a fitting signature can still win on its own.
    """
    if pitch_weights.sum() <= 0 or np.ptp(pitch_weights) == 0:
        return ""
    best: tuple[float, float, int, bool] | None = None
    for minor, profile in ((False, _MAJOR_PROFILE), (True, _MINOR_PROFILE)):
        for tonic in range(12):
            corr = float(np.corrcoef(pitch_weights, np.roll(profile, tonic))[0, 1])
            sharps = _sharps_for(tonic, minor, signature)
            score = corr + (_SIGNATURE_BONUS if sharps == signature else 0.0)
            score += _TONIC_HINT_BONUS * sum(hint == tonic for hint in tonic_hints)
            if best is None or score > best[0]:
                best = (score, corr, sharps, minor)
    assert best is not None
    _, corr, sharps, minor = best
    return key_name(sharps, minor) if corr >= _MIN_KEY_CORRELATION else ""


@dataclass
class CaptionFields:
    """What a caption says about one audio file; empty fields are left out."""

    composer: str = ""
    genre: str = ""
    form: str = ""
    tempo: str = ""  # a tempo phrase from the score, e.g. "allegro con brio"
    quarter_bpm: float | None = None  # fallback when ``tempo`` is empty
    key: str = ""
    metre: str = ""


def build_caption(fields: CaptionFields) -> str:
    """``"mozart string quartet, menuetto, G major, 3/4, piano"``.

    Composer and genre read as one phrase; a form word is dropped when the
    genre or tempo phrase already says it (menuetto already says minuet).
    """
    head = " ".join(x for x in (fields.composer, fields.genre) if x)
    tempo = fields.tempo
    if not tempo and fields.quarter_bpm:
        tempo = bpm_bucket(fields.quarter_bpm, fields.metre or None)
    form = fields.form
    if form and (form in head or form in genre_words(f"{head} {tempo}")):
        form = ""
    return ", ".join([p for p in (head, form, tempo, fields.key, fields.metre) if p] + ["piano"])


def split_for(work_id: str) -> str:
    """Deterministic train/valid/test split of a whole work by its id."""
    bucket = int(hashlib.sha1(work_id.encode()).hexdigest()[:8], 16) % 100
    if bucket < TEST_PERCENT:
        return "test"
    return "valid" if bucket < TEST_PERCENT + VALID_PERCENT else "train"


def slug(text: str) -> str:
    """File-name-safe lower-case id."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "untitled"


# --------------------------------------------------------------------------
# Performances: timed notes and the context a caption needs


@dataclass
class Note:
    start: float  # seconds
    end: float
    pitch: int
    velocity: int
    channel: int


@dataclass
class Performance:
    """A piece as timed events in seconds, read from a piano MIDI file."""

    notes: list[Note]
    controls: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, ch, cc, value
    tempos: list[tuple[float, float]] = field(default_factory=list)  # t, quarter bpm
    metres: list[tuple[float, str]] = field(default_factory=list)
    keys: list[tuple[float, int]] = field(default_factory=list)  # t, sharps
    texts: list[tuple[float, str]] = field(default_factory=list)  # t, tempo phrase
    names: list[str] = field(default_factory=list)  # track names, title text

    @property
    def duration(self) -> float:
        return max((n.end for n in self.notes), default=0.0)


# Controllers passed to the synth; sustain (64) is applied to note lengths.
_PASSED_CONTROLLERS = (7, 11)
_SUSTAIN = 64
_EARLY_EVENT_SECONDS = 2.0  # context events this close to the start count from 0


def performance_from_midi(mid: Any) -> Performance:
    """Read notes, pedal and context from a ``mido.MidiFile`` (type 0 or 1)."""
    if mid.type == 2:
        raise ValueError("type 2 MIDI files (independent sequences) are not supported")
    perf = Performance(notes=[])
    open_notes: dict[tuple[int, int], list[tuple[float, int]]] = {}
    pedal_start: dict[int, float] = {}
    pedals: dict[int, list[tuple[float, float]]] = {}
    now = 0.0
    for msg in mid:  # tracks merged, delta times in seconds
        now += msg.time
        kind = msg.type
        if kind == "note_on" and msg.velocity > 0:
            open_notes.setdefault((msg.channel, msg.note), []).append((now, msg.velocity))
        elif kind in ("note_on", "note_off"):
            started = open_notes.get((msg.channel, msg.note))
            if started:
                start, velocity = started.pop(0)
                perf.notes.append(Note(start, now, msg.note, velocity, msg.channel))
        elif kind == "control_change" and msg.control == _SUSTAIN:
            if msg.value >= 64 and msg.channel not in pedal_start:
                pedal_start[msg.channel] = now
            elif msg.value < 64 and msg.channel in pedal_start:
                pedals.setdefault(msg.channel, []).append((pedal_start.pop(msg.channel), now))
        elif kind == "control_change" and msg.control in _PASSED_CONTROLLERS:
            perf.controls.append((now, msg.channel, msg.control, msg.value))
        elif kind == "set_tempo":
            perf.tempos.append((now, 60_000_000 / msg.tempo))
        elif kind == "time_signature":
            perf.metres.append((now, f"{msg.numerator}/{msg.denominator}"))
        elif kind == "key_signature" and msg.key in _SHARPS_BY_NAME:
            perf.keys.append((now, _SHARPS_BY_NAME[msg.key]))
        elif kind in ("text", "marker", "cue_marker", "track_name"):
            text = msg.name if kind == "track_name" else msg.text
            phrase = tempo_phrase(text)
            if phrase:
                perf.texts.append((now, phrase))
            if kind == "track_name" or (kind == "text" and now == 0.0):
                perf.names.append(text)
    for (channel, pitch), started in open_notes.items():
        perf.notes.extend(Note(s, now, pitch, v, channel) for s, v in started)
    for channel, start in pedal_start.items():
        pedals.setdefault(channel, []).append((start, now))
    _apply_pedal(perf.notes, pedals)
    perf.notes = _merge_unisons(perf.notes)
    for events in (perf.tempos, perf.metres, perf.keys, perf.texts):
        events[:] = [(0.0 if t < _EARLY_EVENT_SECONDS else t, v) for t, v in events]
    return perf


def _apply_pedal(notes: list[Note], pedals: dict[int, list[tuple[float, float]]]) -> None:
    """Hold notes released under the sustain pedal until the pedal lifts."""
    downs = {channel: [down for down, _ in spans] for channel, spans in pedals.items()}
    for note in notes:
        spans = pedals.get(note.channel)
        if spans:
            i = bisect.bisect_right(downs[note.channel], note.end) - 1
            if i >= 0 and note.end < spans[i][1]:
                note.end = spans[i][1]


def _merge_unisons(notes: list[Note]) -> list[Note]:
    """Fold notes struck together on one key (two voices in unison) into one."""
    notes = sorted(notes, key=lambda n: (n.channel, n.pitch, n.start))
    merged: list[Note] = []
    for note in notes:
        last = merged[-1] if merged else None
        if last and (last.channel, last.pitch) == (note.channel, note.pitch) and note.start - last.start < 0.01:
            last.end = max(last.end, note.end)
            last.velocity = max(last.velocity, note.velocity)
        else:
            merged.append(replace(note, end=max(note.end, note.start + 0.05)))
    return sorted(merged, key=lambda n: n.start)


@dataclass
class Humanize:
    """How far a rendering strays from the written timing and dynamics."""

    tempo_spread: float = 0.04  # global tempo factor drawn from 1 +- spread
    onset_ms: float = 7.0  # std of per-note timing jitter
    max_onset_ms: float = 20.0
    velocity_sd: float = 6.0


def humanize(perf: Performance, rng: np.random.Generator, settings: Humanize = Humanize()) -> Performance:
    """A slightly different performance: tempo, onsets and velocities jittered."""
    factor = float(rng.uniform(1 - settings.tempo_spread, 1 + settings.tempo_spread))
    limit = settings.max_onset_ms / 1000
    notes = []
    for note in perf.notes:
        shift = float(np.clip(rng.normal(0, settings.onset_ms / 1000), -limit, limit))
        start = max(0.0, note.start / factor + shift)
        velocity = int(np.clip(round(note.velocity + rng.normal(0, settings.velocity_sd)), 1, 127))
        notes.append(Note(start, max(start + 0.02, note.end / factor + shift), note.pitch, velocity, note.channel))
    notes.sort(key=lambda n: n.start)
    _release_repeated_keys(notes)
    return Performance(
        notes=notes,
        controls=[(t / factor, c, cc, v) for t, c, cc, v in perf.controls],
        tempos=[(t / factor, bpm * factor) for t, bpm in perf.tempos],
        metres=[(t / factor, m) for t, m in perf.metres],
        keys=[(t / factor, k) for t, k in perf.keys],
        texts=[(t / factor, p) for t, p in perf.texts],
        names=list(perf.names),
    )


def _release_repeated_keys(notes: list[Note]) -> None:
    """End each note before the same key is struck again on its channel.

    Jitter can move a release past the next onset of that key; the synth
    would then cut off the new note.
    """
    last: dict[tuple[int, int], Note] = {}
    for note in notes:  # sorted by start
        previous = last.get((note.channel, note.pitch))
        if previous is not None and previous.end > note.start:
            previous.end = max(previous.start + 0.005, note.start - 0.001)
        last[(note.channel, note.pitch)] = note


def _dominant(events: list[tuple[float, Any]], t0: float, t1: float) -> Any:
    """The value in effect for the longest time within [t0, t1), or None.

    ``events`` are (time, value) changes; before the first one nothing is in
    effect, which competes like any other value.
    """
    spans: dict[Any, float] = {}
    ordered = sorted(events, key=lambda e: e[0])
    bounds = [t for t, _ in ordered] + [math.inf]
    spans[None] = max(0.0, min(bounds[0], t1) - t0)
    for (start, value), end in zip(ordered, bounds[1:]):
        overlap = min(end, t1) - max(start, t0)
        if overlap > 0:
            spans[value] = spans.get(value, 0.0) + overlap
    return max(spans.items(), key=lambda kv: kv[1])[0] if spans else None


def pitch_histogram(notes: list[Note], t0: float, t1: float) -> np.ndarray:
    """Pitch-class weights of the notes sounding in [t0, t1), by duration."""
    weights = np.zeros(12)
    for note in notes:
        overlap = min(note.end, t1) - max(note.start, t0)
        if overlap > 0:
            weights[note.pitch % 12] += min(overlap, 2.0)  # a held note decays on a piano
    return weights


@dataclass
class PieceInfo:
    """What is known about a piece before it is played."""

    piece_id: str
    work_id: str  # pieces of one work (movements) share a split
    source: str
    composer: str  # caption word; '' when unknown
    folder: str  # audio/<folder>/
    genre: str = ""
    forms: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)  # searched first for a tempo phrase


def _bass_pitch_class(notes: list[Note], onset: float) -> int:
    """Pitch class of the lowest note struck within 60 ms of ``onset``."""
    return min(n.pitch for n in notes if abs(n.start - onset) < 0.06) % 12


def describe(perf: Performance, info: PieceInfo, t0: float, t1: float) -> CaptionFields:
    """Caption fields for the stretch [t0, t1) of a performance."""
    metre = _dominant(perf.metres, t0, t1) or ""
    tempo = next((p for p in map(tempo_phrase, info.titles) if p), None)
    tempo = tempo or _dominant(perf.texts, t0, t1) or ""
    bpm = _dominant(perf.tempos, t0, t1) or 120.0  # the MIDI default tempo
    starts = [n.start for n in perf.notes if t0 <= n.start < t1]
    hints = []
    if starts and t0 == 0:
        hints.append(_bass_pitch_class(perf.notes, min(starts)))
    if starts and t1 >= perf.duration:
        hints.append(_bass_pitch_class(perf.notes, max(starts)))
    key = estimate_key(pitch_histogram(perf.notes, t0, t1), _dominant(perf.keys, t0, t1), tuple(hints))
    form = next((f for f in info.forms if f != info.genre), "")
    return CaptionFields(info.composer, info.genre, form, tempo, bpm, key, metre)


# --------------------------------------------------------------------------
# MIDI: force piano, add context events


def _absolute(track: Any) -> list[tuple[int, Any]]:
    tick, events = 0, []
    for msg in track:
        tick += msg.time
        events.append((tick, msg))
    return events


def _track_from_absolute(events: list[tuple[int, Any]]) -> Any:
    """Rebuild a track from (tick, message) pairs; meta events sort first."""
    import mido

    body = [(t, m) for t, m in events if m.type != "end_of_track"]
    body.sort(key=lambda e: (e[0], 0 if e[1].is_meta else 1))
    end = max((t for t, _ in events), default=0)
    track, tick = mido.MidiTrack(), 0
    for t, msg in body + [(end, mido.MetaMessage("end_of_track"))]:
        track.append(msg.copy(time=t - tick))
        tick = t
    return track


def force_piano(mid: Any) -> Any:
    """Copy of a ``mido.MidiFile`` where every channel plays program 0.

    Program changes are all rewritten to 0 (with one at the start of each
    channel a track uses), bank selects are dropped so no other bank sneaks
    in, and the percussion channel is removed: drums have no piano form.
    """
    import mido

    out = mido.MidiFile(type=mid.type, ticks_per_beat=mid.ticks_per_beat)
    for track in mid.tracks:
        kept, channels = [], set()
        for tick, msg in _absolute(track):
            if msg.is_meta or msg.type == "sysex":
                kept.append((tick, msg))
                continue
            if msg.channel == DRUM_CHANNEL or msg.type == "program_change":
                continue
            if msg.type == "control_change" and msg.control in (0, 32):
                continue
            channels.add(msg.channel)
            kept.append((tick, msg))
        programs = [(0, mido.Message("program_change", channel=c, program=0)) for c in sorted(channels)]
        out.tracks.append(_track_from_absolute(programs + kept))  # stable sort: programs before notes
    return out


# --------------------------------------------------------------------------
# Scores (music21)


# (path pattern in the corpus, composer caption word, genre). First match wins;
# a corpus folder not listed here is still rendered under its own name.
CORPUS_RULES: tuple[tuple[str, str, str], ...] = (
    (r"^bach/bwv846", "bach", "prelude"),
    (r"^bach/", "bach", "chorale"),
    (r"^beethoven/", "beethoven", "string quartet"),
    (r"^haydn/", "haydn", "string quartet"),
    (r"^mozart/k545", "mozart", "piano sonata"),
    (r"^mozart/", "mozart", "string quartet"),
    (r"^chopin/", "chopin", "mazurka"),
    (r"^joplin/", "joplin", "rag"),
    (r"^schumann_robert/opus41", "schumann", "string quartet"),
    (r"^schumann_robert/", "schumann", "art song"),
    (r"^schumann_clara/polonaise", "clara schumann", "polonaise"),
    (r"^schumann_clara/", "clara schumann", "piano trio"),
    (r"^cpebach/", "c. p. e. bach", "keyboard sonata"),
    (r"^corelli/", "corelli", "trio sonata"),
    (r"^handel/", "handel", "aria"),
    (r"^verdi/", "verdi", "aria"),
    (r"^schubert/", "schubert", "art song"),
    (r"^weber/", "weber", "concertino"),
    (r"^webern/", "webern", "art song"),
    (r"^schoenberg/", "schoenberg", "piano piece"),
    (r"^beach/", "amy beach", "choral song"),
    (r"^johnson_j_r/", "rosamond johnson", "hymn"),
    (r"^liliuokalani/", "liliuokalani", "song"),
    (r"^leadSheet/berlin", "irving berlin", "ragtime song"),
    (r"^leadSheet/foster", "stephen foster", "song"),
    (r"^palestrina/", "palestrina", "mass"),
    (r"^monteverdi/", "monteverdi", "madrigal"),
    (r"^josquin/", "josquin", "chanson"),
    (r"^lusitano/", "lusitano", "madrigal"),
    (r"^ciconia/", "ciconia", "medieval canon"),
    (r"^(luca|trecento)/.*(gloria|credo|kyrie|agnus|sanctus|benedictus)", "", "medieval mass"),
    (r"^(luca|trecento)/", "", "medieval song"),
    (r"^essenFolksong/han", "", "chinese folk song"),
    (r"^essenFolksong/", "", "folk song"),
    (r"^oneills1850/", "", "irish folk tune"),
    (r"^airdsAirs/", "", "scottish folk tune"),
    (r"^miscFolk/americanfife", "", "fife tune"),
    (r"^(ryansMammoth|miscFolk|nottingham-dataset)/", "", "folk tune"),
)
FOLK_COLLECTIONS = ("essenFolksong", "oneills1850", "ryansMammoth", "airdsAirs", "miscFolk", "nottingham-dataset")
EARLY_COLLECTIONS = ("palestrina", "monteverdi", "josquin", "lusitano", "ciconia", "luca", "trecento")
# music21's velocities (from dynamics and accents) mapped into this range.
SCORE_VELOCITY_RANGE = (36, 104)
# Beat rate for scores that give no tempo; music21 would play them at 120.
GENRE_DEFAULT_BEAT_BPM = {"chorale": 84.0, "hymn": 84.0}
SKIPPED_COLLECTIONS = ("demos", "theoryExercises")  # test fragments, not music
# When one piece exists in several formats, the first has the richest metadata.
FORMAT_PREFERENCE = (".krn", ".mxl", ".musicxml", ".xml", ".abc", ".mid", ".midi")


@dataclass(frozen=True)
class Source:
    """One input file; it may hold several pieces (an ABC tune book)."""

    key: str  # stable name: corpus path or "midi/<path>"
    path: str
    piece_id: str
    work_id: str


def corpus_sources(composers: list[str] | None = None) -> list[Source]:
    """Scores in music21's bundled corpus, one per piece, composers first.

    ``composers`` holds corpus folder names, their prefix before ``_``
    (``schumann``), ``folk`` or ``early``; None means everything.
    """
    from music21 import corpus

    root = Path(corpus.__file__).parent
    by_stem: dict[str, Path] = {}
    for path in map(Path, corpus.getCorePaths()):
        rel = path.relative_to(root)
        if path.suffix not in FORMAT_PREFERENCE or rel.parts[0] in SKIPPED_COLLECTIONS:
            continue
        stem = str(rel.with_suffix(""))
        best = by_stem.get(stem)
        if best is None or FORMAT_PREFERENCE.index(path.suffix) < FORMAT_PREFERENCE.index(best.suffix):
            by_stem[stem] = path
    wanted = None if composers is None else set(composers)
    sources = []
    for stem, path in by_stem.items():
        collection = stem.split("/")[0]
        names = {collection, collection.split("_")[0]}
        names |= {"folk"} if collection in FOLK_COLLECTIONS else set()
        names |= {"early"} if collection in EARLY_COLLECTIONS else set()
        if wanted is not None and not names & wanted:
            continue
        # movement files (".../movement2", corelli's ".../1grave") belong to one work,
        # and so do versions of one chorale (bwv248.23-2, bwv248.23-s)
        parent, name = stem.rsplit("/", 1)
        work = parent if "/" in parent and re.match(r"movement|\d", name) else stem
        work = re.sub(r"^(bach/bwv[\d.]+)-\w+$", r"\1", work)
        rel = str(path.relative_to(root))
        sources.append(Source(rel, str(path), slug(stem), slug(work)))

    def order(source: Source) -> tuple[int, str]:
        collection = source.key.split("/")[0]
        rank = 2 if collection in FOLK_COLLECTIONS else 1 if collection in EARLY_COLLECTIONS else 0
        return rank, source.key

    return sorted(sources, key=order)


def corpus_collections() -> list[str]:
    """Names accepted by ``--composers``."""
    from music21 import corpus

    root = Path(corpus.__file__).parent
    folders = {Path(p).relative_to(root).parts[0] for p in corpus.getCorePaths()}
    names = {f for f in folders if f not in SKIPPED_COLLECTIONS}
    return sorted(names | {n.split("_")[0] for n in names} | {"folk", "early"})


def midi_sources(root: Path) -> list[Source]:
    """Every .mid/.midi file under ``root``, each its own piece and work."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".mid", ".midi"))
    sources, used = [], set()
    for path in files:
        rel = path.relative_to(root).with_suffix("")
        base = piece_id = slug(str(rel))
        n = 1
        while piece_id in used:
            n += 1
            piece_id = f"{base}-{n}"
        used.add(piece_id)
        sources.append(Source(f"midi/{path.relative_to(root)}", str(path), piece_id, piece_id))
    return sources


def _prepare_for_midi(score: Any) -> Any:
    """Fix what makes music21's MIDI writer fail on otherwise fine scores.

    Repeats are played out, and no repeat sign is left for the writer to trip
    on. Some ABC tunes reuse one TimeSignature object in two measures, which
    the writer rejects as a duplicate; each later use gets its own copy.
    Others carry empty parts (just a clef and a tempo) that make repeat
    expansion fail; those are dropped, their tempo kept.
    """
    import copy

    from music21 import bar, clef, key, meter, repeat, spanner, stream, tempo

    empty = [part for part in score.parts if not part.recurse().notes]
    playing = [part for part in score.parts if part.recurse().notes]
    if empty and not playing:
        raise ValueError("the score has no notes")
    if empty:
        first = playing[0].getElementsByClass(stream.Measure).first() or playing[0]
        orphans = [mm for part in empty for mm in part.recurse().getElementsByClass(tempo.MetronomeMark)]
        if orphans and not playing[0].recurse().getElementsByClass(tempo.MetronomeMark).first():
            first.insert(0, copy.deepcopy(orphans[0]))
        for part in empty:
            score.remove(part)
    try:
        score = score.expandRepeats()
    except Exception:  # inconsistent repeat marks: play everything once instead
        pass
    for measure in score.recurse().getElementsByClass(stream.Measure):
        if isinstance(measure.leftBarline, bar.Repeat):
            measure.leftBarline = None
        if isinstance(measure.rightBarline, bar.Repeat):
            measure.rightBarline = bar.Barline("regular")
    for mark in list(score.recurse().getElementsByClass((spanner.RepeatBracket, repeat.RepeatExpression))):
        mark.activeSite.remove(mark)  # the writer expands repeats again and fails on leftovers
    seen: set[int] = set()
    shared = []
    context_classes = (meter.TimeSignature, key.KeySignature, clef.Clef, tempo.TempoIndication)
    for element in score.recurse().getElementsByClass(context_classes):
        if id(element) in seen:
            shared.append((element.activeSite, element))
        seen.add(id(element))
    for site, element in shared:
        site.replace(element, copy.deepcopy(element))
    return score


def _score_tempo_texts(flat: Any) -> list[tuple[float, str]]:
    """(offset in quarters, tempo phrase) for every tempo text in a score."""
    from music21 import expressions, tempo

    found: dict[tuple[float, str], None] = {}
    for element in flat.getElementsByClass((expressions.TextExpression, tempo.TempoIndication)):
        if getattr(element, "textImplicit", False):
            continue  # music21 names bare metronome numbers itself (85 -> "andante moderato")
        text = getattr(element, "content", None) or getattr(element, "text", None)
        phrase = tempo_phrase(text) if isinstance(text, str) else None
        if phrase:
            found[(float(element.offset), phrase)] = None
    return sorted(found)


def score_to_midi(score: Any, default_beat_bpm: float | None = None) -> Any:
    """A music21 score as a piano ``mido.MidiFile`` carrying its tempo texts.

    Velocities are squeezed into SCORE_VELOCITY_RANGE: music21's swing from
    about 45 to 127 with the marked dynamics and accents, which hammers a
    piano (a tenth of a Haydn quartet's notes land at 126-127). Tempo words
    become ``marker`` events for captions. When the score has no
    metronome numbers (most MusicXML quartets only write "Allegro"), those
    words also set the tempo, so an Adagio is not played at 120; music
    before the first word, or without any, goes at ``default_beat_bpm``
    counted in the score's beat (or MIDI's 120 quarter notes when None).
    """
    import io

    import mido
    from music21 import meter, midi, tempo

    score = _prepare_for_midi(score)
    flat = score.flatten()
    texts = _score_tempo_texts(flat)
    numbered = any(
        mm.number is not None and not mm.numberImplicit for mm in flat.getElementsByClass(tempo.MetronomeMark)
    )
    metres = [(float(ts.offset), ts.ratioString) for ts in flat.getElementsByClass(meter.TimeSignature)]
    data = midi.translate.streamToMidiFile(score).writestr()
    mid = force_piano(mido.MidiFile(file=io.BytesIO(data)))
    low, high = SCORE_VELOCITY_RANGE
    for track in mid.tracks:
        for i, msg in enumerate(track):
            if msg.type == "note_on" and msg.velocity > 0:
                track[i] = msg.copy(velocity=round(low + msg.velocity * (high - low) / 127))
    tpq = mid.ticks_per_beat
    added = [(round(off * tpq), mido.MetaMessage("marker", text=phrase)) for off, phrase in texts]
    if not numbered:
        for i, track in enumerate(mid.tracks):
            mid.tracks[i] = _track_from_absolute([e for e in _absolute(track) if e[1].type != "set_tempo"])
        if not texts or texts[0][0] > 0:
            first_metre = metres[0][1] if metres else None
            bpm = 120.0 if default_beat_bpm is None else quarter_bpm_for_word(default_beat_bpm, first_metre)
            added.append((0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm))))
        for off, phrase in texts:
            metre = next((m for o, m in reversed(metres) if o <= off), None)
            bpm = quarter_bpm_for_word(word_bpm(phrase), metre)
            added.append((round(off * tpq), mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm))))
    mid.tracks[0] = _track_from_absolute(_absolute(mid.tracks[0]) + added)
    return mid


def _iter_scores(source: Source) -> Iterator[tuple[str, Any]]:
    """(piece id, score) for each piece in a score file; tune books give many."""
    from music21 import converter, stream

    parsed = converter.parse(source.path, forceSource=True)
    if isinstance(parsed, stream.Opus):
        scores = list(parsed.scores)
        if len(scores) == 1:
            yield source.piece_id, scores[0]
        else:
            for i, score in enumerate(scores, 1):
                yield f"{source.piece_id}-{i:04d}", score
    else:
        yield source.piece_id, parsed


def score_info(source: Source, piece_id: str, score: Any) -> PieceInfo:
    """Caption context of a corpus score from its path and metadata."""
    from music21 import text as m21text

    md = score.metadata
    movement = (md.movementName or "") if md else ""
    if re.search(r"\.(mxl|xml|musicxml|krn|abc)$", movement):
        movement = ""  # music21 fills in the file name when a file has none
    title = (md.title or "") if md else ""
    boxes = [b.content for b in score.getElementsByClass(m21text.TextBox)][:6]
    composer, genre = source.key.split("/")[0].lower(), ""
    for pattern, rule_composer, rule_genre in CORPUS_RULES:
        if re.search(pattern, source.key):
            composer, genre = rule_composer, rule_genre
            break
    if not composer and md is not None and md.composer:
        composer = find_composer(md.composer)  # e.g. Landini in the trecento folder
    stem_words = " ".join(ascii_words(Path(source.key).stem))
    forms = genre_words(" ".join([movement, title, stem_words, *boxes]))
    folder = composer or ("traditional" if genre.endswith(("folk tune", "folk song", "fife tune")) else "anonymous")
    return PieceInfo(
        piece_id=piece_id,
        work_id=source.work_id if piece_id == source.piece_id else piece_id,
        source=source.key,
        composer=composer,
        folder=slug(folder),
        genre=genre,
        forms=forms,
        titles=[t for t in (movement, title, *boxes) if t],
    )


def midi_info(source: Source, perf: Performance) -> PieceInfo:
    """Caption context of a user's MIDI file from its path and meta events."""
    rel = source.key.split("/", 1)[1]
    path_text = " ".join(Path(rel).with_suffix("").parts)
    composer = find_composer(path_text, *perf.names)
    found = genre_words(" ".join([path_text, *perf.names]))
    return PieceInfo(
        piece_id=source.piece_id,
        work_id=source.work_id,
        source=source.key,
        composer=composer,
        folder=slug(composer or "unknown"),
        genre=found[0] if found else "",
        forms=found[1:],
        titles=[Path(rel).stem, *perf.names],
    )


# --------------------------------------------------------------------------
# Audio


def default_soundfont() -> str | None:
    """The best General MIDI SoundFont installed here, or None."""
    import importlib.util

    candidates = list(SOUNDFONT_CANDIDATES)
    spec = importlib.util.find_spec("pretty_midi")
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "TimGM6mb.sf2"))
    return next((c for c in candidates if Path(c).is_file()), None)


class PianoSynth:
    """A SoundFont piano (program 0 on every channel) that renders Performances."""

    def __init__(self, soundfont: str, sample_rate: int = SAMPLE_RATE):
        import tinysoundfont

        self.sample_rate = sample_rate
        self.synth = tinysoundfont.Synth(samplerate=sample_rate)
        self.font = self.synth.sfload(soundfont)

    def render(self, perf: Performance) -> np.ndarray:
        """Mono float32 audio of the performance, with the release tail."""
        synth, sr = self.synth, self.sample_rate
        synth.sounds_off()
        for channel in range(16):
            synth.control_change(channel, 121, 0)  # reset controllers left by the last piece
            synth.program_select(channel, self.font, 0, 0)
        events: list[tuple[float, int, int, int, int]] = []
        for n in perf.notes:
            events += [(n.start, 2, n.channel, n.pitch, n.velocity), (n.end, 1, n.channel, n.pitch, 0)]
        events += [(t, 0, ch, cc, value) for t, ch, cc, value in perf.controls]
        events.sort()
        total = int(math.ceil((perf.duration + RELEASE_TAIL_SECONDS) * sr))
        out = np.zeros(total, dtype=np.float32)
        done = 0

        def advance(to: int) -> None:
            nonlocal done
            while done < to:
                n = min(to - done, 65_536)
                block = np.frombuffer(synth.generate_simple(n), dtype=np.float32)
                out[done : done + n] = block.reshape(n, 2).mean(axis=1)
                done += n

        for t, kind, channel, a, b in events:
            advance(min(total, int(round(t * sr))))
            if kind == 2:
                synth.noteon(channel, a, b)
            elif kind == 1:
                synth.noteoff(channel, a)
            else:
                synth.control_change(channel, a, b)
        advance(total)
        synth.sounds_off()
        return out


def normalize_loudness(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Scale to a common loudness with headroom.

    SoundFonts differ by 20 dB (tinysoundfont plays .sf3 fonts quietly), so
    the RMS of the sounding part is brought to -20 dBFS unless that would push
    the peak above -1 dBFS; then the peak decides. Raises on silence.
    """
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak < 1e-6:
        raise ValueError("rendered audio is silent")
    frame = sample_rate // 20
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame) if len(audio) >= frame else audio[None]
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    active = rms[rms > peak * 10 ** (-50 / 20)]
    loudness = float(np.sqrt(np.mean(active**2))) if active.size else peak
    return (audio * min(TARGET_RMS / loudness, PEAK_CEILING / peak)).astype(np.float32)


def trim_silence(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, floor_db: float = -60.0) -> np.ndarray:
    """Drop the inaudible end of the release tail, keeping 0.2 s."""
    loud = np.flatnonzero(np.abs(audio) > np.max(np.abs(audio)) * 10 ** (floor_db / 20))
    end = int(loud[-1]) + int(0.2 * sample_rate) if loud.size else 0
    return audio[: min(len(audio), end)]


def split_points(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_FILE_SECONDS) -> list[int]:
    """Sample indices where a long rendering is cut into files <= max_seconds.

    Cuts fall at the quietest 50 ms in the CUT_SEARCH_SECONDS before evenly
    spaced points, so no file exceeds the limit and few cuts land mid-note.
    """
    limit = int(max_seconds * sample_rate)
    if len(audio) <= limit:
        return []
    search = int(CUT_SEARCH_SECONDS * sample_rate)
    count = math.ceil(len(audio) / (limit - search))
    frame = sample_rate // 20
    cuts = []
    for i in range(1, count):
        target = i * len(audio) // count
        window = audio[target - search : target]
        energy = np.add.reduceat(window.astype(np.float64) ** 2, np.arange(0, len(window), frame))
        cuts.append(target - search + int(np.argmin(energy)) * frame)
    return cuts


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit mono wav, written atomically."""
    import soundfile

    pcm = np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)
    _atomic_write(path, lambda tmp: soundfile.write(tmp, pcm, sample_rate, subtype="PCM_16", format="WAV"))


def write_text(path: Path, text: str) -> None:
    """UTF-8 text file, written atomically."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


# --------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True)
class Job:
    """Settings shared by every piece of one run."""

    out: str
    soundfont: str
    seed: int = 0


_SYNTHS: dict[str, PianoSynth] = {}  # one loaded SoundFont per process


def _synth(soundfont: str) -> PianoSynth:
    if soundfont not in _SYNTHS:
        _SYNTHS[soundfont] = PianoSynth(soundfont)
    return _SYNTHS[soundfont]


def piece_rng(seed: int, piece_id: str) -> np.random.Generator:
    """The same piece and seed always get the same humanisation."""
    digest = hashlib.sha256(f"{seed}:{piece_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def render_piece(perf: Performance, info: PieceInfo, job: Job) -> list[dict[str, Any]]:
    """Render one performance to wav files + captions; return their metadata rows."""
    if not perf.notes:
        raise ValueError("no pitched notes")
    perf = humanize(perf, piece_rng(job.seed, info.piece_id))
    audio = normalize_loudness(trim_silence(_synth(job.soundfont).render(perf)))
    bounds = [0, *split_points(audio), len(audio)]
    split = split_for(info.work_id)
    rows = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        name = info.piece_id if len(bounds) == 2 else f"{info.piece_id}-part{i + 1}"
        wav = Path(job.out) / "audio" / info.folder / f"{name}.wav"
        end = b / SAMPLE_RATE if b < len(audio) else max(b / SAMPLE_RATE, perf.duration)
        caption = build_caption(describe(perf, info, a / SAMPLE_RATE, end))
        write_wav(wav, audio[a:b])
        write_text(wav.with_suffix(".txt"), caption)
        rows.append({
            "path": wav.relative_to(job.out).as_posix(),
            "text": caption,
            "piece": info.piece_id,
            "split": split,
            "seconds": round((b - a) / SAMPLE_RATE, 3),
            "composer": info.composer or info.folder,
            "source": info.source,
        })
    return rows


class PieceBudget:
    """Shared count of pieces a run may still start (``--max-pieces``)."""

    def __init__(self, value: Any):
        self.value = value  # a multiprocessing Value, or None for no limit

    def exhausted(self) -> bool:
        return self.value is not None and self.value.value <= 0

    def take(self) -> bool:
        if self.value is None:
            return True
        with self.value.get_lock():
            if self.value.value <= 0:
                return False
            self.value.value -= 1
            return True


Emit = Callable[[tuple], None]


def render_source(source: Source, job: Job, done: frozenset[str], budget: PieceBudget, emit: Emit) -> None:
    """Render every piece of one source not in ``done``, reporting through ``emit``.

    Messages: ("rows", rows), ("fail", label, reason), and finally
    ("source", key, failures, complete).
    """
    import mido

    failures, complete = 0, not budget.exhausted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # music21 warns about every odd measure
        try:
            if not complete:
                pieces: Iterator[tuple[str, Any]] = iter(())  # out of budget: do not even parse
            elif source.key.startswith("midi/"):
                pieces = iter([(source.piece_id, None)])
            else:
                pieces = _iter_scores(source)
            for piece_id, score in pieces:
                if piece_id in done:
                    continue
                if not budget.take():
                    complete = False
                    break
                try:
                    if score is None:
                        perf = performance_from_midi(force_piano(mido.MidiFile(source.path)))
                        info = midi_info(source, perf)
                    else:
                        info = score_info(source, piece_id, score)
                        midi_file = score_to_midi(score, GENRE_DEFAULT_BEAT_BPM.get(info.genre))
                        perf = performance_from_midi(midi_file)
                    emit(("rows", render_piece(perf, info, job)))
                except Exception as exc:  # one bad score must not stop the run
                    failures += 1
                    label = source.key if piece_id == source.piece_id else f"{source.key}#{piece_id}"
                    emit(("fail", label, _reason(exc)))
        except Exception as exc:
            failures += 1
            emit(("fail", source.key, _reason(exc)))
    emit(("source", source.key, failures, complete))


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


_WORKER: dict[str, Any] = {}


def _init_worker(messages: Any, budget_value: Any) -> None:
    _WORKER.update(queue=messages, budget=PieceBudget(budget_value))


def _worker_task(args: tuple[Source, Job, frozenset[str]]) -> None:
    source, job, done = args
    render_source(source, job, done, _WORKER["budget"], _WORKER["queue"].put)


class Ledger:
    """The run's bookkeeping in the main process: metadata, resume state, counts."""

    def __init__(self, out: Path):
        self.out = out
        self.metadata = out / "metadata.jsonl"
        self.sources_file = out / ".rendered_sources"
        self.rows: list[dict[str, Any]] = []
        self.pieces_by_source: dict[str, set[str]] = {}
        self.done_sources: set[str] = set()
        self.new_pieces = 0
        self.new_files = 0
        self.new_seconds = 0.0
        self.failures = 0
        self.skipped = 0
        self._load()

    def _load(self) -> None:
        """Keep rows whose wavs are all present; forget sources that lost files."""
        lines = self.metadata.read_text(encoding="utf-8").splitlines() if self.metadata.exists() else []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
                named = all(isinstance(row[k], str) for k in ("source", "piece"))
                present = named and (self.out / row["path"]).is_file()
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run
            rows.append((row, present))
        lost = {(row["source"], row["piece"]) for row, present in rows if not present}
        self.rows = [row for row, _ in rows if (row["source"], row["piece"]) not in lost]
        if len(self.rows) != len(lines):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)
            _atomic_write(self.metadata, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        for row in self.rows:
            self.pieces_by_source.setdefault(row["source"], set()).add(row["piece"])
        lines = self.sources_file.read_text(encoding="utf-8").splitlines() if self.sources_file.exists() else []
        finished = [line for line in lines if line]  # keys may hold spaces, never newlines
        self.done_sources = set(finished) - {source for source, _ in lost}
        if len(self.done_sources) != len(finished):  # forget lost sources for good, and duplicates
            text = "".join(f"{key}\n" for key in sorted(self.done_sources))
            _atomic_write(self.sources_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def done_pieces(self, source: str) -> frozenset[str]:
        return frozenset(self.pieces_by_source.get(source, ()))

    def handle(self, message: tuple) -> None:
        """Record one message from ``render_source``."""
        kind = message[0]
        if kind == "rows":
            rows = message[1]
            with open(self.metadata, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self.rows += rows
            self.new_pieces += 1
            self.new_files += len(rows)
            seconds = sum(r["seconds"] for r in rows)
            self.new_seconds += seconds
            print(f"rendered {rows[0]['piece']} ({len(rows)} file(s), {seconds / 60:.1f} min): {rows[0]['text']}",
                  flush=True)
        elif kind == "fail":
            self.failures += 1
            print(f"warning: skipped {message[1]}: {message[2]}", file=sys.stderr, flush=True)
        elif kind == "source":
            _, key, failures, complete = message
            if complete and not failures:
                with open(self.sources_file, "a", encoding="utf-8") as fh:
                    fh.write(key + "\n")
                self.done_sources.add(key)

    def summary(self) -> str:
        pieces = len({(r["source"], r["piece"]) for r in self.rows})
        hours = sum(r["seconds"] for r in self.rows) / 3600
        return (
            f"{self.new_pieces} pieces rendered ({self.new_files} files, {self.new_seconds / 3600:.2f} h), "
            f"{self.skipped} sources already done, {self.failures} failures; "
            f"{self.out} holds {pieces} pieces, {hours:.2f} h"
        )


def build(sources: list[Source], job: Job, workers: int = 1, max_pieces: int | None = None) -> Ledger:
    """Render ``sources`` into ``job.out``, skipping what is already there."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out)
    todo = [s for s in sources if s.key not in ledger.done_sources]
    ledger.skipped = len(sources) - len(todo)
    tasks = [(s, job, ledger.done_pieces(s.key)) for s in todo]
    if workers <= 1:
        budget = PieceBudget(mp.Value("i", max_pieces) if max_pieces is not None else None)
        for source, _, done in tasks:
            render_source(source, job, done, budget, ledger.handle)
        return ledger
    ctx = mp.get_context("spawn")  # workers start clean, whatever threads this process holds
    messages = ctx.Queue()
    budget_value = ctx.Value("i", max_pieces) if max_pieces is not None else None
    with ctx.Pool(workers, initializer=_init_worker, initargs=(messages, budget_value)) as pool:
        result = pool.map_async(_worker_task, tasks, chunksize=1)
        finished = 0
        while finished < len(tasks):
            try:
                message = messages.get(timeout=1.0)
            except queue_module.Empty:
                if result.ready():
                    result.get()  # re-raise a worker crash
                    break
                continue
            ledger.handle(message)
            finished += message[0] == "source"
    return ledger


# --------------------------------------------------------------------------
# Command line


class CliError(Exception):
    """Bad input: reported as one line, exit code 2."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m musicgen_lite.data.scores",
        description="Render music21's corpus (or a MIDI folder) to captioned 32 kHz piano audio.",
    )
    parser.add_argument("--out", required=True, type=Path, help="dataset folder (created; re-runs resume)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--composers", nargs="+", metavar="NAME",
                        help="corpus folders to render, e.g. mozart haydn beethoven bach, or folk/early "
                             "(default: the whole corpus)")
    source.add_argument("--midi", type=Path, metavar="DIR", help="render the .mid/.midi files under DIR instead")
    parser.add_argument("--soundfont", type=Path, help="SF2/SF3 file (default: an installed General MIDI font)")
    parser.add_argument("--seed", type=int, default=0, help="humanisation seed (default 0)")
    parser.add_argument("--max-pieces", type=int, metavar="N", help="stop after N new pieces (rendered or failed)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    return parser.parse_args(argv)


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"missing packages {', '.join(missing)}: pip install music21 mido && "
                       "pip install --no-deps tinysoundfont")


def run(argv: list[str] | None = None) -> str:
    """Run the command line; return the summary line. Raises CliError."""
    args = _parse_args(argv)
    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    if args.max_pieces is not None and args.max_pieces < 1:
        raise CliError("--max-pieces must be at least 1")
    if args.midi is not None and not args.midi.is_dir():
        raise CliError(f"--midi directory not found: {args.midi}")
    if args.soundfont is not None and not args.soundfont.is_file():
        raise CliError(f"soundfont not found: {args.soundfont}")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out is not a directory: {args.out}")
    soundfont = str(args.soundfont) if args.soundfont else default_soundfont()
    if soundfont is None:
        raise CliError("no SoundFont found: pass --soundfont, or apt-get install fluid-soundfont-gm")
    with open(soundfont, "rb") as fh:
        header = fh.read(12)
    if header[:4] != b"RIFF" or header[8:12] != b"sfbk":
        raise CliError(f"not a SoundFont (.sf2/.sf3): {soundfont}")
    _require("mido", "tinysoundfont", "soundfile")
    if args.midi is not None:
        sources = midi_sources(args.midi)
        if not sources:
            raise CliError(f"no .mid or .midi files under {args.midi}")
    else:
        _require("music21")
        if args.composers:
            unknown = sorted(set(args.composers) - set(corpus_collections()))
            if unknown:
                raise CliError(f"unknown composers {', '.join(unknown)}; choose from {' '.join(corpus_collections())}")
        sources = corpus_sources(args.composers)
    job = Job(str(args.out), soundfont, args.seed)
    return build(sources, job, args.workers, args.max_pieces).summary()


def main(argv: list[str] | None = None) -> int:
    try:
        print(run(argv), flush=True)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
