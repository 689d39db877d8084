"""Controlled-pair evaluation: key, tempo, melody and noise metrics on hand-made cases, the unheard voice,
the ceilings on a small fake data folder, and the `evaluate pairs` command end to end; and where the noise
comes from (`evaluate hiss`)."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from codebooks.rvq import swap_fine_codes
from conditioning.chroma import load_melody
from musicgen_lite import generate, load_model

from musicgen_lite.evaluate import chroma, chroma_cosine, key_scores
from musicgen_lite.evaluate import main as evaluate_main
from musicgen_lite.evaluate import pairs as eval_pairs
from musicgen_lite.evaluate.pairs import (
    parse_key, read_key, texture_distance, texture_stats,
)
from musicgen_lite.evaluate.voice import TUNE_SEED_FAMILY, new_tune, note_times, sing, transpose
from musicgen_lite.hum import random_melody
from musicgen_lite.sampling import SamplingParams

SR = 32000
C_MAJOR = [(48, 60, 64, 67), (41, 60, 65, 69), (43, 59, 62, 67), (48, 60, 64, 67)]  # I IV V I
C_MINOR = [(48, 60, 63, 67), (41, 60, 65, 68), (43, 59, 62, 67), (48, 60, 63, 67)]  # i iv V i
A_MINOR = [(45, 57, 60, 64), (38, 57, 62, 65), (40, 56, 59, 64), (45, 57, 60, 64)]


def piano(notes: list[tuple[float, float, int]], seconds: float, sr: int = SR) -> np.ndarray:
    """A piano-like rendering: every note a decaying harmonic tone (inharmonicity left out)."""
    out = np.zeros(round(seconds * sr))
    for start, end, pitch in notes:
        first, last = round(start * sr), min(out.shape[0], round(end * sr))
        if last <= first:
            continue  # past the end
        t = np.arange(last - first) / sr
        hz = 440.0 * 2.0 ** ((pitch - 69) / 12)
        tone = sum(a * np.sin(2 * np.pi * k * hz * t) for k, a in ((1, 1.0), (2, 0.4), (3, 0.2), (4, 0.1)))
        out[first:last] += 0.1 * tone * np.exp(-t / 0.8) * np.minimum(1.0, (t[-1] - t) / 0.01)
    return out


def chords(progression, seconds_each: float = 1.0, repeats: int = 2) -> np.ndarray:
    notes = [(i * seconds_each, (i + 1) * seconds_each, p)
             for i, chord in enumerate(progression * repeats) for p in chord]
    return piano(notes, seconds_each * len(progression) * repeats)


def clicks(per_second: float, seconds: float = 6.0) -> np.ndarray:
    wav = np.zeros(round(seconds * SR))
    for start in np.arange(0.1, seconds - 0.05, 1 / per_second):
        i = round(start * SR)
        wav[i : i + 160] += 0.5 * np.hanning(160) * np.sign(np.sin(np.arange(160)))
    return wav


def test_parse_key_reads_captions():
    assert parse_key("mozart string quartet, menuetto, G major, 3/4, piano") == (7, "major")
    assert parse_key("bach chorale, medium tempo, Bb minor, 4/4, piano") == (10, "minor")
    assert parse_key("F# major") == (6, "major")
    assert parse_key("Cb major") == (11, "major")
    assert parse_key("folk song, andante, piano") is None


@pytest.mark.parametrize("progression, tonic, mode, best", [
    (C_MAJOR, 0, "major", "C major"), (C_MINOR, 0, "minor", "C minor"), (A_MINOR, 9, "minor", "A minor"),
])
def test_key_of_a_chord_progression(progression, tonic, mode, best):
    found = read_key(key_scores(chords(progression), SR), tonic)
    assert found["parallel_mode"] == mode
    assert found["best_key"] == best and found["best_tonic"] == tonic


def test_silence_has_no_key():
    assert read_key(key_scores(np.zeros(SR), SR), 0) == {"parallel_mode": None, "best_key": None, "best_tonic": None}


def test_a_click_track_twice_as_fast_has_twice_the_onset_rate():
    slow, fast = texture_stats(clicks(3.0), SR)["onset_rate"], texture_stats(clicks(6.0), SR)["onset_rate"]
    assert slow == pytest.approx(3.0, rel=0.1)
    assert fast / slow == pytest.approx(2.0, rel=0.1)


def test_texture_tells_tones_from_noise_and_silence():
    rng = np.random.default_rng(0)
    tones = chords(C_MAJOR)
    noise = 0.1 * rng.standard_normal(tones.shape[0])
    half_silent = np.concatenate([tones[: tones.shape[0] // 2], np.zeros(tones.shape[0] // 2)])
    t, n, h = texture_stats(tones, SR), texture_stats(noise, SR), texture_stats(half_silent, SR)
    assert t["flatness_db_between_onsets"] < -20 < -4 < n["flatness_db_between_onsets"] < -1.5
    assert t["silent_fraction"] < 0.02 and n["silent_fraction"] == 0.0
    assert h["silent_fraction"] == pytest.approx(0.5, abs=0.03)
    scale = enumerate([60, 62, 64, 65, 67, 65, 64, 62] * 2)
    line = texture_stats(piano([(i * 0.5, (i + 1) * 0.5, p) for i, p in scale], 8.0), SR)
    assert line["chroma_entropy_bits"] < t["chroma_entropy_bits"] < n["chroma_entropy_bits"] - 0.5
    assert 3.3 < n["chroma_entropy_bits"] <= np.log2(12)


def test_texture_distance_by_hand():
    keys = eval_pairs.TEXTURE_KEYS
    reference = [dict.fromkeys(keys, v) for v in (1.0, 2.0, 3.0)]  # mean 2, sd 1
    assert texture_distance(reference, reference)["distance"] == 0.0
    shifted = [dict.fromkeys(keys, v + 1.0) for v in (1.0, 2.0, 3.0)]
    assert texture_distance(shifted, reference)["distance"] == pytest.approx(1.0)
    mixed = [{**dict.fromkeys(keys, 2.0), "onset_rate": 5.0, "chroma_entropy_bits": None}]
    result = texture_distance(mixed, reference)  # z = 0, 0, 3 (entropy left out)
    assert set(result["z"]) == set(keys) - {"chroma_entropy_bits"}
    assert result["distance"] == pytest.approx(np.sqrt(9 / 3))


def test_new_tunes_are_their_own_family():
    assert new_tune(3) == new_tune(3) and new_tune(3) != new_tune(4)
    firsts = {tuple(n.pitch for n in new_tune(s).notes) for s in range(40)}
    for seed in range(200):  # no tune opens like a random_melody tune of the same length
        melody = tuple(random_melody(seed, 8))
        assert all(tune[:8] != melody for tune in firsts)
    for seed in range(20):
        tune = new_tune(seed)
        scale = (0, 2, 4, 5, 7, 9, 11) if tune.mode == "major" else (0, 2, 3, 5, 7, 8, 10)
        assert all((n.pitch - tune.tonic) % 12 in scale for n in tune.notes)
        assert tune.notes[-1].pitch % 12 == tune.tonic
        assert tune.notes[-1].start + tune.notes[-1].beats <= tune.beats == 16
        home = tune.notes[-1].pitch - 12 * (tune.notes[-1].pitch - 55 >= 12)  # the tonic in G3..F#4
        assert home - 5 <= min(n.pitch for n in tune.notes) and max(n.pitch for n in tune.notes) <= home + 16
    assert TUNE_SEED_FAMILY not in range(200)


def test_the_sung_voice_carries_its_tune():
    scored = []
    for seed in range(4):
        times = note_times(new_tune(seed), 100)
        wav = sing(times, 8.0, SR, seed=seed)
        assert wav.shape == (8 * SR,) and 0.4 < np.abs(wav).max() <= 0.5
        winner = chroma(wav, SR).argmax(axis=1)
        hop = 4096 / SR  # frames whose window centre is well inside a note
        expected = [next((p % 12 for s, e, p in times if s + 0.15 <= t * hop < e - 0.15), None) for t in range(winner.shape[0])]
        scored += [w == e for w, e in zip(winner, expected) if e is not None]
    assert len(scored) > 80
    assert np.mean(scored) >= 0.85


def test_hum_against_the_same_tune_on_piano_and_an_unrelated_one():
    tune, other = new_tune(5), transpose(new_tune(6), 1)
    hummed = sing(note_times(tune, 110), 8.0, SR, seed=5)
    accompaniment = [(s, e, p - 12) for s, e, p in note_times(tune, 110)[::2]]
    same = piano(note_times(tune, 110) + accompaniment, 8.0)
    unrelated = piano(note_times(other, 110), 8.0)
    assert chroma_cosine(hummed, same, SR) >= 0.6
    assert chroma_cosine(hummed, unrelated, SR) <= 0.3


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """Six synthetic piano renderings with hums of their top lines: keys in the metadata's "key" field
    (v2 layout), or only in the caption (v1 layout); four held out."""
    root = tmp_path_factory.mktemp("pairs_data")
    (root / "audio" / "w").mkdir(parents=True)
    (root / "melody" / "w").mkdir(parents=True)
    rows = []
    for i, (progression, key) in enumerate([(C_MAJOR, "C major"), (A_MINOR, "A minor"), (C_MINOR, "C minor"),
                                            (C_MAJOR, "C major"), (A_MINOR, "A minor"), (C_MINOR, "C minor")]):
        tops = [(j * 1.0, (j + 1) * 1.0, max(chord)) for j, chord in enumerate(progression * 3)]
        mix = chords(progression, repeats=3) + 0.5 * piano(tops, 12.0)
        sf.write(root / "audio" / "w" / f"{i}.wav", mix.astype(np.float32), SR)
        sf.write(root / "melody" / "w" / f"{i}.wav", sing(tops, 12.0, SR, seed=i).astype(np.float32), SR)
        row = {"path": f"audio/w/{i}.wav", "text": f"synthetic chorale, moderato, {key}, 4/4, piano",
               "split": "test" if i < 4 else "train"}
        if i % 2:  # v2 rows carry the key and a melody track; v1 rows only the caption
            row |= {"text": "synthetic chorale, moderato, piano", "key": key, "melody": f"melody/w/{i}.wav", "bpm": 60.0}
        rows.append(row)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_ceilings_on_real_renderings(fake_data):
    renderings = eval_pairs.held_out(fake_data, "test", 10, 8.0)
    assert [r["path"] for r in renderings] == [f"audio/w/{i}.wav" for i in range(4)]
    assert [r["key"] for r in renderings] == [(0, "major"), (9, "minor"), (0, "minor"), (0, "major")]
    assert [r["melody"] is not None for r in renderings] == [False, True, False, True]
    result = eval_pairs.ceilings(renderings)
    assert result["key"]["mode_accuracy"] == 1.0 and result["key"]["tonic_accuracy"] == 1.0
    assert result["melody"]["excerpts"] == 2 and result["melody"]["chroma_cosine"] >= 0.6
    rng = np.random.default_rng(0)
    hiss = [texture_stats(0.05 * rng.standard_normal(8 * SR), SR) for _ in range(2)]
    assert 0 <= result["noise"]["distance"] < texture_distance(hiss, result["texture"])["distance"]
    # fewer picks than renderings: one from each equal run of the split, not its first files
    assert [r["path"] for r in eval_pairs.held_out(fake_data, "test", 2, 8.0)] == ["audio/w/0.wav", "audio/w/2.wav"]


def test_pairs_command_end_to_end(fake_data, tiny_melody_dir, tmp_path, capsys):
    out = tmp_path / "tiny.json"
    argv = ["pairs", "--model", str(tiny_melody_dir), "--data", str(fake_data), "--seconds", "1", "--tonics", "2",
            "--tempo-pairs", "2", "--hums", "2", "--out", str(out)]
    assert evaluate_main(argv) == 0
    printed = capsys.readouterr().out
    assert "parallel mode accuracy" in printed and "noise distance" in printed
    report = json.loads(out.read_text())
    assert [r["text"] for r in report["key"]["rows"]] == [
        "mozart sonata, allegro, C major, 4/4, piano", "mozart sonata, allegro, C minor, 4/4, piano",
        "mozart sonata, allegro, G major, 4/4, piano", "mozart sonata, allegro, G minor, 4/4, piano"]
    assert len(report["tempo"]["rows"]) == 4 and report["tempo"]["pairs"] == 2
    assert len(report["melody"]["rows"]) == 2 and {r["bpm"] for r in report["melody"]["rows"]} == {84, 120}
    assert report["noise"]["clips"] == 4 + 4 + 2
    assert report["ceilings"]["key"]["mode_accuracy"] == 1.0
    assert evaluate_main(["pairs", "--compare", str(out), str(out), "--names", "v1", "v2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| metric | v1 | v2 | goal | real renderings |"
    assert any(line.startswith("| parallel mode accuracy") and line.endswith("| >= 85 % | 100 % |") for line in table)
    text_only = report | {"melody": {"skipped": "no melody conditioning"},
                          "settings": report["settings"] | {"data": "/elsewhere/v2data"}}
    rows = eval_pairs.markdown_table([("v1", report), ("text", text_only)]).splitlines()
    assert rows[0].endswith(f"| goal | real renderings ({fake_data.name}) | real renderings (v2data) |")
    assert len(rows) == len(table) and any("| skipped |" in row for row in rows)


@pytest.mark.parametrize("argv, message", [
    (["--model", "x"], "--data"),
    (["--compare", "@missing.json"], "missing.json"),
    (["--model", "x", "--data", "@", "--tonics", "13"], "at most 12"),
])
def test_pairs_bad_input_is_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("@", str(tmp_path) + "/") for a in argv]
    assert evaluate_main(["pairs", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_swapped_codes_come_from_the_same_rows_codebook():
    codes = torch.arange(2 * 4 * 50).view(2, 4, 50)  # every code distinct, so its origin is known
    g = torch.Generator().manual_seed(0)
    out = torch.cat([swap_fine_codes(codes[b : b + 1], 1.0, g) for b in range(2)])  # evaluate hiss: clip by clip
    assert torch.equal(out[:, 0], codes[:, 0])  # codebook 1 kept
    for b in range(2):
        for k in (1, 2, 3):
            assert set(out[b, k].tolist()) <= set(codes[b, k].tolist())
    assert not torch.equal(out[:, 1:], codes[:, 1:])


@pytest.mark.parametrize("fixture", ["tiny_melody_dir", "tiny_default_like_dir"])
def test_greedy_resampling_of_a_greedy_clip_gives_the_clip_back(fixture, request):
    """Teacher-forced on a greedy clip's own codes, every code's context is the one generation saw, so
    greedy draws must give the clip back: the teacher-forced pass, the pattern and the guidance agree
    with the sampling loop's."""
    model = load_model(request.getfixturevalue(fixture))
    greedy = SamplingParams(top_k=1, cfg_coef=3.0)
    hum = sing([(0.0, 0.5, 60), (0.5, 1.0, 64), (1.0, 1.5, 67)], 1.5, SR, seed=0)
    text = "synthetic chorale, moderato, C major, 4/4, piano"
    out = generate(text, melody=hum, melody_sample_rate=SR, duration=1.0, model=model, seed=0, top_k=1, cfg_coef=3.0)
    tokens = torch.from_numpy(out.tokens)  # [1, K, T]
    melody = load_melody(hum, SR, model.chroma.extractor.sample_rate)
    assert torch.equal(model.draw_teacher_forced(tokens, [text], [melody], greedy, torch.Generator()), tokens)


def test_hiss_command_end_to_end(fake_data, tiny_default_like_dir, tmp_path, capsys):
    out = tmp_path / "hiss.json"
    argv = ["hiss", "--model", str(tiny_default_like_dir), "--data", str(fake_data), "--split", "test",
            "--seconds", "2", "--out", str(out)]
    assert evaluate_main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[1:]] == ["codec", "swapped", "resampled", "resampled", "resampled", "real"]
    report = json.loads(out.read_text())
    assert report["renderings"] == 4 and report["sampling"]["cfg_coef"] > 0
    assert all(row["distance"] is not None and row["distance"] >= 0 for row in report["rows"].values())
    assert evaluate_main(["hiss", "--model", "x", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "metadata.jsonl" in err


def test_hiss_reads_the_mix_where_a_melody_track_is_silent(fake_data, tiny_default_like_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fake_data, data)
    sf.write(data / "melody" / "w" / "1.wav", np.zeros(12 * SR, dtype=np.float32), SR)
    argv = ["hiss", "--model", str(tiny_default_like_dir), "--data", str(data), "--split", "test", "--seconds", "1"]
    assert evaluate_main(argv) == 0
