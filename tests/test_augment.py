"""Augmented renderings: captions say what was played (key after transposition, BPM), and the melody
track hums the melody line (skyline) of the rendered notes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conditioning.chroma import ChromaExtractor
from conditioning.melody_line import melody_line
from musicgen_lite.data.scores import augment
from musicgen_lite.data.scores.captions import CaptionFields
from musicgen_lite.data.scores.performance import Note, Performance, PieceInfo
from musicgen_lite.data.scores.render import Job, default_soundfont
from musicgen_lite.evaluate.music import onset_times
from musicgen_lite.evaluate.pairs import parse_key

BPM = 100.0
TUNE = [72, 74, 76, 77, 79, 77, 76, 74]  # C major, one note per quarter
CHORDS = [(48, 55, 64), (53, 57, 65), (55, 59, 62), (48, 55, 64)]  # I IV V I, one per bar (whole notes)


def c_major_piece(bars: int = 8) -> Performance:
    """A soprano tune over whole-note chords in C major at BPM quarter notes per minute, 4/4."""
    beat = 60.0 / BPM
    notes = []
    for bar in range(bars):
        for pitch in CHORDS[bar % 4]:
            notes.append(Note(bar * 4 * beat, (bar + 1) * 4 * beat - 0.05, pitch, 60, 1))
        for q in range(4):
            pitch = TUNE[(bar * 4 + q) % len(TUNE)]
            notes.append(Note((bar * 4 + q) * beat, (bar * 4 + q + 1) * beat - 0.05, pitch, 90, 0))
    return Performance(notes=sorted(notes, key=lambda n: n.start), tempos=[(0.0, BPM)], metres=[(0.0, "4/4")],
                       keys=[(0.0, 0)])


def caption_key(caption: str) -> tuple[int, str] | None:
    """The key a caption names, whichever spelling it uses ("Eb", "D#", "E flat")."""
    text = re.sub(r"\b([A-G]) (flat|sharp)\b", lambda m: m.group(1) + ("b" if m.group(2) == "flat" else "#"), caption)
    return parse_key(text)


def test_transpose_key_moves_the_tonic_and_keeps_the_mode():
    assert augment.transpose_key("Bb major", 2) == "C major"
    assert augment.transpose_key("A minor", 3) == "C minor"
    assert augment.transpose_key("F# major", -6) == "C major"
    assert augment.transpose_key("", 4) == ""
    for shift in range(-6, 6):
        tonic, mode = parse_key(augment.transpose_key("E minor", shift))
        assert (tonic, mode) == ((4 + shift) % 12, "minor")


def test_tempo_words_follow_bpm_ranges():
    assert [augment.tempo_word(b) for b in (50, 66, 90, 112, 132, 180)] == [
        "largo", "adagio", "andante", "moderato", "allegro", "presto"]


def test_variants_use_distinct_keys_and_reach_every_tempo_word_evenly():
    rng = np.random.default_rng(0)
    words = []
    for _ in range(300):
        variants = augment.choose_variants(rng, [60, 72], 100.0, 4)
        assert len({v.semitones for v in variants}) == 4
        assert all(augment.FACTOR_RANGE[0] <= v.factor <= augment.FACTOR_RANGE[1] for v in variants)
        words += [augment.tempo_word(100.0 * v.factor) for v in variants]
    counts = {w: words.count(w) for w in set(words)}
    # 0.6x..1.6x of 100 bpm reaches four words; each is drawn about as often as the others
    assert set(counts) == {"adagio", "andante", "moderato", "allegro"}
    assert max(counts.values()) < 2 * min(counts.values())


def test_caption_names_the_given_key_and_tempo():
    rng = np.random.default_rng(1)
    fields = CaptionFields("mozart", "string quartet", "minuet", "", 120.0, "Bb major", "3/4")
    for _ in range(50):
        text = augment.caption(rng, fields, "Eb major", 132.0)
        assert "allegro" in text or "132 bpm" in text
        found = caption_key(text)
        assert found is None or found == (3, "major")
        assert "piano" in text


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, list[dict]]:
    pytest.importorskip("tinysoundfont")
    font = default_soundfont()
    if font is None:
        pytest.skip("no General MIDI SoundFont installed")
    out = tmp_path_factory.mktemp("augmented")
    info = PieceInfo("c-major-tune", "c-major-tune", "test", "mozart", "mozart", genre="sonata")
    rows = augment.render_variants(c_major_piece(), info, Job(str(out), font, seed=3, variants=4, excerpt_seconds=8.0))
    return out, rows


@pytest.mark.slow
def test_transposed_renderings_caption_the_shifted_key(rendered):
    out, rows = rendered
    assert len(rows) >= 4 and len({r["transpose"] for r in rows[:4]}) == 4
    named = 0
    for row in rows:
        expected = (row["transpose"] % 12, "major")  # the piece is in C major
        assert parse_key(row["key"]) == expected
        assert (out / row["path"]).with_suffix(".txt").read_text().strip() == row["text"]
        if caption_key(row["text"]) is not None:
            assert caption_key(row["text"]) == expected
            named += 1
    assert named >= len(rows) // 2


@pytest.mark.slow
def test_caption_bpm_matches_the_rendered_beat(rendered):
    out, rows = rendered
    for row in rows:
        wav, sr = sf.read(out / row["path"], dtype="float32")
        onsets = onset_times(wav, sr)
        beat = float(np.median(np.diff(onsets)))  # one note per quarter in the tune
        assert abs(60.0 / beat - row["bpm"]) / row["bpm"] < 0.03, (row["bpm"], 60.0 / beat)
        assert augment.tempo_word(row["bpm"]) == row["tempo"]


@pytest.mark.slow
def test_melody_track_hums_the_skyline_of_the_rendered_notes(rendered):
    out, rows = rendered
    extractor = ChromaExtractor()
    for row in rows:
        hum, sr = sf.read(out / row["melody"], dtype="float32")
        audio = sf.info(out / row["path"])
        assert hum.shape[0] == audio.frames and row["melody"].startswith("melody/")
        pitch = extractor(torch.from_numpy(hum)[None])[0].argmax(-1).numpy()  # [frames]
        # the expected line: the tune (the skyline of tune + chords), transposed and time-scaled
        piece = c_major_piece()
        t0 = augment.excerpt_starts(piece, 8.0)[int(re.search(r"-x(\d+)-v", row["path"]).group(1))]
        scaled = augment.excerpt(piece, t0, t0 + 8.0 * row["tempo_factor"], row["transpose"], row["tempo_factor"])
        line = melody_line([(n.start, n.end, n.pitch) for n in scaled.notes])
        times = np.arange(len(pitch)) * extractor.hop_length / sr
        expected = [next((n.pitch % 12 for n in line if n.start + 0.05 <= t < n.end - 0.05), None) for t in times]
        pairs = [(p, e) for p, e in zip(pitch, expected) if e is not None]
        assert len(pairs) > 10
        assert np.mean([p == e for p, e in pairs]) >= 0.8


def test_melody_tracks_are_conditions_not_training_audio(tmp_path):
    from musicgen_lite.audio_data import scan

    for rel in ("audio/a.wav", "melody/a.wav"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / rel, np.zeros(3200, dtype=np.float32), 32000)
    row = {"path": "audio/a.wav", "text": "x", "melody": "melody/a.wav", "split": "train"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    files = scan(tmp_path)
    assert [f.rel for f in files] == ["audio/a.wav"]
    assert files[0].melody == tmp_path.resolve() / "melody/a.wav"


@pytest.mark.slow
def test_exported_midi_keeps_caption_context_and_split_when_rendered(tmp_path):
    pytest.importorskip("music21")
    pytest.importorskip("tinysoundfont")
    font = default_soundfont()
    if font is None:
        pytest.skip("no General MIDI SoundFont installed")
    from musicgen_lite.data import scores

    exported = tmp_path / "midi"
    assert scores.main(["--export-midi", "--out", str(exported), "--composers", "beach", "--max-pieces", "1"]) == 0
    (sidecar,) = (exported / "midi").rglob("*.json")
    info = json.loads(sidecar.read_text())
    assert sidecar.with_suffix(".mid").is_file() and info["composer"] == "amy beach"
    out = tmp_path / "audio"
    assert scores.main(["--midi", str(exported / "midi"), "--out", str(out), "--variants", "1", "--soundfont", font]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert rows and {r["composer"] for r in rows} == {"amy beach"}
    assert {r["split"] for r in rows} == {scores.split_for(info["work_id"])}
