"""generate() / generate_continuation() behaviour: shapes, batches, saving, long outputs, seeds."""

import numpy as np
import pytest
import soundfile as sf
import torch

import musicgen_lite
from musicgen_lite.sampling import SamplingParams, sample_next


@pytest.fixture(scope="module")
def model(tiny_musicgen_dir):
    return musicgen_lite.load_model(tiny_musicgen_dir)


@pytest.fixture(scope="module")
def melody_model(tiny_melody_dir):
    return musicgen_lite.load_model(tiny_melody_dir)


def test_result_shapes_follow_duration(model):
    res = musicgen_lite.generate("a calm chorale", duration=0.5, model=model, seed=1)
    frames = round(0.5 * model.frame_rate)
    assert res.sample_rate == 32000
    assert res.tokens.shape == (1, 4, frames) and res.tokens.dtype == np.int64
    assert res.audio.shape == (1, 1, frames * model.codec.hop_length) and res.audio.dtype == np.float32
    assert res.tokens.min() >= 0 and res.tokens.max() < model.codec.codebook_size


def test_batch_and_save_numbered_files(model, tmp_path):
    res = musicgen_lite.generate(["one", "two", "three"], duration=0.2, model=model, seed=0)
    paths = res.save(tmp_path / "out.wav")
    assert [p.name for p in paths] == ["out_0.wav", "out_1.wav", "out_2.wav"]
    data, sr = sf.read(paths[1])
    assert sr == 32000 and data.shape[0] == res.audio.shape[-1]
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_same_seed_same_tokens_different_seed_differs(model):
    a = musicgen_lite.generate("piano", duration=0.4, model=model, seed=7)
    b = musicgen_lite.generate("piano", duration=0.4, model=model, seed=7)
    c = musicgen_lite.generate("piano", duration=0.4, model=model, seed=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert not np.array_equal(a.tokens, c.tokens)


def test_a_prompt_gives_the_same_output_at_any_batch_position(model):
    single = musicgen_lite.generate("piano sonata", duration=0.3, model=model, seed=3)
    first = musicgen_lite.generate(["piano sonata", "organ"], duration=0.3, model=model, seed=3)
    second = musicgen_lite.generate(["a long caption for an organ chorale", "piano sonata"], duration=0.3, model=model, seed=3)
    np.testing.assert_array_equal(single.tokens[0], first.tokens[0])
    np.testing.assert_array_equal(single.tokens[0], second.tokens[1])
    np.testing.assert_array_equal(single.audio[0], second.audio[1])


def test_a_list_of_seeds_gives_each_row_its_own(model):
    res = musicgen_lite.generate(["piano", "piano"], duration=0.3, model=model, seed=[1, 2])
    assert not np.array_equal(res.tokens[0], res.tokens[1])
    again = musicgen_lite.generate("piano", duration=0.3, model=model, seed=2)
    np.testing.assert_array_equal(res.tokens[1], again.tokens[0])
    with pytest.raises(ValueError, match="2 seeds for 3"):
        musicgen_lite.generate(["a", "b", "c"], duration=0.2, model=model, seed=[1, 2])


def test_extension_past_the_maximum_length_keeps_the_overlap(model):
    """With a 0.4 s window and 0.2 s stride, 1 s is made of windows that each continue the last."""
    model.max_duration, model.extend_stride = 0.4, 0.2
    try:
        long = musicgen_lite.generate("piano", duration=1.0, model=model, top_k=1)
        short = musicgen_lite.generate("piano", duration=0.4, model=model, top_k=1)
    finally:
        model.max_duration, model.extend_stride = 30.0, 18.0
    assert long.tokens.shape[-1] == 50
    np.testing.assert_array_equal(long.tokens[..., :20], short.tokens)  # the first window is a plain generation
    # each later window was prompted with the previous window's last 0.2 s: regenerate window 2 directly
    prompt = torch.from_numpy(long.tokens[..., 10:20])
    again = model.generate_tokens(["piano"], 20, SamplingParams(top_k=1), [torch.Generator()], prompt=prompt)
    np.testing.assert_array_equal(long.tokens[..., 10:30], again.numpy())


def test_melody_extension_slides_the_chromagram(melody_model):
    from hum import synth_hum

    hum = synth_hum([60, 62, 64, 65, 67, 69, 71, 72], note_seconds=0.5)
    melody_model.max_duration, melody_model.extend_stride = 0.4, 0.2
    try:
        res = musicgen_lite.generate("folk", melody=hum, melody_sample_rate=32000, duration=1.0, model=melody_model, top_k=1)
    finally:
        melody_model.max_duration, melody_model.extend_stride = 30.0, 18.0
    assert res.tokens.shape == (1, 4, 50)


def test_continuation_starts_with_the_prompt_codes(model):
    rng = np.random.default_rng(0)
    prompt = (0.1 * rng.standard_normal(int(0.3 * 44100))).astype(np.float32)
    res = musicgen_lite.generate_continuation(prompt, 44100, text="continue this", duration=0.6, model=model, seed=0)
    codes = model.codec.encode(torch.from_numpy(prompt)[None, None], 44100)
    assert res.tokens.shape[-1] == 30
    np.testing.assert_array_equal(res.tokens[..., : codes.shape[-1]], codes.numpy())
    with pytest.raises(ValueError, match="not shorter"):
        musicgen_lite.generate_continuation(prompt, 44100, text="x", duration=0.2, model=model)


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]]).repeat(2000, 1)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    k2 = sample_next(logits, SamplingParams(top_k=2), u)
    assert set(k2.tolist()) == {0, 1}
    p = sample_next(logits, SamplingParams(top_k=250, top_p=0.5), u)
    assert set(p.tolist()) == {0}  # the top code alone holds > 50 % of the mass
    greedy = sample_next(logits, SamplingParams(top_k=1), u)
    assert set(greedy.tolist()) == {0}
    # the empirical frequency matches the renormalised top-2 softmax
    expected = torch.softmax(torch.tensor([5.0, 4.0]), 0)[0].item()
    assert abs((k2 == 0).float().mean().item() - expected) < 0.04


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text=""), "empty"),
        (dict(text="   "), "empty"),
        (dict(text=[]), "non-empty"),
        (dict(text=["ok", 3]), "strings"),
        (dict(duration=0), "> 0"),
        (dict(duration=-1), "> 0"),
        (dict(duration=1e6), "limit"),
        (dict(duration=float("nan")), "number"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(temperature=0), "temperature"),
        (dict(melody="/nonexistent/hum.wav"), "hum.wav"),
    ],
)
def test_bad_input_is_a_one_line_error(model, kwargs, message):
    args = dict(text="piano", duration=0.2, model=model)
    args.update(kwargs)
    text = args.pop("text")
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        musicgen_lite.generate(text, **args)
    assert "\n" not in str(err.value)


