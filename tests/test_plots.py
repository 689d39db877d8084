"""plot_generation: a readable PNG of the output (and the melody), written atomically; bad shapes refused."""

import struct

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="plots need the [plot] extra (matplotlib)")

from hum import synth_hum  # noqa: E402

from musicgen_lite.plots import plot_generation  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has right after its signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_with_and_without_a_melody(tmp_path):
    hum = synth_hum([60, 62, 64, 65, 67], note_seconds=0.3)
    audio = np.stack([hum, 0.5 * hum])  # stereo
    alone = plot_generation(tmp_path / "alone.png", audio, 32000, title="a chorale")
    both = plot_generation(tmp_path / "both.png", audio[:1], 32000, melody=synth_hum([60, 64], 44100), melody_sample_rate=44100)
    for path in (alone, both):
        width, height = png_size(path)
        assert 800 <= width <= 1200 and 600 <= height <= 1000
        assert 20_000 < path.stat().st_size < 1_000_000
    assert png_size(both)[1] > png_size(alone)[1]  # the melody's chromagram gets its own room
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.png", "both.png"]  # no temporary files


def test_silent_and_very_short_audio_still_plot(tmp_path):
    plot_generation(tmp_path / "silent.png", np.zeros((1, 32000), dtype=np.float32), 32000)
    plot_generation(tmp_path / "short.png", np.full((1, 100), 0.1, dtype=np.float32), 32000)
    assert png_size(tmp_path / "short.png")[0] > 0 and png_size(tmp_path / "silent.png")[0] > 0


@pytest.mark.parametrize(
    "name, audio, kwargs, message",
    [
        ("p.png", np.zeros(32000), {}, r"\[channels, samples\]"),
        ("p.png", np.zeros((32000, 2)), {}, "looks like"),
        ("p.png", np.zeros((1, 2, 32000)), {}, "channels"),
        ("p.png", np.zeros((1, 0)), {}, "channels"),
        ("p.png", np.zeros((1, 100), dtype=np.int16), {}, "floating-point"),
        ("p.png", np.full((1, 100), np.inf), {}, "finite"),
        ("p.png", np.zeros((1, 100)), dict(melody=np.zeros((2, 3, 4)), melody_sample_rate=32000), "melody"),
        ("p.png", np.zeros((1, 100)), dict(melody=np.zeros(100)), "melody_sample_rate"),
        ("p.png", np.zeros((1, 100)), dict(melody_sample_rate=32000), "without a melody"),
        ("p.jpg", np.zeros((1, 100)), {}, ".png"),
        ("nodir/p.png", np.zeros((1, 100)), {}, "does not exist"),
    ],
)
def test_bad_input_is_refused_and_nothing_written(tmp_path, name, audio, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plot_generation(tmp_path / name, audio, 32000, **kwargs)
    assert not list(tmp_path.iterdir())
