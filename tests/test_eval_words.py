"""The teacher-forced words probe: which captions it builds, and that its dCE measures the caption alone."""

import json

import numpy as np
import pytest
import soundfile as sf

import musicgen_lite
from musicgen_lite import evaluate as ev
from musicgen_lite.audio_data import scan
from musicgen_lite.data.scores.augment import tempo_word
from musicgen_lite.evaluate.words import FAST_END, SLOW_END, changed_captions, evaluate_words

SR = 32000


def test_changed_captions_move_the_tonic_a_tritone_swap_the_mode_and_move_the_tempo():
    changes = changed_captions("bach chorale, in Eb major, adagio (66 bpm), 4/4, piano")
    assert changes == {
        "tonic": "bach chorale, in A major, adagio (66 bpm), 4/4, piano",
        "mode": "bach chorale, in Eb minor, adagio (66 bpm), 4/4, piano",
        "tempo": "bach chorale, in Eb major, presto (184 bpm), 4/4, piano",
    }
    assert changed_captions("presto, 176 bpm, F# minor")["tempo"] == "largo, 50 bpm, F# minor"
    assert changed_captions("F# minor, piano")["tonic"] == "C minor, piano"
    assert changed_captions("allegro tempo, piano") == {"tempo": "largo tempo, piano"}
    assert changed_captions("calm piano piece") == {}
    for word, bpm in (SLOW_END, FAST_END):  # each end is named by the word the data builder gives its BPM
        assert tempo_word(bpm) == word


@pytest.fixture
def keyed_data_dir(tmp_path):
    """Three held-out piano-like tones whose captions name a key and a tempo, laid out like data.scores."""
    rows = []
    for i, (midi, caption) in enumerate(((57, "piano, in A minor, adagio (66 bpm)"), (60, "C major, allegro, piano"),
                                         (64, "sonata, E major, largo, 52 bpm"))):
        t = np.arange(int(1.5 * SR)) / SR
        tone = sum(np.sin(2 * np.pi * 440 * 2 ** ((midi - 69) / 12) * h * t) / h for h in (1, 2, 3)) * np.exp(-2 * t)
        path = tmp_path / "audio" / f"{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, 0.3 * tone, SR)
        rows.append({"path": f"audio/{i}.wav", "text": caption, "split": "test"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


def test_words_section_scores_each_changed_caption(tiny_melody_dir, keyed_data_dir, tmp_path, capsys):
    out = tmp_path / "words.json"
    assert ev.main(["words", "--model", str(tiny_melody_dir), "--data", str(keyed_data_dir), "--seconds", "1",
                    "--out", str(out)]) == 0
    assert "tonic moved a tritone" in capsys.readouterr().out
    words = json.loads(out.read_text())["words"]
    assert words["excerpts"] == 3 and words["seconds"] == 1.0  # the 2 s opening, cut to the 1 s excerpts
    assert {words[g]["excerpts"] for g in ("tonic", "mode", "tempo", "pitch")} == {3}
    # a random LM reads its prefix, so changing a word changes the score
    assert any(words[g]["mean_dce_nats"] != 0 for g in ("tonic", "mode", "tempo"))


def test_a_model_that_ignores_its_caption_scores_zero(tiny_melody_dir, keyed_data_dir, monkeypatch):
    model = musicgen_lite.load_model(tiny_melody_dir)
    excerpts = ev.split_excerpts(scan(keyed_data_dir), "test", 3, 1.0, model.sample_rate)[0]
    conditions = model.conditions
    monkeypatch.setattr(model, "conditions", lambda texts, melody, guided: conditions(["piano"], melody, guided))
    report = evaluate_words(model, excerpts)
    assert all(report[g]["mean_dce_nats"] == 0 and report[g]["truth_preferred"] == 0 for g in ("tonic", "mode", "tempo"))