def test_melody_on_a_text_only_model_is_refused(model):
    from hum import synth_hum

    with pytest.raises(ValueError, match="no melody conditioning"):
        musicgen_lite.generate("x", melody=synth_hum([60, 62]), melody_sample_rate=32000, duration=0.2, model=model)


def test_bad_melody_files(melody_model, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(32000, dtype=np.float32), 32000)
    short = tmp_path / "short.wav"
    sf.write(short, 0.3 * np.sin(np.arange(100) / 5).astype(np.float32), 32000)
    for path, message in ((not_audio, "audio"), (silent, "silent"), (short, "at least")):
        with pytest.raises(ValueError, match=message):
            musicgen_lite.generate("x", melody=str(path), duration=0.2, model=melody_model)


def test_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model directory"):
        musicgen_lite.load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        musicgen_lite.load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        musicgen_lite.load_model("facebook/musicgen-nonexistent-model")


def test_model_dir_missing_weights(tiny_musicgen_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_musicgen_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="not a complete model directory"):
        musicgen_lite.load_model(broken)


def test_guidance_applies_only_above_one(model):
    """As transformers' MusicGen adds its guidance processor only for guidance_scale > 1, coefficients in
    [0, 1] sample the conditional logits unmixed: the tokens of cfg_coef=1, which test_fidelity checks
    against transformers. (transformers itself cannot be the oracle below 1: its generic unbatched
    guidance path takes over there and fails on MusicGen.)"""
    tokens = {c: musicgen_lite.generate("a waltz", duration=0.4, model=model, seed=5, cfg_coef=c).tokens
              for c in (0.0, 0.5, 1.0, 3.0)}
    assert np.array_equal(tokens[0.0], tokens[1.0]) and np.array_equal(tokens[0.5], tokens[1.0])
    assert not np.array_equal(tokens[3.0], tokens[1.0])
