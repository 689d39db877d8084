"""The bundled default model: a user's first command works offline with no model argument."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import musicgen_lite
from musicgen_lite.checkpoints import DEFAULT_MODEL_DIR, load_default_model

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_model_is_a_32khz_four_codebook_melody_model_under_80_mb():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 80e6, f"{size / 1e6:.1f} MB"
    model = load_default_model()
    assert (model.sample_rate, model.codec.num_codebooks, model.frame_rate) == (32000, 4, 50)
    assert model.chroma is not None  # follows a hummed melody
    params = [p for m in (model.lm, model.codec.model, model.text) for p in m.parameters()]
    assert all(torch.isfinite(p).all() for p in params)


def test_generate_without_a_model_uses_the_bundled_one():
    res = musicgen_lite.generate("mozart sonata allegro", duration=1.0, seed=0)
    assert res.audio.shape == (1, 1, 32000) and res.tokens.shape == (1, 4, 50)
    assert np.isfinite(res.audio).all() and np.sqrt(np.mean(res.audio**2)) > 1e-3  # sound, not silence
    again = musicgen_lite.generate("mozart sonata allegro", duration=1.0, seed=0)
    assert np.array_equal(res.tokens, again.tokens)


@pytest.mark.slow
def test_first_command_writes_five_seconds_of_music_offline(tmp_path):
    from hum import synth_hum

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = tmp_path / "sonata.wav"
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--text", "mozart sonata allegro",
                           "--duration", "5", "--out", str(out), "--seed", "0"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    audio, rate = sf.read(out)
    assert rate == 32000 and len(audio) >= 5 * 32000
    assert np.sqrt(np.mean(audio**2)) > 0.01 and np.abs(audio).max() < 1.0  # loud enough, not clipped
    pyln = pytest.importorskip("pyloudnorm")
    assert pyln.Meter(rate).integrated_loudness(audio) == pytest.approx(-14.0, abs=1.0)  # piano at the promised level

    hum = tmp_path / "hum.wav"
    sf.write(hum, synth_hum([60, 62, 64, 65, 67, 65, 64, 62]), 32000)
    out = tmp_path / "hummed.wav"
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--text", "folk tune, piano", "--melody",
                           str(hum), "--duration", "5", "--out", str(out), "--seed", "0"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    audio, rate = sf.read(out)
    assert rate == 32000 and len(audio) >= 5 * 32000 and np.sqrt(np.mean(audio**2)) > 0.01


def _with_lm_config(tmp_path: Path, rename: dict[str, str], extra: dict | None = None) -> Path:
    """The shipped model directory (files linked, not copied) with its config.json's "lm" keys renamed
    (an edited copy: the shipped checksums no longer apply to it and are left out)."""
    import json

    out = tmp_path / "model"
    out.mkdir(parents=True)
    for entry in DEFAULT_MODEL_DIR.iterdir():
        if entry.name not in ("config.json", "checksums.sha256"):
            (out / entry.name).symlink_to(entry)
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    config["lm"] = {rename.get(k, k): v for k, v in config["lm"].items()} | (extra or {})
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_model_directories_with_the_earlier_key_names_load_their_real_values(tmp_path):
    import json

    shipped = load_default_model()
    saved = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["lm"]
    assert shipped.lm.cfg.codebook_size == saved.get("card", saved.get("codebook_size")) == shipped.codec.codebook_size
    assert shipped.lm.cfg.codebook_size != type(shipped.lm.cfg)().codebook_size  # not the class default (2048)
    old = musicgen_lite.load_model(_with_lm_config(tmp_path / "old", {"codebook_size": "card"}))
    new = musicgen_lite.load_model(_with_lm_config(tmp_path / "new", {"card": "codebook_size"}))
    assert old.lm.cfg == new.lm.cfg == shipped.lm.cfg
    a = musicgen_lite.generate("folk tune", duration=0.4, model=old, seed=1).tokens
    assert np.array_equal(a, musicgen_lite.generate("folk tune", duration=0.4, model=new, seed=1).tokens)


def test_a_config_key_this_version_does_not_know_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown LM config keys cardinality"):
        musicgen_lite.load_model(_with_lm_config(tmp_path, {}, {"cardinality": 1024}))
