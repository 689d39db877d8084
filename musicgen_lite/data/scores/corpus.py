"""Sources of pieces: music21's corpus and MIDI folders, scores turned into piano MIDI with their captions' context."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .captions import ascii_words, find_composer, genre_words, quarter_bpm_for_word, slug, tempo_phrase, word_bpm
from .performance import Performance, PieceInfo, _absolute, _track_from_absolute, force_piano


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
    """Caption context of a user's MIDI file: its sidecar (``--export-midi``), else its path and meta events."""
    sidecar = Path(source.path).with_suffix(".json")
    if sidecar.is_file():
        import json

        return PieceInfo(**json.loads(sidecar.read_text(encoding="utf-8")))
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
