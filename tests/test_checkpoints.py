"""Checkpoints in and out: transformers' directories read directly (sharded or not, no MusicGen modelling
class), a loaded model saved and fine-tuned after it generated, and `musicgen_lite.export`: our models,
trained here, decode in transformers exactly as they do in musicgen_lite."""

from __future__ import annotations

import copy
import json
import mmap
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

import musicgen_lite
from hum import synth_hum
from musicgen_lite.training import lm as train_lm
from musicgen_lite.checkpoints import load_default_model
from musicgen_lite.weight_files import SafetensorsFile, WeightFiles, release
from tiny_models import build_tiny_musicgen, hf_greedy_tokens, load_hf

ROOT = Path(__file__).resolve().parents[1]
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
        ours = musicgen_lite.generate(prompt, melody=melody, melody_sample_rate=32000, duration=FRAMES / 50, model=model, top_k=1, cfg_coef=3.0)
        features = None if melody is None else model.melody_features([torch.from_numpy(melody)])
        theirs = hf_greedy_tokens(directory, [prompt], FRAMES, input_features=features)
        np.testing.assert_array_equal(ours.tokens, theirs.numpy(), err_msg=prompt)


@pytest.mark.slow
def test_a_trained_melody_model_exports_to_musicgen_melody(melody_model, tmp_path):
    from transformers import MusicgenMelodyForConditionalGeneration

    musicgen_lite.generate("x", duration=0.1, model=melody_model, top_k=1)  # its step weights are packed now
    directory = musicgen_lite.export(melody_model, tmp_path / "exported")
    assert isinstance(load_hf(directory)[0], MusicgenMelodyForConditionalGeneration)
    assert_transformers_decodes_it(melody_model, directory, PROMPTS)
    assert_transformers_decodes_it(melody_model, directory, PROMPTS[:1], melody=synth_hum([60, 64, 67, 72]))


@pytest.mark.slow
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
    assert load_default_model().lm.precision == "fp16"  # saved in fp16, decoded so by default
    model = load_default_model("fp32")  # the same numbers in fp32: what transformers computes with
    directory = musicgen_lite.export(model, tmp_path / "default")
    assert model.melody_prior is not None and musicgen_lite.load_model(directory).melody_prior is None
    model.melody_prior = None  # transformers' format has no melody prior: it decodes as --no-prior does
    assert_transformers_decodes_it(model, directory, PROMPTS[:2])
    assert model.generation_defaults.cfg_coef == 14.0  # the bundled model's own, carried by the export
    assert musicgen_lite.load_model(directory).generation_defaults == model.generation_defaults


