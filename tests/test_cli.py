"""generate.py end to end: writes the WAV and prints its path; bad input exits 2 with one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_writes_the_wav_and_prints_its_path(tiny_musicgen_dir, tmp_path):
    out = tmp_path / "song.wav"
    proc = run("--text", "mozart sonata allegro", "--duration", "0.5", "--model", str(tiny_musicgen_dir), "--out", str(out), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    data, sr = sf.read(out)
    assert sr == 32000 and data.shape[0] == 25 * 640


def test_cli_batch_file_and_melody(tiny_melody_dir, tmp_path):
    from hum import synth_hum

    hum = tmp_path / "hum.wav"
    sf.write(hum, synth_hum([60, 64, 67]), 32000)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a minuet\n\n# comment\na chorale\n")
    proc = run("--batch-file", str(prompts), "--melody", str(hum), "--duration", "0.3", "--model", str(tiny_melody_dir), "--out", str(tmp_path / "b.wav"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "b_0.wav"), str(tmp_path / "b_1.wav")]


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

