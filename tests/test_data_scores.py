"""Score-to-piano dataset builder: captions, keys, splits, cutting, and real renders.

The caption/key/split tests need only numpy. Rendering tests need the optional
packages (music21, mido, tinysoundfont) and an installed SoundFont; they skip
without them.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from musicgen_lite.data import scores
from musicgen_lite.data.scores import render
from musicgen_lite.data.scores import (
    CaptionFields,
    Note,
    Performance,
    PieceInfo,
    build_caption,
    describe,
    estimate_key,
    find_composer,
    genre_words,
    pitch_histogram,
    split_for,
    split_points,
    tempo_phrase,
)


def _info(**kw) -> PieceInfo:
    base = dict(piece_id="p", work_id="p", source="test", composer="", folder="x")
    return PieceInfo(**(base | kw))


def _chords(roots_and_qualities: list[tuple[int, str]], seconds: float = 1.0, channel: int = 0) -> list[Note]:
    """Block triads (root MIDI pitch, 'maj'/'min') one after another."""
    notes = []
    for i, (root, quality) in enumerate(roots_and_qualities):
        third = 4 if quality == "maj" else 3
        for pitch in (root - 12, root, root + third, root + 7):
            notes.append(Note(i * seconds, (i + 1) * seconds, pitch, 80, channel))
    return notes


# ---------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "text, phrase",
    [
        ("Menuetto. Allegretto", "menuetto"),
        ("Scherzo (Allegro molto)", "scherzo"),
        ("Allegro ma non troppo", "allegro ma non troppo"),
        ("Andante con moto quasi Allegretto.", "andante con moto"),
        ("Poco Adagio", "poco adagio"),
        ("Tempo Di Marcia", "tempo di marcia"),
        ("Sonata in A Major: Second movement, Poco adagio", "poco adagio"),
        ("poco più lento", None),
        ("a tempo", None),
        ("Menuetto da capo", None),
        ("cresc.", None),
    ],
)
def test_tempo_phrase(text, phrase):
    assert tempo_phrase(text) == phrase


def test_caption_uses_movement_tempo_word_and_drops_redundant_form():
    fields = CaptionFields("mozart", "string quartet", "minuet", "menuetto", 120.0, "G major", "3/4")
    assert build_caption(fields) == "mozart string quartet, menuetto, G major, 3/4, piano"
    fields = CaptionFields("", "folk tune", "reel", "", 120.0, "D major", "2/4")
    assert build_caption(fields) == "folk tune, reel, medium tempo, D major, 2/4, piano"


@pytest.mark.parametrize(
    "bpm, metre, word",
    [(50, "4/4", "very slow"), (66, "4/4", "slow"), (100, "3/4", "medium tempo"), (140, "4/4", "fast"),
     (200, "2/2", "medium tempo"),  # counted in halves: 100
     (230, "6/8", "fast"),  # counted in dotted quarters: 153
     (250, "6/8", "very fast")],
)
def test_caption_falls_back_to_bpm_bucket_of_the_counted_beat(bpm, metre, word):
    caption = build_caption(CaptionFields("bach", "chorale", quarter_bpm=bpm, metre=metre))
    assert caption == f"bach chorale, {word}, {metre}, piano"


def test_genre_and_composer_words():
    assert genre_words("AcaciaReel") == ["reel"]
    assert genre_words("Sonata in A, Second movement: Menuetto") == ["sonata", "minuet"]
    assert genre_words("String Quartet Op. 133 (Große Fuge)") == ["string quartet", "fugue"]
    assert genre_words("Wie schön leuchtet der Morgenstern") == []
    assert find_composer("midi/chopin_Nocturne_op9", "") == "chopin"
    assert find_composer("my song", "untitled") == ""


def test_key_estimate_major_minor_and_signature():
    c_major = pitch_histogram(_chords([(60, "maj"), (65, "maj"), (67, "maj"), (60, "maj")]), 0, 10)
    assert estimate_key(c_major, 0) == "C major"
    a_minor = pitch_histogram(_chords([(57, "min"), (62, "min"), (64, "maj"), (57, "min")]), 0, 10)
    assert estimate_key(a_minor, 0) == "A minor"
    # Bb major and G minor share their notes; the closing bass decides
    relative = pitch_histogram(_chords([(55, "min"), (58, "maj"), (63, "maj"), (62, "maj")]), 0, 10)
    assert estimate_key(relative, -2, (7, 7)) == "G minor"
    assert estimate_key(relative, -2, (10, 10)) == "Bb major"
    assert estimate_key(c_major * 0 + 1, None) == ""  # no tonal centre, no key


def test_describe_prefers_movement_title_then_timeline_text_then_bpm():
    notes = _chords([(60, "maj"), (65, "maj"), (67, "maj"), (60, "maj")] * 5, seconds=2.0)
    perf = Performance(notes, tempos=[(0.0, 100.0)], metres=[(0.0, "3/4")], keys=[(0.0, 0)],
                       texts=[(25.0, "adagio")])
    info = _info(composer="haydn", genre="string quartet", forms=["minuet"])
    caption = build_caption(describe(perf, info, 0, 40))
    assert caption == "haydn string quartet, minuet, medium tempo, C major, 3/4, piano"
    assert describe(perf, info, 20, 40).tempo == "adagio"  # the text rules that stretch
    info.titles = ["Menuetto. Allegretto"]
    assert build_caption(describe(perf, info, 0, 40)) == "haydn string quartet, menuetto, C major, 3/4, piano"


# ---------------------------------------------------------------- splits and cutting


def test_split_is_deterministic_and_roughly_five_five_ninety():
    ids = [f"piece-{i}" for i in range(4000)]
    first = [split_for(i) for i in ids]
    assert first == [split_for(i) for i in ids]
    share = {name: first.count(name) / len(ids) for name in ("train", "valid", "test")}
    assert 0.03 < share["valid"] < 0.07 and 0.03 < share["test"] < 0.07 and share["train"] > 0.85


def test_split_points_keep_files_under_the_limit_and_cut_in_quiet_gaps():
    sr = 100  # a low rate keeps the arrays small; the cutting logic is rate-independent
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, 1500 * sr).astype(np.float32)
    for gap in (490, 990):  # quiet stretches just before the even cut points (500, 1000 s)
        audio[gap * sr : (gap + 1) * sr] = 0
    cuts = split_points(audio, sr, max_seconds=600)
    bounds = [0, *cuts, len(audio)]
    assert all(b - a <= 600 * sr for a, b in zip(bounds, bounds[1:]))
    assert [c // sr for c in cuts] == [490, 990]
    assert split_points(audio[: 600 * sr], sr, max_seconds=600) == []


def test_humanize_is_seeded_and_small():
    perf = Performance(_chords([(60, "maj")] * 20, seconds=0.5))
    a = scores.humanize(perf, scores.piece_rng(0, "x"))
    b = scores.humanize(perf, scores.piece_rng(0, "x"))
    c = scores.humanize(perf, scores.piece_rng(1, "x"))
    assert [(n.start, n.velocity) for n in a.notes] == [(n.start, n.velocity) for n in b.notes]
    assert [(n.start, n.velocity) for n in a.notes] != [(n.start, n.velocity) for n in c.notes]
    ratio = a.notes[-1].start / perf.notes[-1].start
    assert 0.94 < ratio < 1.06  # a global tempo change of a few percent plus ms jitter
    assert len({n.velocity for n in a.notes}) > 3


# ---------------------------------------------------------------- rendering (optional packages)


@pytest.fixture(scope="module")
def soundfont() -> str:
    pytest.importorskip("mido")
    pytest.importorskip("tinysoundfont")
    font = scores.default_soundfont()
    if font is None:
        pytest.skip("no General MIDI SoundFont installed")
    return font


def _programs_and_channels(mid) -> tuple[set[int], set[int]]:
    programs = {m.program for t in mid.tracks for m in t if m.type == "program_change"}
    channels = {m.channel for t in mid.tracks for m in t if m.type == "note_on"}
    return programs, channels


def test_force_piano_rewrites_programs_and_drops_drums():
    mido = pytest.importorskip("mido")
    track = mido.MidiTrack([
        mido.Message("program_change", channel=0, program=40),
        mido.Message("control_change", channel=0, control=0, value=1),  # bank select
        mido.Message("note_on", channel=0, note=60, velocity=80),
        mido.Message("note_on", channel=9, note=36, velocity=100),
        mido.Message("note_off", channel=0, note=60, velocity=0, time=480),
        mido.Message("note_off", channel=9, note=36, velocity=0),
    ])
    mid = mido.MidiFile(tracks=[track])
    forced = scores.force_piano(mid)
    assert _programs_and_channels(forced) == ({0}, {0})
    assert not any(m.type == "control_change" for m in forced.tracks[0])
    perf = scores.performance_from_midi(forced)
    assert [(n.pitch, round(n.end - n.start, 3)) for n in perf.notes] == [(60, 0.5)]


@pytest.mark.slow
def test_bach_chorale_renders_end_to_end(tmp_path, soundfont):
    pytest.importorskip("music21")
    import soundfile as sf
    from music21 import corpus, instrument, note, stream

    sources = {s.key: s for s in scores.corpus_sources(["bach", "mozart"])}
    assert {s.key.split("/")[0] for s in sources.values()} == {"bach", "mozart"}
    k458 = {s.work_id for key, s in sources.items() if key.startswith("mozart/k458/")}
    assert k458 == {"mozart-k458"}  # movements of one quartet are held out together
    assert sources["mozart/k80/movement1.mxl"].work_id == "mozart-k80"
    assert sources["bach/bwv248.23-s.mxl"].work_id == sources["bach/bwv248.23-2.mxl"].work_id == "bach-bwv248-23"
    source = sources["bach/bwv66.6.mxl"]
    score = corpus.parse("bach/bwv66.6")
    programs, _ = _programs_and_channels(scores.score_to_midi(score))
    assert programs == {0}

    strings = stream.Score([stream.Part([instrument.Violin(), note.Note("A4", quarterLength=4)])])
    import io

    import mido
    from music21 import midi

    raw = mido.MidiFile(file=io.BytesIO(midi.translate.streamToMidiFile(strings).writestr()))
    assert 40 in _programs_and_channels(raw)[0]  # music21 writes the violin program...
    assert _programs_and_channels(scores.score_to_midi(strings))[0] == {0}  # ...which we force to piano

    job = scores.Job(str(tmp_path), soundfont, seed=0)
    ledger = scores.build([source], job)
    assert ledger.failures == 0
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["path"] == "audio/bach/bach-bwv66-6.wav" and row["piece"] == "bach-bwv66-6"
    assert row["split"] == split_for("bach-bwv66-6") and row["composer"] == "bach"
    assert row["text"].startswith("bach chorale, ") and row["text"].endswith(", 4/4, piano")
    assert "minor" in row["text"] or "major" in row["text"]
    assert (tmp_path / "audio/bach/bach-bwv66-6.txt").read_text().strip() == row["text"]
    info = sf.info(tmp_path / row["path"])
    assert (info.samplerate, info.channels, info.subtype) == (32000, 1, "PCM_16")
    audio, _ = sf.read(tmp_path / row["path"])
    assert abs(len(audio) / 32000 - row["seconds"]) < 1e-3 and 15 < row["seconds"] < 60
    peak, rms = np.abs(audio).max(), np.sqrt(np.mean(audio**2))
    assert 0.05 < rms and peak < 0.95  # loud enough, never clipped
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_long_piece_is_cut_but_stays_one_piece_in_one_split(tmp_path, soundfont, monkeypatch):
    monkeypatch.setattr(render, "split_points", partial(split_points, max_seconds=20.0))
    monkeypatch.setattr(render, "CUT_SEARCH_SECONDS", 3.0)
    notes = _chords([(60, "maj"), (65, "maj"), (67, "maj")] * 8, seconds=2.0)
    perf = Performance(notes, tempos=[(0.0, 120.0)], metres=[(0.0, "4/4")], keys=[(0.0, 0)])
    info = _info(piece_id="long-one", work_id="long-work", composer="test", folder="test")
    rows = scores.render_piece(perf, info, scores.Job(str(tmp_path), soundfont))
    assert len(rows) >= 3
    assert {r["piece"] for r in rows} == {"long-one"} and {r["split"] for r in rows} == {split_for("long-work")}
    assert [r["path"] for r in rows] == [f"audio/test/long-one-part{i}.wav" for i in range(1, len(rows) + 1)]
    assert all(r["seconds"] <= 20.0 for r in rows)


def _write_midi(path: Path, program: int = 40) -> None:
    import mido

    mid = mido.MidiFile(ticks_per_beat=480)
    meta = mido.MidiTrack([
        mido.MetaMessage("track_name", name="Nocturne"),
        mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(70)),
        mido.MetaMessage("time_signature", numerator=3, denominator=4),
        mido.MetaMessage("key_signature", key="Eb"),
    ])
    music = mido.MidiTrack([mido.Message("program_change", channel=0, program=program)])
    for root in (63, 68, 70, 63) * 2:  # Eb major: I IV V I
        for pitch in (root - 12, root, root + 4, root + 7):
            music.append(mido.Message("note_on", channel=0, note=pitch, velocity=70, time=0))
        music.append(mido.Message("note_on", channel=9, note=42, velocity=90, time=0))
        for i, pitch in enumerate((root - 12, root, root + 4, root + 7)):
            music.append(mido.Message("note_off", channel=0, note=pitch, velocity=0, time=960 if i == 0 else 0))
        music.append(mido.Message("note_off", channel=9, note=42, velocity=0, time=0))
    mid.tracks += [meta, music]
    path.parent.mkdir(parents=True, exist_ok=True)
    mid.save(path)


@pytest.mark.slow
def test_midi_folder_renders_with_captions_and_resumes(tmp_path, soundfont, capsys):
    midi_dir, out = tmp_path / "my midi", tmp_path / "out"
    _write_midi(midi_dir / "chopin" / "Nocturne_Adagio.mid")
    _write_midi(midi_dir / "take 2.MID")
    (midi_dir / "broken.midi").write_bytes(b"MThd not really a midi file")
    assert scores.main(["--out", str(out), "--midi", str(midi_dir), "--soundfont", soundfont]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().startswith("warning: skipped midi/broken.midi:")
    assert len(captured.err.strip().splitlines()) == 1
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith("2 pieces rendered (2 files") and "1 failures" in summary
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == ["audio/chopin/chopin-nocturne-adagio.wav", "audio/unknown/take-2.wav"]
    assert rows[0]["text"] == "chopin nocturne, adagio, Eb major, 3/4, piano"
    assert rows[1]["text"] == "nocturne, slow, Eb major, 3/4, piano"  # genre from the track name, 70 bpm
    assert [r["composer"] for r in rows] == ["chopin", "unknown"] and 10 < rows[0]["seconds"] < 20

    (midi_dir / "broken.midi").unlink()
    (midi_dir / "take 2.MID").unlink()
    assert scores.main(["--out", str(out), "--midi", str(midi_dir), "--soundfont", soundfont]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("0 pieces rendered") and "1 sources already done, 0 failures" in summary
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2
    rows = rows[:1]
    (out / "audio/unknown/take-2.wav").unlink()

    (out / rows[0]["path"]).unlink()  # a lost file is forgotten at once, even if the run stops there...
    assert scores.Ledger(out).done_sources == set() and scores.Ledger(out).rows == []
    assert (out / ".rendered_sources").read_text() == ""
    assert scores.main(["--out", str(out), "--midi", str(midi_dir), "--soundfont", soundfont]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("1 pieces rendered")  # ...and rendered again
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 1


def test_cli_rejects_a_missing_midi_folder_with_exit_code_2(tmp_path, capsys):
    assert scores.main(["--out", str(tmp_path / "out"), "--midi", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: --midi directory not found: {tmp_path / 'nope'}"
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        scores.main(["--midi", str(tmp_path)])  # --out is required
    assert exit_info.value.code == 2
