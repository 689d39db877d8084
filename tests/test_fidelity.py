"""Greedy decoding must give exactly transformers' tokens on the same weights."""

import numpy as np
import pytest
import torch

import musicgen_lite
from tiny_models import hf_greedy_tokens
from hum import synth_hum

CAPTIONS = ["mozart sonata allegro in a bright major key with fast runs", "sad adagio"]


@pytest.fixture(scope="module")
def musicgen(tiny_musicgen_dir):
    return musicgen_lite.load_model(tiny_musicgen_dir)


@pytest.fixture(scope="module")
def melody_model(tiny_melody_dir):
    return musicgen_lite.load_model(tiny_melody_dir)


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_musicgen_greedy_tokens_equal_transformers_on_a_padded_batch(tiny_musicgen_dir, musicgen, cfg):
    frames = 24
    result = musicgen_lite.generate(CAPTIONS, duration=frames / 50, model=musicgen, top_k=1, cfg_coef=cfg)
    expected = hf_greedy_tokens(tiny_musicgen_dir, CAPTIONS, frames, guidance_scale=cfg)
    assert result.tokens.shape == (2, 4, frames)
    np.testing.assert_array_equal(result.tokens, expected.numpy())


def test_a_large_models_step_reads_its_embedding_tables_in_place_with_the_same_tokens(tiny_musicgen_dir, musicgen, monkeypatch):
    """Above SMALL_STEP_BYTES of step weights the K tables are looked up where they lie, not stacked."""
    monkeypatch.setattr(musicgen_lite.lm, "SMALL_STEP_BYTES", 0)
    frames = 24
    result = musicgen_lite.generate(CAPTIONS, duration=frames / 50, model=musicgen, top_k=1, cfg_coef=3.0)
    np.testing.assert_array_equal(result.tokens, hf_greedy_tokens(tiny_musicgen_dir, CAPTIONS, frames, guidance_scale=3.0).numpy())


def test_padding_does_not_change_a_prompt(musicgen):
    """A short caption batched with a long one decodes as it does alone (padding is masked)."""
    alone = musicgen_lite.generate(CAPTIONS[1], duration=0.3, model=musicgen, top_k=1)
    batched = musicgen_lite.generate(CAPTIONS, duration=0.3, model=musicgen, top_k=1)
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[1])


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_melody_greedy_tokens_equal_transformers_for_a_hummed_wav(tiny_melody_dir, melody_model, cfg, tmp_path):
    import soundfile as sf

    hum = synth_hum([60, 62, 64, 65, 67, 65, 64], sample_rate=44100)
    path = tmp_path / "hum.wav"
    sf.write(path, hum, 44100)
    frames = 30
    ours = musicgen_lite.generate("folk tune", melody=str(path), duration=frames / 50, model=melody_model, top_k=1, cfg_coef=cfg)
    # our chromagram of the same file is what transformers receives as input_features
    from conditioning.chroma import load_melody

    features = melody_model.melody_features([load_melody(str(path), None, 32000)])
    assert features.shape[-1] == 12 and torch.all(features.sum(-1) == 1)
    expected = hf_greedy_tokens(tiny_melody_dir, ["folk tune"], frames, guidance_scale=cfg, input_features=features)
    np.testing.assert_array_equal(ours.tokens, expected.numpy())


def test_melody_model_without_melody_equals_transformers(tiny_melody_dir, melody_model):
    ours = musicgen_lite.generate(CAPTIONS, duration=0.4, model=melody_model, top_k=1)
    expected = hf_greedy_tokens(tiny_melody_dir, CAPTIONS, 20, guidance_scale=3.0)
    np.testing.assert_array_equal(ours.tokens, expected.numpy())


def test_melody_changes_the_output(melody_model):
    a = musicgen_lite.generate("folk tune", melody=synth_hum([60, 64, 67]), melody_sample_rate=32000, duration=0.4, model=melody_model, top_k=1)
    b = musicgen_lite.generate("folk tune", melody=synth_hum([61, 66, 70]), melody_sample_rate=32000, duration=0.4, model=melody_model, top_k=1)
    c = musicgen_lite.generate("folk tune", duration=0.4, model=melody_model, top_k=1)
    assert not np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)


def test_own_format_round_trip_keeps_tokens(musicgen, melody_model, tmp_path):
    for name, model in (("mg", musicgen), ("mel", melody_model)):
        model.save_pretrained(tmp_path / name)
        reloaded = musicgen_lite.load_model(tmp_path / name)
        a = musicgen_lite.generate(CAPTIONS, duration=0.3, model=model, top_k=1)
        b = musicgen_lite.generate(CAPTIONS, duration=0.3, model=reloaded, top_k=1)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.audio, b.audio, atol=1e-6)
