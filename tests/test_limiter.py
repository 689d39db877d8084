"""The look-ahead true-peak limiter: -14 LUFS reached on piano-like transients with true peaks at most
-1 dBTP, checked with independent meters (pyloudnorm for loudness, ffmpeg's ebur128 for true peak),
and the limits that keep it from pumping (at most 8 dB of reduction, a release of 50 ms or more)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import soundfile as sf

from musicgen_lite.audio_io import LoudnessWarning, loudness, normalize_loudness, write_audio
from musicgen_lite.limiter import MAX_REDUCTION_DB, RELEASE_SECONDS, limiter_gain

FS = 32000


def piano_like(seconds: float = 6.0, seed: int = 0) -> np.ndarray:
    """[1, N] notes with a 1 ms attack and a fast decay, some accented: peaks 17-20 dB above the loudness,
    as a piano's transients are."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * FS)) / FS
    out = np.zeros_like(t)
    for start in np.arange(0.1, seconds - 0.5, 0.3):
        f0 = 110.0 * 2 ** (rng.integers(0, 36) / 12)
        s = t[t >= start] - start
        tone = sum(np.sin(2 * np.pi * f0 * h * s + rng.uniform(0, 2 * np.pi)) / h**1.5 for h in range(1, 8))
        envelope = np.minimum(s / 0.001, 1.0) * np.exp(-s / 0.12)
        out[t >= start] += (1.0 if rng.random() < 0.2 else 0.4) * envelope * tone
    return (0.05 * out / np.abs(out).max())[None].astype(np.float32)


def ffmpeg_true_peak(path) -> float:
    """dBTP of a file by ffmpeg's ebur128 filter (peak=true), an implementation independent of ours."""
    proc = subprocess.run(["ffmpeg", "-nostats", "-hide_banner", "-i", str(path), "-af", "ebur128=peak=true", "-f", "null", "-"],
                          capture_output=True, text=True, check=True)
    return float(re.findall(r"Peak:\s+(-?[\d.]+|-inf) dBFS", proc.stderr)[-1])


def test_piano_transients_reach_minus_14_lufs_under_minus_1_dbtp(tmp_path):
    pyln = pytest.importorskip("pyloudnorm")
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    x = piano_like()
    peak_to_loudness = 20 * math.log10(np.abs(x).max()) - loudness(x, FS)
    assert peak_to_loudness > 15  # scaling alone would land near -20 LUFS
    with warnings.catch_warnings(record=True) as caught:  # ~20 dB needs nearly all 8 dB: perhaps -14.2
        warnings.simplefilter("always", LoudnessWarning)
        path = write_audio(tmp_path / "piano.wav", x, FS, loudness=-14.0)
    data, rate = sf.read(path)
    level = pyln.Meter(rate).integrated_loudness(data)
    assert level == pytest.approx(-14.0, abs=1.0)
    for w in caught:  # a shortfall, if any, is reported with the level the file has
        assert float(re.search(r"reached (-[\d.]+) LUFS", str(w.message)).group(1)) == pytest.approx(loudness(data.T, rate), abs=0.06)
    assert ffmpeg_true_peak(path) <= -1.0


def test_the_limiter_reduces_at_most_8_db_starts_before_a_peak_and_releases_slowly():
    x = np.zeros((1, FS))
    x[0, FS // 2] = 4.0  # one click 13 dB over a -1 dBTP ceiling
    x[0] += 0.01 * np.sin(np.arange(FS) / 7)
    gain_db = 20 * np.log10(limiter_gain(x, FS, ceiling_db=-1.0))
    assert gain_db.min() == pytest.approx(-MAX_REDUCTION_DB, abs=1e-6)  # bounded, though more was asked
    assert gain_db[FS // 2 - 10 : FS // 2 + 11].max() == pytest.approx(-MAX_REDUCTION_DB, abs=0.5)  # down before it
    assert gain_db[: FS // 2 - 400].min() > -1e-6  # untouched long before the peak
    after = gain_db[FS // 2 + int(0.01 * FS) :]  # past the look-ahead window: the release alone
    rate = np.diff(np.log(np.maximum(-after, 1e-9)))  # d(log attenuation) per sample >= -1 / release samples
    assert rate.min() >= -1.0 / (RELEASE_SECONDS * FS) - 1e-9 and RELEASE_SECONDS >= 0.05
    assert -after[int(0.05 * FS)] > 0.3 * MAX_REDUCTION_DB  # 50 ms later the gain is still well down


def test_when_the_bound_stops_it_the_level_reached_is_reported():
    """Sparse clicks over a quiet bed: reaching -14 LUFS would need far more than 8 dB of limiting."""
    x = np.full(4 * FS, 0.0)
    x[:: FS // 4] = 0.9
    x += 10 ** (-60 / 20) * math.sqrt(2) * np.sin(2 * np.pi * 440 * np.arange(4 * FS) / FS)
    with pytest.warns(LoudnessWarning, match=r"reached -\d+\.\d LUFS, not -14") as caught:
        out = normalize_loudness(x[None].astype(np.float32), FS, target=-14.0)
    reached = float(re.search(r"reached (-[\d.]+)", str(caught[0].message)).group(1))
    assert loudness(out, FS) == pytest.approx(reached, abs=0.05) and reached < -14.5


def test_write_audio_names_the_file_that_fell_short(tmp_path):
    x = np.zeros((1, 2 * FS), dtype=np.float32)
    x[0, :: FS // 4] = 0.9
    with pytest.warns(LoudnessWarning, match=r"clicks\.wav: reached -\d"):
        write_audio(tmp_path / "clicks.wav", x, FS, loudness=-14.0)