def test_export_refusals(tiny_musicgen_dir, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        musicgen_lite.export(tiny_musicgen_dir, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="loaded in fp32"):
        musicgen_lite.export(musicgen_lite.load_model(tiny_musicgen_dir, precision="int8"), tmp_path / "x")
    assert not list(tmp_path.iterdir())


# -- loading ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loading_builds_no_transformers_musicgen_class(tiny_musicgen_dir, tiny_melody_dir):
    code = (
        "import sys, musicgen_lite\n"
        f"for d in {[str(tiny_musicgen_dir), str(tiny_melody_dir)]!r}:\n"
        "    musicgen_lite.generate('x', duration=0.1, model=musicgen_lite.load_model(d), top_k=1)\n"
        "def modelling():\n"
        "    return sorted(m for m in sys.modules if m.startswith('transformers.models.musicgen') and '.modeling' in m)\n"
        "print(modelling())\n"
        "from transformers import MusicgenForConditionalGeneration\n"
        "print(modelling())\n"  # the check sees such an import when there is one
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    after_loading, after_import = out.strip().splitlines()
    assert after_loading == "[]"
    assert "transformers.models.musicgen.modeling_musicgen" in after_import


def test_a_sharded_checkpoint_loads_like_the_single_file(tiny_melody_dir, tmp_path):
    hf, tokenizer = load_hf(tiny_melody_dir)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    tokenizer.save_pretrained(sharded)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (sharded / "model.safetensors").exists()
    a = musicgen_lite.generate(PROMPTS, duration=0.3, model=musicgen_lite.load_model(sharded), top_k=1)
    b = musicgen_lite.generate(PROMPTS, duration=0.3, model=musicgen_lite.load_model(tiny_melody_dir), top_k=1)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    shard = sharded / sorted(set(index["weight_map"].values()))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"shard {shard.name} is missing"):
        musicgen_lite.load_model(sharded)


def test_a_model_saved_in_fp16_decodes_in_fp16_and_keeps_its_values(tiny_default_like_dir, tmp_path):
    full = musicgen_lite.load_model(tiny_default_like_dir)
    assert full.lm.precision == "fp32"
    full.save_pretrained(tmp_path / "half", precision="fp16")
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    assert config["precision"] == "fp16"
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (tiny_default_like_dir / "model.safetensors").stat().st_size
    half = musicgen_lite.load_model(tmp_path / "half")
    assert half.lm.precision == "fp16"
    widened = musicgen_lite.load_model(tmp_path / "half", precision="fp32")
    expected = {k: v.half().float() for k, v in full.lm.state_dict().items()}
    for states in (widened.lm.state_dict(), half.lm.state_dict()):  # fp16 packed weights unpack exactly
        assert states.keys() == expected.keys()
        for name, value in states.items():
            assert torch.equal(value, expected[name]), name
    half.save_pretrained(tmp_path / "again")  # an fp16 model saves as it loaded, in fp16
    assert json.loads((tmp_path / "again" / "config.json").read_text())["precision"] == "fp16"
    again = musicgen_lite.load_model(tmp_path / "again", precision="fp32").lm.state_dict()
    assert all(torch.equal(again[k], v) for k, v in expected.items())
    widened.save_pretrained(tmp_path / "wide")  # an LM computing in fp32 saves in fp32
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["precision"] == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        full.save_pretrained(tmp_path / "x", precision="bf16")
    config["precision"] = "int4"
    (tmp_path / "half" / "config.json").write_text(json.dumps(config))
    (tmp_path / "half" / "checksums.sha256").unlink()
    with pytest.raises(ValueError, match="precision must be one of"):
        musicgen_lite.load_model(tmp_path / "half")


def test_weights_are_read_in_any_float_dtype(tmp_path):
    half = torch.randn(5, 3).half()
    save_file({"w": half}, tmp_path / "w.safetensors")
    out = torch.empty(5, 3)
    SafetensorsFile(tmp_path / "w.safetensors").read_into("w", out)
    assert torch.equal(out, half.float())


def test_views_of_a_mapped_file_keep_in_place_changes_to_themselves(tmp_path):
    """A weight changed in place (fine-tuning) never reaches the file, and releasing the pages of a
    neighbour that was copied elsewhere does not undo it."""
    n = mmap.PAGESIZE  # floats: 4 pages each; the first shares a page with the header, the last with `b`
    a, b = torch.arange(float(n)), -torch.arange(float(n))
    save_file({"a": a, "b": b}, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    with WeightFiles(tmp_path) as weights:
        va, vb = weights.view("a"), weights.view("b")
    assert torch.equal(va, a) and torch.equal(vb, b)  # the views outlive the closed WeightFiles
    va += 1
    vb += 1
    release(va)  # as when `a` has been packed: its own pages go, and come back from the file when read
    assert va[n // 2] == a[n // 2]  # a page wholly inside `a` is read again from the file
    assert va[0] == a[0] + 1 and va[-1] == a[-1] + 1  # the pages it shares are kept
    assert torch.equal(vb, b + 1)
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_a_fused_weight_waits_in_the_file_and_reads_the_same_everywhere(tiny_musicgen_dir):
    model = musicgen_lite.load_model(tiny_musicgen_dir)
    qkv = model.lm.layers[0].self_attn.qkv
    assert dict.__getitem__(qkv._parameters, "weight").numel() == 0  # q, k and v not read yet
    with WeightFiles(tiny_musicgen_dir) as weights:
        parts = [weights.tensor(f"decoder.model.decoder.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    clone = copy.deepcopy(model.lm)
    assert torch.equal(clone.layers[0].self_attn.qkv.weight, torch.cat(parts))
    assert torch.equal(model.lm.state_dict()["layers.0.self_attn.qkv.weight"], torch.cat(parts))


@pytest.mark.slow
def test_loading_a_checkpoint_maps_it_and_generating_holds_one_copy(tiny_musicgen_dir, tmp_path):
    """load_model copies no weight of a transformers checkpoint (its pages are read at first use, as
    transformers does); generating packs the step weights and gives the mapped pages back."""
    directory = build_tiny_musicgen(tmp_path / "m", hidden_size=512, num_layers=10, codebook_size=64)
    lm_bytes = sum(e[2][1] - e[2][0] for name, e in SafetensorsFile(directory / "model.safetensors").entries.items()
                   if name.startswith("decoder."))
    code = (
        "import json, musicgen_lite\n"
        "def kb(field):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))\n"
        f"musicgen_lite.generate('x', duration=0.2, model=musicgen_lite.load_model({str(tiny_musicgen_dir)!r}))\n"
        "anon, rss = kb('RssAnon'), kb('VmRSS')  # after a first generation's imports and set-up\n"
        f"model = musicgen_lite.load_model({str(directory)!r})\n"
        "loaded = kb('RssAnon') - anon\n"
        "musicgen_lite.generate('x', duration=0.2, model=model, top_k=1)\n"
        "print(json.dumps({'loaded': loaded * 1024, 'generated': (kb('VmRSS') - rss) * 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    grown = json.loads(out.strip().splitlines()[-1])
    assert lm_bytes > musicgen_lite.lm.SMALL_STEP_BYTES  # a large model's decoding path
    assert grown["loaded"] < 0.1 * lm_bytes  # a copied LM: 1.0
    assert grown["generated"] < 1.3 * lm_bytes  # the packed weights beside the pages they came from: 2.0


@pytest.mark.slow
def test_a_model_that_generated_saves_and_fine_tunes(tiny_musicgen_dir, data_dir, tmp_path):
    model = musicgen_lite.load_model(tiny_musicgen_dir)
    before = musicgen_lite.generate(PROMPTS, duration=0.2, model=model, top_k=1)  # packs its step weights
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "checksums.sha256").is_file()
    again = musicgen_lite.generate(PROMPTS, duration=0.2, model=musicgen_lite.load_model(tmp_path / "saved"), top_k=1)
    np.testing.assert_array_equal(before.tokens, again.tokens)
    run = tmp_path / "run"
    fast = ["--segment-seconds", "0.5", "--batch-size", "4", "--num-workers", "0", "--max-steps", "2"]
    assert train_lm.main(["--data", str(data_dir), "--out", str(run), "--model", str(tmp_path / "saved"), *fast]) == 0
    tuned = musicgen_lite.load_model(run)
    assert not torch.equal(tuned.lm.heads.weight, model.lm.heads.weight)


def test_a_flipped_byte_in_any_file_of_an_own_model_is_caught(tiny_musicgen_dir, tmp_path):
    musicgen_lite.load_model(tiny_musicgen_dir).save_pretrained(tmp_path / "saved")
    for name in ("codec/model.safetensors", "text_encoder/model.safetensors", "config.json"):
        broken = tmp_path / name.replace("/", "_")
        shutil.copytree(tmp_path / "saved", broken)
        data = bytearray((broken / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (broken / name).write_bytes(bytes(data))
        with pytest.raises(ValueError, match=f"{name} is corrupt: its sha256 differs"):
            musicgen_lite.load_model(broken)


def test_a_saved_model_keeps_its_batching_under_its_checksums(tiny_melody_dir, tmp_path):
    """A transformers checkpoint saved in the project's format stays batched as transformers does: the
    flag is in config.json, which the manifest covers; a mistyped flag is refused in one line."""
    musicgen_lite.load_model(tiny_melody_dir).save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["batch_like_transformers"] is True
    assert "  config.json\n" in (tmp_path / "saved" / "checksums.sha256").read_text()
    (tmp_path / "saved" / "checksums.sha256").unlink()
    (tmp_path / "saved" / "config.json").write_text(json.dumps({**config, "batch_like_transformers": "yes"}))
    with pytest.raises(ValueError, match="batch_like_transformers must be true or false, got 'yes'"):
        musicgen_lite.load_model(tmp_path / "saved")


def test_a_module_built_empty_must_hold_nothing_outside_its_state_dict(tmp_path):
    """Filling a module built on the meta device gives every state_dict tensor its values; a tensor
    outside the state_dict (a precomputed table, say) would be left meta or uninitialised, so it is refused."""
    from musicgen_lite.weight_files import WeightFiles

    save_file({"w": torch.randn(4, 3)}, tmp_path / "model.safetensors")
    with torch.device("meta"):
        plain, stray = torch.nn.Linear(3, 4, bias=False), torch.nn.Linear(3, 4, bias=False)
        stray.register_buffer("table", torch.ones(3), persistent=False)
    with WeightFiles(tmp_path) as weights:
        weights.fill(plain, {"weight": ["w"]})
        assert torch.equal(plain.weight, weights.tensor("w"))
        with pytest.raises(AssertionError, match="table is not in its state_dict"):
            weights.fill(stray, {"weight": ["w"]})
