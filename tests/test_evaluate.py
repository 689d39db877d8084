"""Evaluation metrics against hand computations, and the evaluation CLI end to end on the tiny models."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers.audio_utils import mel_filter_bank

import musicgen_lite
from codebooks.patterns import DelayPattern
from musicgen_lite import evaluate as ev
from musicgen_lite.audio_data import scan
from musicgen_lite.hum import MAJOR_SCALE, MINOR_SCALE, random_melody, synth_hum

SR = 32000


def harmonic_tone(midis: list[int], seconds: float, decay: float | None = None) -> np.ndarray:
    """The notes `midis` sounding together, each with three harmonics; optionally decaying with time
    constant `decay` seconds (a plucked note)."""
    t = np.arange(round(seconds * SR)) / SR
    hz = [440.0 * 2.0 ** ((m - 69) / 12) for m in midis]
    wav = sum(a * np.sin(2 * np.pi * k * f * t) for f in hz for k, a in ((1, 1.0), (2, 0.5), (3, 0.25)))
    return 0.1 * wav * (np.exp(-t / decay) if decay else 1.0)


def white_noise_at_snr(signal: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    power = np.mean(signal**2)
    return np.random.default_rng(seed).standard_normal(signal.shape) * math.sqrt(power / 10 ** (snr_db / 10))


# -- SI-SDR ---------------------------------------------------------------------------------------


def test_si_sdr_of_a_small_example_matches_the_formula():
    ref = np.array([1.0, -1.0, 1.0, -1.0])
    distortion = np.array([1.0, 1.0, -1.0, -1.0])  # zero mean, orthogonal to ref
    # target = 2 ref (energy 16), distortion energy 4 -> 10 log10(16 / 4)
    assert ev.si_sdr(ref, 2 * ref + distortion) == pytest.approx(10 * math.log10(4), abs=1e-9)
    # the means are removed first: a DC offset changes nothing
    assert ev.si_sdr(ref + 3, 2 * ref + distortion - 1) == pytest.approx(10 * math.log10(4), abs=1e-9)


def test_si_sdr_of_a_scaled_copy_is_at_the_ceiling():
    x = harmonic_tone([57, 64], 1.0)
    assert ev.si_sdr(x, 0.3 * x) > 150
    assert ev.si_sdr(x, -2.0 * x) > 150


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_si_sdr_of_added_white_noise_is_the_snr(snr_db):
    x = harmonic_tone([57, 64], 4.0)
    assert ev.si_sdr(x, x + white_noise_at_snr(x, snr_db, seed=1)) == pytest.approx(snr_db, abs=0.1)


def test_si_sdr_rejects_mismatched_or_constant_references():
    with pytest.raises(ValueError, match="length"):
        ev.si_sdr(np.ones(10), np.ones(11))
    with pytest.raises(ValueError, match="constant"):
        ev.si_sdr(np.ones(10), np.arange(10.0))


# -- log-mel distance ------------------------------------------------------------------------------


def test_log_mel_has_80_bands_and_one_frame_per_hop():
    assert ev.log_mel(np.zeros(SR), SR).shape == (80, 1 + SR // 512)
    assert np.all(ev.log_mel(np.zeros(SR), SR) == -5.0)  # silence sits on the 1e-5 floor


def test_log_mel_matches_torch_stft_and_the_transformers_mel_filters():
    x = synth_hum([62, 66, 69], SR, 0.4, seed=8).astype(np.float64)
    window = torch.hann_window(2048, periodic=True, dtype=torch.float64)
    spec = torch.stft(torch.from_numpy(x), 2048, 512, window=window, center=True, pad_mode="reflect",
                      return_complex=True).abs().numpy()  # [1025, frames]
    filters = mel_filter_bank(num_frequency_bins=1025, num_mel_filters=80, min_frequency=0.0, max_frequency=16000.0,
                              sampling_rate=SR, norm="slaney", mel_scale="slaney")  # [1025, 80]
    np.testing.assert_allclose(ev.log_mel(x, SR), np.log10(np.maximum(filters.T @ spec, 1e-5)), atol=1e-9)


def test_log_mel_distance_is_zero_for_identical_signals_and_grows_with_noise():
    x = harmonic_tone([60, 64, 67], 2.0)
    assert ev.log_mel_distance(x, x, SR) == 0.0
    distances = [ev.log_mel_distance(x, x + white_noise_at_snr(x, snr, seed=2), SR) for snr in (30, 20, 10, 0)]
    assert distances[0] > 0 and all(a < b for a, b in zip(distances, distances[1:]))


def test_log_mel_distance_of_a_tenfold_gain_is_one():
    # every mel band of white noise stays far above the floor, so each log10 magnitude moves by exactly 1
    x = 0.01 * np.random.default_rng(3).standard_normal(SR)
    assert ev.log_mel_distance(x, 10 * x, SR) == pytest.approx(1.0, abs=1e-9)


def test_log_mel_distance_resamples_other_rates():
    x = harmonic_tone([60], 1.0)
    at_16k = x[::2]  # a 262 Hz tone is far below 8 kHz, so decimation keeps it intact
    assert ev.log_mel_distance(at_16k, at_16k, 16000) == 0.0
    assert ev.log_mel(at_16k, 16000).shape == ev.log_mel(x, SR).shape


# -- Opus and alignment ----------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0, 123, -77])
def test_best_lag_finds_a_known_delay_and_align_undoes_it(delay):
    x = synth_hum([60, 64, 67], SR, 0.3, seed=4).astype(np.float64)
    delayed = np.concatenate([np.zeros(delay), x]) if delay >= 0 else x[-delay:]
    assert ev.best_lag(x, delayed, 500) == delay
    aligned = ev.align(x, delayed, 500)
    assert aligned.shape == x.shape
    lost = max(0, -delay)  # an early estimate lacks the first -delay samples, which align fills with zeros
    np.testing.assert_array_equal(aligned[lost:], x[lost:])
    assert not aligned[:lost].any()


@pytest.mark.skipif(not ev.ffmpeg_available(), reason="ffmpeg is not installed")
def test_opus_roundtrip_keeps_length_and_alignment():
    x = synth_hum([60, 64, 67, 72], SR, 0.5, seed=0)
    coded = ev.opus_roundtrip(x, SR, 6.0)
    assert coded.shape == x.shape
    score = ev.si_sdr(x, coded)
    assert math.isfinite(score) and score > 0  # a misaligned or broken round trip scores below 0 dB
    assert ev.best_lag(x.astype(np.float64), coded, 1600) == 0


def test_opus_roundtrip_without_ffmpeg_says_so(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert not ev.ffmpeg_available()
    with pytest.raises(FileNotFoundError, match="ffmpeg"):
        ev.opus_roundtrip(np.zeros(SR), SR)


# -- melody: chroma cosine and hums ------------------------------------------------------------


def test_chroma_cosine_of_a_hum_with_itself_is_one_and_with_a_transposed_hum_low():
    notes = random_melody(seed=5, n_notes=8)
    hum = synth_hum(notes, SR, 0.5, seed=5)
    assert ev.chroma_cosine(hum, hum, SR) == pytest.approx(1.0)
    assert ev.chroma_cosine(hum, hum[: len(hum) // 2], SR) == pytest.approx(1.0)  # compared over the shorter
    transposed = synth_hum([n + 5 for n in notes], SR, 0.5, seed=5)
    assert ev.chroma_cosine(hum, transposed, SR) < 0.15


def test_chroma_cosine_is_the_fraction_of_frames_with_the_same_pitch_class():
    # the same A for 4 s, then A against D# for 4 s: about half of the 128 ms frames agree
    a = np.concatenate([harmonic_tone([57], 4.0), harmonic_tone([57], 4.0)])
    b = np.concatenate([harmonic_tone([57], 4.0), harmonic_tone([63], 4.0)])
    assert ev.chroma_cosine(a, b, SR) == pytest.approx(0.5, abs=0.05)


def test_random_melody_is_a_reproducible_scale_tune_from_tonic_to_tonic():
    for seed in range(20):
        notes = random_melody(seed, n_notes=10)
        assert notes == random_melody(seed, n_notes=10) and len(notes) == 10
        tonic = notes[0]
        assert notes[-1] in (tonic, tonic + 12)
        degrees = {(n - tonic) % 12 for n in notes}
        assert degrees <= set(MAJOR_SCALE) or degrees <= set(MINOR_SCALE)
        assert all(tonic - 5 <= n <= tonic + 16 for n in notes)
        assert all(abs(b - a) <= 7 for a, b in zip(notes[:-2], notes[1:-1]))  # at most a fifth between notes
    assert len({tuple(random_melody(seed)) for seed in range(20)}) > 15
    with pytest.raises(ValueError):
        random_melody(0, n_notes=1)


def test_hum_lasts_exactly_the_requested_time():
    notes, wav = ev.hum_for(seed=3, seconds=2.5, sr=SR)
    assert wav.shape == (round(2.5 * SR),) and notes == random_melody(3, len(notes))
    assert len(synth_hum([60, 62, 64], SR, 0.5)) == 3 * int(0.5 * SR) + 2 * int(0.08 * SR)


def test_melody_section_is_skipped_for_a_model_without_melody_conditioning():
    assert "skipped" in ev.evaluate_melody(SimpleNamespace(has_melody=False), prompts=2, seconds=1.0, seed=0)


# -- text: mode and tempo --------------------------------------------------------------------------


def triads(chords: list[list[int]], shift: int) -> np.ndarray:
    return np.concatenate([harmonic_tone([n + shift for n in chord], 1.0) for chord in chords])


@pytest.mark.parametrize("shift", range(12))
def test_estimate_mode_names_major_and_minor_cadences(shift):
    major = [[60, 64, 67], [65, 69, 72], [67, 71, 74], [60, 64, 67]]  # I-IV-V-I in C major
    minor = [[57, 60, 64], [62, 65, 69], [64, 68, 71], [57, 60, 64]]  # i-iv-V-i in A minor
    assert ev.estimate_mode(triads(major, shift), SR) == (ev.PITCH_CLASSES[shift], "major")
    assert ev.estimate_mode(triads(minor, shift), SR) == (ev.PITCH_CLASSES[(9 + shift) % 12], "minor")


def test_estimate_mode_of_silence_is_none():
    assert ev.estimate_mode(np.zeros(2 * SR), SR) is None


def test_onset_rate_counts_a_click_train():
    clicks = np.zeros(4 * SR)
    times = 0.125 + 0.25 * np.arange(16)
    clicks[np.round(times * SR).astype(int)] = 1.0
    assert ev.onset_rate(clicks, SR) == pytest.approx(16 / 4.0)
    np.testing.assert_allclose(ev.onset_times(clicks, SR), times, atol=0.025)


@pytest.mark.parametrize("notes_per_second", [1.0, 3.0, 6.0])
def test_onset_rate_counts_plucked_notes_whatever_the_level(notes_per_second):
    count = round(3 * notes_per_second)
    notes = [harmonic_tone([60 + (5 * i) % 12], 1 / notes_per_second, decay=0.2) for i in range(count)]
    wav = np.concatenate([np.zeros(SR // 4), *notes])  # a quarter second of silence, then the notes
    seconds = len(wav) / SR
    assert ev.onset_rate(wav, SR) == pytest.approx(count / seconds)
    assert ev.onset_rate(0.01 * wav, SR) == pytest.approx(count / seconds)
    starts = 0.25 + np.arange(count) / notes_per_second
    np.testing.assert_allclose(ev.onset_times(wav, SR), starts, atol=0.03)


def test_steady_sounds_have_no_onsets():
    assert ev.onset_rate(harmonic_tone([57, 61, 64], 3.0), SR) == 0.0
    assert ev.onset_rate(0.1 * np.random.default_rng(6).standard_normal(3 * SR), SR) == 0.0
    assert ev.onset_rate(np.zeros(SR), SR) == 0.0


# -- LM cross-entropy ------------------------------------------------------------------------------


class OracleLM(torch.nn.Module):
    """Knows the true token sequence: at input step s it puts logit 10 on the code of step s + 1
    (0 elsewhere), so a correctly aligned scorer sees CE = log(e^10 + card - 1) - 10 on every code,
    and an off-by-one scorer about 10 nats."""

    def __init__(self, tokens: torch.Tensor, card: int):
        super().__init__()
        self.tokens, self.card = tokens, card
        self.cfg = SimpleNamespace(special_token=card)

    def forward(self, tokens, conditions):
        assert torch.equal(tokens, self.tokens[:, :, :-1])  # the LM reads every step but the last
        following = self.tokens[:, :, 1:]  # [B, K, S-1]
        logits = torch.zeros(*following.shape, self.card + 1).scatter_(-1, following[..., None], 10.0)
        return logits[..., : self.card]  # the special token is never a prediction target


def test_codebook_cross_entropy_scores_each_code_by_the_prediction_for_its_slot():
    card, pattern = 5, DelayPattern(3)
    codes = torch.tensor([[[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 0, 4], [1, 3, 0, 2, 4, 1]]])  # [1, K=3, T=6]
    tokens = pattern.build(codes, card)
    model = SimpleNamespace(pattern=pattern, lm=OracleLM(tokens, card))
    ce = ev.codebook_cross_entropy(model, codes, conditions=None)
    assert ce.shape == codes.shape
    torch.testing.assert_close(ce, torch.full(codes.shape, math.log(math.exp(10) + card - 1) - 10))


def test_unigram_cross_entropy_by_hand():
    train = [torch.tensor([[0, 0, 0, 1], [2, 2, 3, 3]])]  # K=2, card=4
    test = [torch.tensor([[0, 2], [3, 3]])]
    # codebook 0: counts (3, 1, 0, 0) -> p = (4, 2, 1, 1) / 8; codebook 1: counts (0, 0, 2, 2) -> p = (1, 1, 3, 3) / 8
    expected = torch.tensor([-(math.log(4 / 8) + math.log(1 / 8)) / 2, -math.log(3 / 8)], dtype=torch.float64)
    torch.testing.assert_close(ev.unigram_cross_entropy(train, test, codebook_size=4), expected)


# -- the CLI end to end ----------------------------------------------------------------------------


@pytest.fixture
def tiny_data_dir(tmp_path):
    """Two held-out tones, one silent held-out file and one train tone, laid out like data.scores."""
    rows = []
    for name, split, midi in (("a", "test", 57), ("b", "train", 60), ("c", "test", 64), ("d", "test", None)):
        path = tmp_path / "audio" / "tones" / f"{name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.zeros(SR) if midi is None else harmonic_tone([midi], 1.5), SR)
        rows.append({"path": f"audio/tones/{name}.wav", "text": f"calm piano piece {name}, piano", "split": split})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


def test_held_out_excerpts_are_spread_over_the_split_and_a_silent_pick_is_replaced(tmp_path):
    # 3 pieces of 4 renderings each, sorted by path: the first 3 files would all be piece a
    rows = []
    for piece in "abc":
        for i in range(4):
            rel = f"audio/{piece}/{i}.wav"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            silent = piece == "b" and i == 0
            sf.write(tmp_path / rel, np.zeros(SR // 2) if silent else harmonic_tone([60], 0.5), SR)
            rows.append({"path": rel, "text": "piano", "split": "test"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    excerpts, skipped = ev.split_excerpts(scan(tmp_path), "test", 3, 0.5, SR)

    assert [e.file.rel for e in excerpts] == ["audio/a/0.wav", "audio/b/1.wav", "audio/c/0.wav"]
    assert skipped == ["audio/b/0.wav"]
    everything, _ = ev.split_excerpts(scan(tmp_path), "test", 20, 0.5, SR)
    assert len(everything) == 11


def test_cli_writes_a_report_with_every_section(tiny_melody_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "report" / "eval.json"
    args = ["--model", str(tiny_melody_dir), "--data", str(tiny_data_dir), "--max-files", "3", "--seconds", "1",
            "--prompts", "2", "--seed", "7"]
    assert ev.main(["all", *args, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "SI-SDR (dB)" in table and "chroma cosine with melody" in table and "mode accuracy" in table

    report = json.loads(out.read_text())
    config = json.loads((tiny_melody_dir / "config.json").read_text())
    k, card = config["decoder"]["num_codebooks"], config["audio_encoder"]["codebook_size"]
    codec = report["codec"]
    assert codec["bitrate_kbps"] == pytest.approx(k * math.log2(card) * 50 / 1000)
    assert [f["path"] for f in codec["files"]] == ["audio/tones/a.wav", "audio/tones/c.wav"]
    assert report["skipped_silent"] == ["audio/tones/d.wav"]
    assert math.isfinite(codec["si_sdr_db"]) and codec["log_mel_distance"] > 0
    assert (codec["opus"] is not None) == ev.ffmpeg_available()

    lm = report["lm"]
    assert len(lm["codebooks"]) == k and lm["baseline_source"] == "train split"
    for cb in lm["codebooks"]:
        assert cb["perplexity"] == pytest.approx(math.exp(cb["ce_nats"]))
        assert 0 < cb["unigram_ce_nats"] <= math.log(card) + 1e-9
    assert lm["scored_frames"] == 2 * 50

    melody, text = report["melody"], report["text"]
    assert len(melody["prompts"]) == 2 and 0 <= melody["chroma_cosine_with_melody"] <= 1
    assert melody["gain"] == pytest.approx(melody["chroma_cosine_with_melody"] - melody["chroma_cosine_without_melody"])
    assert len(text["mode_prompts"]) == 4 and len(text["tempo_prompts"]) == 4
    assert 0 <= text["mode_accuracy"] <= 1 and set(text["goal_met"]) == {"mode_accuracy", "tempo_ratio"}

    # seeded: the same run gives the same numbers
    model = musicgen_lite.load_model(tiny_melody_dir)
    again = ev.run_sections("all", model, tiny_data_dir, "test", 3, 1.0, 2, 7)
    assert json.loads(json.dumps(again)) == {k: v for k, v in report.items() if k != "model"}


def test_cli_usage_errors_exit_2_with_one_line(tiny_melody_dir, tiny_data_dir, capsys):
    assert ev.main(["codec", "--model", str(tiny_melody_dir)]) == 2
    err = capsys.readouterr().err
    assert err == "python -m musicgen_lite.evaluate: error: --data is needed for codec\n"  # before loading the model
    assert ev.main(["lm", "--model", str(tiny_melody_dir), "--data", str(tiny_data_dir), "--split", "valid"]) == 2
    assert "no non-silent valid files" in capsys.readouterr().err


def test_codec_report_without_ffmpeg_says_so_and_leaves_opus_out(tiny_melody_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setenv("PATH", "")
    out = tmp_path / "codec.json"
    assert ev.main(["codec", "--model", str(tiny_melody_dir), "--data", str(tiny_data_dir), "--seconds", "1",
                    "--out", str(out)]) == 0
    assert "opus: no ffmpeg" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["codec"]["opus"] is None and "ffmpeg" in report["codec"]["opus_missing"]
    assert "opus_si_sdr_db" not in report["codec"]["files"][0] and set(report["sections"]) == {"codec"}


def test_codec_section_scores_a_codec_of_another_size_in_place_of_the_models(tiny_melody_dir, tiny_data_dir, tmp_path,
                                                                            capsys):
    from transformers import EncodecModel

    from codebooks.codec import EncodecCodec

    config = musicgen_lite.load_model(tiny_melody_dir).codec.model.config
    bits = math.log2(config.codebook_size)
    config.codebook_size *= 2  # what train.py codec --codebook-size grows to: the model's LM cannot load it
    config.target_bandwidths = [b * (bits + 1) / bits for b in config.target_bandwidths]  # the same K codebooks
    EncodecCodec(EncodecModel(config)).save_pretrained(tmp_path / "grown")
    args = ["codec", "--model", str(tiny_melody_dir), "--data", str(tiny_data_dir), "--seconds", "1"]
    own, grown = tmp_path / "own.json", tmp_path / "grown.json"
    assert ev.main([*args, "--out", str(own)]) == 0
    assert ev.main([*args, "--codec", str(tmp_path / "grown"), "--out", str(grown)]) == 0
    own, grown = json.loads(own.read_text()), json.loads(grown.read_text())
    assert grown["codec_dir"] == str(tmp_path / "grown") and "codec_dir" not in own
    assert grown["codec"]["bitrate_kbps"] == pytest.approx(own["codec"]["bitrate_kbps"] * (bits + 1) / bits)
    assert [f["path"] for f in grown["codec"]["files"]] == [f["path"] for f in own["codec"]["files"]]
    capsys.readouterr()
    assert ev.main(["lm", "--model", str(tiny_melody_dir), "--data", str(tiny_data_dir), "--codec", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert ev.main([*args, "--codec", str(tmp_path / "none")]) == 2
    assert "no EnCodec checkpoint" in capsys.readouterr().err
