"""generate.py end to end: writes the WAV and prints its path; bad input exits 2 with one line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_cli_writes_the_wav_and_prints_its_path(tiny_musicgen_dir, tmp_path):
    out = tmp_path / "song.wav"
    proc = run("--text", "mozart sonata allegro", "--duration", "0.5", "--model", str(tiny_musicgen_dir), "--out", str(out), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    data, sr = sf.read(out)
    assert sr == 32000 and data.shape[0] == 25 * 640


@pytest.mark.slow
def test_cli_batch_file_and_melody(tiny_melody_dir, tmp_path):
    from hum import synth_hum

    hum = tmp_path / "hum.wav"
    sf.write(hum, synth_hum([60, 64, 67]), 32000)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a minuet\n\n# comment\na chorale\n")
    proc = run("--batch-file", str(prompts), "--melody", str(hum), "--duration", "0.3", "--model", str(tiny_melody_dir), "--out", str(tmp_path / "b.wav"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "b_0.wav"), str(tmp_path / "b_1.wav")]


@pytest.mark.slow
def test_cli_bad_input_in_a_real_process_is_one_line_and_exit_2(tiny_musicgen_dir, tmp_path):
    proc = run("--text", "x", "--top-k", "0", "--model", str(tiny_musicgen_dir), "--out", str(tmp_path / "o.wav"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["generate.py: error: top_k must be an integer >= 1, got 0"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", ""], "empty"),
        (["--text", "x", "--duration", "0"], "duration"),
        (["--text", "x", "--duration", "99999"], "limit"),
        (["--text", "x", "--top-k", "0"], "top_k"),
        (["--text", "x", "--top-p", "2"], "top_p"),
        (["--text", "x", "--temperature", "0"], "temperature"),
        (["--text", "x", "--melody", "missing.wav"], "missing.wav"),
        (["--text", "x", "--model", "NOMODEL"], "NOMODEL"),
        (["--text", "x", "--out", "nodir/out.wav"], "does not exist"),
        (["--text", "x", "--out", "out.mp3"], ".wav"),
        (["--text", "x", "--out", "out.flac", "--float"], "FLAC"),
        (["--text", "x", "--loudness", "3"], "<= 0"),
        (["--text", "x", "--loudness", "nan"], "finite"),
        (["--text", "x", "--loudness", "-14", "--no-loudness"], "not allowed with"),
        (["--text", "x", "--batch-file", "nofile.txt"], "nofile.txt"),
        (["--text", "x", "--duration", "abc"], "invalid float"),
        ([], "--text"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_no_output(tiny_melody_dir, tmp_path, monkeypatch, capsys, args, message):
    from musicgen_lite.cli import generate_main

    monkeypatch.chdir(tmp_path)
    if "--model" not in args:
        args = args + ["--model", str(tiny_melody_dir)]
    try:
        code = generate_main(args)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not list(tmp_path.iterdir())



def test_cli_flac_plot_and_the_default_loudness(tiny_melody_dir, tmp_path, capsys):
    """--out x.flac --plot writes the FLAC and x.png beside it, printing both; the FLAC is normalised
    to -14 LUFS unless the -1 dBTP ceiling stopped the gain first."""
    from hum import synth_hum

    from musicgen_lite.audio_io import loudness, true_peak
    from musicgen_lite.cli import generate_main

    pytest.importorskip("matplotlib", reason="--plot needs the [plot] extra (matplotlib)")
    hum = tmp_path / "hum.wav"
    sf.write(hum, synth_hum([60, 64, 67]), 32000)
    out = tmp_path / "song.flac"
    code = generate_main(["--text", "a waltz", "--melody", str(hum), "--duration", "0.6", "--model", str(tiny_melody_dir), "--out", str(out), "--plot"])
    assert code == 0
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "song.png")]
    data, sr = sf.read(out, always_2d=True)
    assert sf.info(out).format == "FLAC" and sr == 32000
    level, peak_db = loudness(data.T, sr), 20 * np.log10(true_peak(data.T))
    assert abs(level + 14.0) < 0.1 or (level < -14.0 and abs(peak_db + 1.0) < 0.05)
    assert (tmp_path / "song.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_float_without_loudness_is_the_model_output(tiny_musicgen_dir, tmp_path, capsys):
    import musicgen_lite
    from musicgen_lite.cli import generate_main

    out = tmp_path / "raw.wav"
    args = ["--text", "piano", "--duration", "0.4", "--model", str(tiny_musicgen_dir), "--seed", "5", "--out", str(out)]
    assert generate_main(args + ["--float", "--no-loudness"]) == 0
    expected = musicgen_lite.generate("piano", duration=0.4, model=str(tiny_musicgen_dir), seed=5).audio[0]
    data, _ = sf.read(out, dtype="float32", always_2d=True)
    assert sf.info(out).subtype == "FLOAT"
    np.testing.assert_array_equal(data.T, expected)


def test_cli_plot_without_matplotlib_names_the_extra(tiny_musicgen_dir, tmp_path, monkeypatch, capsys):
    from musicgen_lite.cli import generate_main

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import matplotlib...` fail
    monkeypatch.delitem(sys.modules, "musicgen_lite.plots", raising=False)
    code = generate_main(["--text", "x", "--model", str(tiny_musicgen_dir), "--out", str(tmp_path / "o.wav"), "--plot"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["generate.py: error: --plot needs matplotlib: pip install 'musicgen_lite[plot]'"]
    assert not list(tmp_path.iterdir())
