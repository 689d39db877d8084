"""Loudness (ITU-R BS.1770-4) against published and hand-derived values; normalisation; atomic writes."""

import errno
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from musicgen_lite.api import GenerationResult
from musicgen_lite.audio_io import k_weighting, loudness, normalize_loudness, true_peak, write_audio

# ITU-R BS.1770-4, tables 1 and 2: the K-weighting biquads at 48 kHz as published.
SHELF_48K = ([1.53512485958697, -2.69169618940638, 1.19839281085285], [1.0, -1.69065929318241, 0.73248077421585])
HIGHPASS_48K = ([1.0, -2.0, 1.0], [1.0, -1.99004745483398, 0.99007225036621])


def sine(level_dbfs: float, seconds: float, sample_rate: int, hz: float = 997.0) -> np.ndarray:
    """A sine whose peak is `level_dbfs`."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return 10 ** (level_dbfs / 20) * np.sin(2 * np.pi * hz * t)


def stereo(x: np.ndarray) -> np.ndarray:
    return np.stack([x, x])


def published_gain_db(hz: float) -> float:
    """|H| of the published 48 kHz K-weighting at `hz`, evaluated directly from the table's coefficients."""
    z = np.exp(-1j * 2 * np.pi * hz / 48000 * np.arange(3))
    gain = 1.0
    for b, a in (SHELF_48K, HIGHPASS_48K):
        gain *= abs(np.dot(b, z) / np.dot(a, z))
    return 20 * math.log10(gain)


def test_k_weighting_reproduces_the_standards_48k_coefficients():
    (shelf_b, shelf_a), (hp_b, hp_a) = k_weighting(48000)
    np.testing.assert_allclose(shelf_b, SHELF_48K[0], atol=1e-12)
    np.testing.assert_allclose(shelf_a, SHELF_48K[1], atol=1e-12)
    np.testing.assert_allclose(hp_b, HIGHPASS_48K[0], atol=1e-12)
    np.testing.assert_allclose(hp_a, HIGHPASS_48K[1], atol=1e-12)


@pytest.mark.parametrize("sample_rate", [32000, 44100, 48000])
@pytest.mark.parametrize("level", [0.0, -20.0, -40.0])
def test_a_997_hz_sine_reads_its_rms_level(sample_rate, level):
    """K-weighting is +0.691 dB at 997 Hz and the offset -0.691 cancels it, so a mono sine with peak
    `level` dBFS reads level - 3.01 LUFS (its RMS); two identical channels add 3.01 dB."""
    x = sine(level, 2.0, sample_rate)
    expected = level + 10 * math.log10(0.5)
    assert loudness(x, sample_rate) == pytest.approx(expected, abs=0.02)
    assert loudness(stereo(x), sample_rate) == pytest.approx(expected + 10 * math.log10(2), abs=0.02)


@pytest.mark.parametrize("hz", [40.0, 100.0, 500.0, 2000.0, 5000.0, 12000.0])
def test_sines_across_the_spectrum_follow_the_published_filter(hz):
    x = sine(-10.0, 2.0, 48000, hz)
    expected = -0.691 + 10 * math.log10(0.5 * 10 ** (-10.0 / 10)) + published_gain_db(hz)
    assert loudness(x, 48000) == pytest.approx(expected, abs=0.01)


def test_ebu_tech_3341_reference_signals():
    """EBU Tech 3341 (v4) cases 1-5: stereo 1 kHz sines at 48 kHz whose integrated loudness is
    published as -23.0 (or -33.0) LUFS +-0.1; cases 3-5 exercise the relative and absolute gates."""
    fs = 48000

    def tone(*parts):
        return stereo(np.concatenate([sine(db, s, fs, 1000.0) for db, s in parts]))

    assert loudness(tone((-23, 20)), fs) == pytest.approx(-23.0, abs=0.1)
    assert loudness(tone((-33, 20)), fs) == pytest.approx(-33.0, abs=0.1)
    assert loudness(tone((-36, 10), (-23, 60), (-36, 10)), fs) == pytest.approx(-23.0, abs=0.1)
    assert loudness(tone((-72, 10), (-36, 10), (-23, 60), (-36, 10), (-72, 10)), fs) == pytest.approx(-23.0, abs=0.1)
    assert loudness(tone((-26, 20), (-20, 20.1), (-26, 20)), fs) == pytest.approx(-23.0, abs=0.1)


