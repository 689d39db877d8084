"""The line a person would hum: the skyline (highest sounding voice) of a piece's notes.

Melody conditioning is trained on hums of this line and a written tune (a MIDI file) is reduced to
it, so both mean the same thing. The rule, on notes sorted by onset:

    onset group (notes struck within 30 ms)  ->  its highest pitch is a candidate
    candidate >= the melody note still sounding  ->  it takes over (the old note is cut there)
    candidate below a melody note still sounding  ->  an inner voice; dropped

    soprano  ──────────────  ─────────────────        <- the line
    alto        ─────────────────     ──────
    bass     ───────────         ──────────────        (never chosen while a higher note sounds)

The result is monophonic: notes never overlap. In a chorale it is the soprano, in a quartet mostly the
first violin, in a piano piece the top of the right hand; where the top voice rests, a lower voice
that starts then carries the line until the top one returns.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

CHORD_SECONDS = 0.03  # onsets closer than this count as one chord
MIN_NOTE_SECONDS = 0.05  # a melody note cut shorter than this by the next one is dropped


class LineNote(NamedTuple):
    start: float  # seconds
    end: float
    pitch: int  # MIDI note number


def melody_line(notes: Sequence[tuple[float, float, int]]) -> list[LineNote]:
    """(start, end, pitch) notes of any polyphony -> the skyline as non-overlapping LineNotes."""
    ordered = sorted((float(s), float(e), int(p)) for s, e, p in notes if e > s)
    line: list[LineNote] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1][0] - ordered[i][0] < CHORD_SECONDS:
            j += 1
        start, end, pitch = max(ordered[i : j + 1], key=lambda n: (n[2], n[1]))
        i = j + 1
        if line and line[-1].end > start:
            if pitch < line[-1].pitch:
                continue  # an inner voice under a sounding melody note
            line[-1] = line[-1]._replace(end=start)
            if line[-1].end - line[-1].start < MIN_NOTE_SECONDS:
                line.pop()
        line.append(LineNote(start, end, pitch))
    return line
