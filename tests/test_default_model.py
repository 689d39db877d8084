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