def test_gating_ignores_silence_and_very_quiet_passages():
    """3 s of steady music makes 27 full 400 ms blocks. Next to silence, whisper or a passage 15 LU
    down, only the 3 blocks on each boundary that hold 75, 50 and 25 % music pass the gates; every
    block wholly in the quiet part is gated out. Without gating the padded cases would read far lower."""
    fs = 32000
    music = sine(-12, 3.0, fs, 440.0) + sine(-18, 3.0, fs, 660.0)
    reference = loudness(music, fs)

    def with_edges(edges: int, quiet_power: float = 0.0) -> float:
        partial = sum(f + (1 - f) * quiet_power for f in (0.25, 0.5, 0.75))
        return reference + 10 * math.log10((27 + edges * partial) / (27 + 3 * edges))

    padded = np.concatenate([np.zeros(5 * fs), music, np.zeros(2 * fs)])
    assert loudness(padded, fs) == pytest.approx(with_edges(2), abs=0.02)
    whisper = sine(-80, 4.0, fs, 440.0)  # about -83 LUFS: below the -70 LUFS absolute gate
    assert loudness(whisper, fs) == -math.inf
    assert loudness(np.concatenate([music, whisper]), fs) == pytest.approx(with_edges(1), abs=0.02)
    quiet = 10 ** (-15 / 20) * music  # above the absolute gate, below the relative one
    assert loudness(np.concatenate([quiet, music, quiet]), fs) == pytest.approx(with_edges(2, 10 ** -1.5), abs=0.02)
    assert loudness(np.zeros((2, fs)), fs) == -math.inf


def test_audio_shorter_than_a_block_is_measured_whole():
    x = sine(-20, 0.2, 32000)
    assert loudness(x, 32000) == pytest.approx(-20 + 10 * math.log10(0.5), abs=0.1)


def test_true_peak_finds_peaks_between_samples():
    n = np.arange(4000)
    x = np.sin(2 * np.pi * n / 4 + np.pi / 4)  # samples at +-0.707 of a unit sine at fs/4
    assert np.abs(x).max() == pytest.approx(math.sqrt(0.5))
    assert 0.99 < true_peak(x) < 1.02


