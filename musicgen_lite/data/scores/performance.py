"""MIDI as a piano performance: timed notes, pedal, humanising, and the caption fields of a stretch."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .captions import _SHARPS_BY_NAME, CaptionFields, estimate_key, tempo_phrase

DRUM_CHANNEL = 9  # General MIDI percussion, which has no piano equivalent


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


@dataclass(frozen=True)
class Humanize:
    """How far a rendering strays from the written timing and dynamics."""

    tempo_spread: float = 0.04  # global tempo factor drawn from 1 +- spread
    onset_ms: float = 7.0  # std of per-note timing jitter
    max_onset_ms: float = 20.0
    velocity_sd: float = 6.0


HUMANIZE = Humanize()  # what the dataset builder uses


def humanize(perf: Performance, rng: np.random.Generator, settings: Humanize = HUMANIZE) -> Performance:
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
