"""`musicgen_lite.export`: our models, trained here, decode in transformers exactly as they do in musicgen_lite."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

import musicgen_lite
from hum import synth_hum
from musicgen_lite import train_lm
from musicgen_lite.checkpoints import load_default_model
from tiny_models import hf_greedy_tokens, load_hf

PROMPTS = ["mozart sonata allegro in a bright major key with fast runs", "sad adagio", "bach chorale, organ"]
FRAMES = 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Six captioned sine-tone clips, two of them for validation."""
    d = tmp_path_factory.mktemp("export_data")
    t = np.arange(2 * 32000) / 32000
    for i, caption in enumerate(["bach chorale, organ", "mozart sonata, piano", "sad adagio, strings",
                                 "chopin nocturne, piano", "haydn quartet", "satie gymnopedie"]):
        sf.write(d / f"clip{i}.wav", (0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t)).astype(np.float32), 32000)
        (d / f"clip{i}.txt").write_text(caption)
    return d


def trained(tmp_path_factory, data_dir, *args) -> musicgen_lite.MusicGen:
    run = tmp_path_factory.mktemp("export_run") / "run"
    fast = ["--segment-seconds", "0.5", "--batch-size", "4", "--num-workers", "0", "--max-steps", "3", "--lr", "1e-2"]
    assert train_lm.main(["--data", str(data_dir), "--out", str(run), *fast, *map(str, args)]) == 0
    return musicgen_lite.load_model(run)


@pytest.fixture(scope="module")
def melody_model(tmp_path_factory, data_dir, tiny_musicgen_dir):
    """Built like the bundled model: a prefix LM with chroma, its own small T5 trained from the captions."""
    codec = tmp_path_factory.mktemp("export_codec")
    musicgen_lite.load_model(tiny_musicgen_dir).codec.save_pretrained(codec)
    return trained(tmp_path_factory, data_dir, "--codec", codec, "--preset", "tiny", "--melody")


@pytest.fixture(scope="module")
def cross_model(tmp_path_factory, data_dir, tiny_musicgen_dir):
    """A cross-attention MusicGen fine-tuned for a few steps."""
    return trained(tmp_path_factory, data_dir, "--model", tiny_musicgen_dir)


def assert_transformers_decodes_it(model, directory, prompts, melody=None):
    for prompt in prompts:
        ours = musicgen_lite.generate(prompt, melody=melody, melody_sample_rate=32000, duration=FRAMES / 50, model=model, top_k=1)
        features = None if melody is None else model.melody_features([torch.from_numpy(melody)])
        theirs = hf_greedy_tokens(directory, [prompt], FRAMES, input_features=features)
        np.testing.assert_array_equal(ours.tokens, theirs.numpy(), err_msg=prompt)


def test_a_trained_melody_model_exports_to_musicgen_melody(melody_model, tmp_path):
    from transformers import MusicgenMelodyForConditionalGeneration

    musicgen_lite.generate("x", duration=0.1, model=melody_model, top_k=1)  # its step weights are packed now
    directory = musicgen_lite.export(melody_model, tmp_path / "exported")
    assert isinstance(load_hf(directory)[0], MusicgenMelodyForConditionalGeneration)
    assert_transformers_decodes_it(melody_model, directory, PROMPTS)
    assert_transformers_decodes_it(melody_model, directory, PROMPTS[:1], melody=synth_hum([60, 64, 67, 72]))


def test_a_fine_tuned_musicgen_exports_to_musicgen(cross_model, tmp_path):
    from transformers import MusicgenForConditionalGeneration

    directory = musicgen_lite.export(cross_model, tmp_path / "exported")
    assert isinstance(load_hf(directory)[0], MusicgenForConditionalGeneration)
    assert_transformers_decodes_it(cross_model, directory, PROMPTS)
    again = musicgen_lite.load_model(directory)  # and it loads back as any transformers checkpoint does
    a = musicgen_lite.generate(PROMPTS, duration=0.2, model=cross_model, top_k=1)
    b = musicgen_lite.generate(PROMPTS, duration=0.2, model=again, top_k=1)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_the_bundled_model_exports(tmp_path):
    model = load_default_model()
    directory = musicgen_lite.export(model, tmp_path / "default")
    assert_transformers_decodes_it(model, directory, PROMPTS[:2])


def test_export_refusals(tiny_musicgen_dir, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        musicgen_lite.export(tiny_musicgen_dir, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="loaded in fp32"):
        musicgen_lite.export(musicgen_lite.load_model(tiny_musicgen_dir, precision="int8"), tmp_path / "x")
    assert not list(tmp_path.iterdir())