def test_pyloudnorm_agrees():
    """An independent implementation as an oracle. pyloudnorm normalises the high pass's passband to
    exactly 1 where the standard's b = [1, -2, 1] leaves +0.04 dB, so 0.1 LU is allowed."""
    pyln = pytest.importorskip("pyloudnorm")
    rng = np.random.default_rng(0)
    for fs in (32000, 44100):
        noise = np.cumsum(rng.standard_normal((2, 3 * fs)), axis=-1)  # a falling, bass-heavy spectrum
        noise = 0.01 * (noise - noise.mean(axis=-1, keepdims=True)) / noise.std()
        music = stereo(sine(-15, 3.0, fs, 220.0) + sine(-25, 3.0, fs, 3520.0))
        music[:, : fs // 2] *= 0.05  # a quiet start for the gates to act on
        for x in (noise, music):
            assert loudness(x, fs) == pytest.approx(pyln.Meter(fs).integrated_loudness(x.T), abs=0.1)


@pytest.mark.parametrize("level", [-40.0, -25.0, -3.0])
def test_normalize_reaches_the_target_below_the_peak_ceiling(level):
    fs = 32000
    rng = np.random.default_rng(1)
    x = stereo(sine(level, 3.0, fs, 330.0)) + 10 ** (level / 20) * 0.05 * rng.standard_normal((2, 3 * fs))
    out = normalize_loudness(x.astype(np.float32), fs, target=-14.0)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert loudness(out, fs) == pytest.approx(-14.0, abs=0.1)
    assert true_peak(out) <= 10 ** (-1 / 20) + 1e-6


def test_peak_protection_wins_over_the_target():
    """Sparse clicks over a quiet bed: reaching -14 LUFS would need peaks far above full scale and far
    more than the limiter's 8 dB, so the true peak stops at -1 dBTP and the result reads below the
    target, with a warning that says so."""
    fs = 32000
    x = np.full(4 * fs, 0.0)
    x[:: fs // 4] = 0.9
    x += sine(-60, 4.0, fs, 440.0)
    with pytest.warns(UserWarning, match="reached"):
        out = normalize_loudness(x[None].astype(np.float32), fs, target=-14.0, peak=-1.0)
    assert 20 * math.log10(true_peak(out)) == pytest.approx(-1.0, abs=0.01)
    assert loudness(out, fs) < -14.5


def test_silence_stays_silent():
    out = normalize_loudness(np.zeros((1, 32000), dtype=np.float32), 32000)
    assert not out.any()


@pytest.mark.parametrize("kwargs, message", [(dict(target=1.0), "<= 0"), (dict(target=float("nan")), "finite"), (dict(peak=0.5), "<= 0")])
def test_normalize_refuses_bad_levels(kwargs, message):
    with pytest.raises(ValueError, match=message):
        normalize_loudness(np.zeros((1, 100), dtype=np.float32), 32000, **kwargs)


def test_write_wav_flac_and_float(tmp_path):
    fs = 32000
    x = stereo(sine(-6, 1.0, fs, 440.0)).astype(np.float32)
    x[0, :10] = 1.5  # beyond full scale: clipped in 16-bit, kept in float
    for name, subtype, tolerance in (("a.wav", "PCM_16", 1e-4), ("a.flac", "PCM_16", 1e-4), ("f.wav", "FLOAT", 0.0)):
        path = write_audio(tmp_path / name, x, fs, subtype=subtype)
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        info = sf.info(path)
        assert rate == fs and data.shape == (fs, 2) and info.subtype == subtype
        expected = x if subtype == "FLOAT" else np.clip(x, -1.0, 1.0)
        np.testing.assert_allclose(data.T, expected, atol=tolerance)
    assert sf.info(tmp_path / "a.flac").format == "FLAC"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.flac", "a.wav", "f.wav"]  # no temporary files


def test_write_with_loudness(tmp_path):
    fs = 32000
    path = write_audio(tmp_path / "n.flac", stereo(sine(-30, 2.0, fs, 440.0)).astype(np.float32), fs, loudness=-16.0)
    data, _ = sf.read(path, always_2d=True)
    assert loudness(data.T, fs) == pytest.approx(-16.0, abs=0.1)


def test_written_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_audio(tmp_path / "p.wav", np.zeros((1, 100), dtype=np.float32), 32000)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "keep.wav"
    path.write_bytes(b"old contents")

    def broken_write(file, data):  # the disk fills up part way through the file
        with open(file, "wb") as f:
            f.write(data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", broken_write)
    with pytest.raises(OSError, match="cannot write .*keep.wav: No space left on device"):
        write_audio(path, np.zeros((1, 100), dtype=np.float32), 32000)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.wav"]


@pytest.mark.parametrize(
    "name, audio, kwargs, message",
    [
        ("o.mp3", np.zeros((1, 100)), {}, ".wav or .flac"),
        ("o.flac", np.zeros((1, 100)), dict(subtype="FLOAT"), "FLAC"),
        ("o.wav", np.zeros((1, 100)), dict(subtype="PCM_24"), "subtype"),
        ("o.wav", np.zeros((100, 2)), {}, "looks like"),
        ("o.wav", np.zeros(100), {}, "channels"),
        ("o.wav", np.zeros((1, 2, 100)), {}, "channels"),
        ("o.wav", np.zeros((1, 0)), {}, "channels"),
        ("o.wav", np.zeros((1, 100), dtype=np.int16), {}, "floating point"),
        ("o.wav", np.full((1, 100), np.nan), {}, "NaN"),
        ("o.wav", np.zeros((1, 100)), dict(loudness=3.0), "<= 0"),
        ("missing/o.wav", np.zeros((1, 100)), {}, "does not exist"),
    ],
)
def test_write_refuses_bad_requests_and_writes_nothing(tmp_path, name, audio, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        write_audio(tmp_path / name, audio, 32000, **kwargs)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_generation_result_saves_a_normalised_flac_batch(tmp_path):
    fs = 32000
    audio = np.stack([stereo(sine(-30, 1.0, fs, 440.0)), stereo(sine(-10, 1.0, fs, 550.0))]).astype(np.float32)
    result = GenerationResult(audio=audio, sample_rate=fs, tokens=np.zeros((2, 4, 50), dtype=np.int64), texts=["a", "b"])
    paths = result.save(tmp_path / "song.flac", loudness=-14.0)
    assert [p.name for p in paths] == ["song_0.flac", "song_1.flac"]
    for path in paths:
        data, _ = sf.read(path, always_2d=True)
        assert loudness(data.T, fs) == pytest.approx(-14.0, abs=0.1)
    kept = result.save(tmp_path / "raw.wav", subtype="FLOAT")  # the API's default keeps the level
    np.testing.assert_array_equal(sf.read(kept[1], dtype="float32", always_2d=True)[0].T, audio[1])
    with pytest.raises(ValueError, match="FLAC"):
        result.save(tmp_path / "x.flac", subtype="FLOAT")
    assert not list(tmp_path.glob("x*"))
