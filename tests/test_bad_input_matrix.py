"""One table: every public entry point x the bad inputs a user can give it.

Each case must end in one clear line naming the problem (an exception for the API, exit code 2 and
one stderr line for the command lines, a page error for the web app) and must write nothing.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import mido
import numpy as np
import pytest
import soundfile as sf

import musicgen_lite
from hum import synth_hum


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_musicgen_dir):
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "not_audio.wav").write_text("this is not audio")
    sf.write(root / "silent.wav", np.zeros(32000, dtype=np.float32), 32000)
    sf.write(root / "hum.wav", synth_hum([60, 64, 67]), 32000)
    no_notes = mido.MidiFile()
    no_notes.tracks.append(mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000)]))
    no_notes.save(str(root / "no_notes.mid"))
    (root / "a_file").write_text("x")
    (root / "empty_dir").mkdir()
    (root / "two_prompts.txt").write_text("a waltz\na march\n")
    (root / "b_1.wav").mkdir()  # the second output of a batch written to b.wav cannot be written
    incomplete = root / "incomplete_model"
    incomplete.mkdir()
    (incomplete / "config.json").write_text((tiny_musicgen_dir / "config.json").read_text())
    data = root / "data"
    data.mkdir()
    for i in range(6):
        sf.write(data / f"tone{i}.wav", 0.3 * np.sin(np.arange(32000 * 2) / (5 + i)).astype(np.float32), 32000)
    broken_models(root, tiny_musicgen_dir)
    return root


def _api(model_dir, root, **kwargs):
    import musicgen_lite

    args = dict(text="piano", duration=0.2, model=str(model_dir))
    args.update({k: (str(root / v[1:]) if isinstance(v, str) and v.startswith("@") else v) for k, v in kwargs.items()})
    text = args.pop("text")
    musicgen_lite.generate(text, **args)


# (entry point, case, arguments, what the message must mention). "@name" is a file of the fixture.
CASES = [
    ("api", "text of the wrong type", dict(text=42), "string"),
    ("api", "empty text", dict(text=""), "empty"),
    ("api", "duration of the wrong type", dict(duration="ten"), "number"),
    ("api", "huge duration", dict(duration=1e9), "limit"),
    ("api", "zero duration", dict(duration=0), "> 0"),
    ("api", "top_k < 1", dict(top_k=0), "top_k"),
    ("api", "top_p > 1", dict(top_p=1.1), "top_p"),
    ("api", "temperature <= 0", dict(temperature=-1.0), "temperature"),
    ("api", "seed of the wrong type", dict(seed="abc"), "seed"),
    ("api", "missing melody file", dict(melody="@missing.wav"), "missing.wav"),
    ("api", "melody that is not audio", dict(melody="@not_audio.wav"), "audio"),
    ("api", "silent melody", dict(melody="@silent.wav"), "silent"),
    ("api", "seed beyond 64 bits", dict(seed=2**70), "from 0 to 2**64 - 1"),
    ("api", "negative seed", dict(seed=-1), "from 0 to 2**64 - 1"),
    ("api", "melody that is a folder", dict(melody="@empty_dir"), "is a folder"),
    ("api", "model dir missing files", dict(model="@incomplete_model"), "not a complete model"),
    ("api", "model path that is a file", dict(model="@a_file"), "not a model directory"),
    ("api", "model dir without a config", dict(model="@empty_dir"), "not a model directory"),
    ("generate.py", "empty text", ["--text", ""], "empty"),
    ("generate.py", "huge duration", ["--text", "x", "--duration", "1e9"], "limit"),
    ("generate.py", "duration that is not a number", ["--text", "x", "--duration", "ten"], "invalid float"),
    ("generate.py", "top_p outside [0, 1]", ["--text", "x", "--top-p", "-1"], "top_p"),
    ("generate.py", "missing melody", ["--text", "x", "--melody", "@missing.wav"], "missing.wav"),
    ("generate.py", "melody not audio", ["--text", "x", "--melody", "@not_audio.wav"], "audio"),
    ("generate.py", "unwritable output path", ["--text", "x", "--out", "@a_file/out.wav"], "a_file"),
    ("generate.py", "300-character output name", ["--text", "x", "--out", "@" + "n" * 296 + ".wav"], "too long"),
    ("generate.py", "a later batch output that cannot be written", ["--batch-file", "@two_prompts.txt", "--out", "@b.wav"], "b_1.wav"),
    ("generate.py", "seed beyond 64 bits", ["--text", "x", "--seed", "1180591620717411303424"], "from 0 to 2**64 - 1"),
    ("generate.py", "melody that is a folder", ["--text", "x", "--melody", "@empty_dir"], "is a folder"),
    ("generate.py", "batch file that is a folder", ["--batch-file", "@empty_dir"], "is a folder"),
    ("generate.py", "model dir missing files", ["--text", "x", "--model", "@incomplete_model"], "not a complete model"),
    ("train.py lm", "missing data dir", ["lm", "--data", "@missing_dir", "--out", "@run"], "missing_dir"),
    ("train.py lm", "data dir without audio", ["lm", "--data", "@empty_dir", "--out", "@run"], "empty_dir"),
    ("train.py lm", "negative learning rate", ["lm", "--data", "@data", "--out", "@run", "--lr", "-1"], "lr"),
    ("train.py lm", "unwritable output path", ["lm", "--data", "@data", "--out", "@a_file/run"], "a_file"),
    ("train.py lm", "model dir missing files", ["lm", "--data", "@data", "--out", "@run", "--model", "@incomplete_model"], "incomplete_model"),
    ("train.py codec", "missing data dir", ["codec", "--data", "@missing_dir", "--out", "@run"], "missing_dir"),
    ("train.py codec", "data dir without audio", ["codec", "--data", "@empty_dir", "--out", "@run"], "empty_dir"),
    ("train.py codec", "batch size of the wrong type", ["codec", "--data", "@data", "--out", "@run", "--batch-size", "many"], "invalid int"),
    ("train.py codec", "unwritable output path", ["codec", "--data", "@data", "--out", "@a_file/run"], "a_file"),
    ("app", "empty text", dict(text=""), "empty"),
    ("app", "huge duration", dict(duration=1e9), "limit"),
    ("app", "melody that is not audio", dict(melody="@not_audio.wav"), "audio"),
    ("app", "silent melody", dict(melody="@silent.wav"), "silent"),
    ("app", "invalid sampling value", dict(temperature=0), "temperature"),
    ("app", "seed beyond 64 bits", dict(seed=2**70), "from 0 to 2**64 - 1"),
    ("api", "MIDI melody without notes", dict(melody="@no_notes.mid"), "no notes"),
    ("generate.py", "MIDI melody without notes", ["--text", "x", "--melody", "@no_notes.mid"], "no notes"),
] + [  # corrupt and mistyped model directories (issue #13, points 3 and 4), through every entry point that loads one
    row
    for name, case, message in [
        ("truncated_weights", "truncated model.safetensors", "corrupt"),
        ("garbled_header", "model.safetensors with a flipped header byte", "corrupt"),
        ("empty_weights", "empty model.safetensors", "corrupt"),
        ("flipped_data", "own model with a flipped weight byte (checksum)", "corrupt"),
        ("mistyped_config", "own config.json with a mistyped value", "num_heads"),
        ("mistyped_hf_config", "transformers config.json with a mistyped value", "num_attention_heads"),
        ("mistyped_codec_config", "own codec/config.json with a mistyped value", "hidden_size"),
        ("mistyped_hf_subconfig", "transformers text_encoder sub-config with a mistyped value", "d_model"),
    ]
    for row in [
        ("api", case, dict(model=f"@{name}"), message),
        ("generate.py", case, ["--text", "x", "--model", f"@{name}"], message),
        ("train.py lm", case, ["lm", "--data", "@data", "--out", "@run", "--model", f"@{name}"], message),
    ]
]


def broken_models(root, tiny_musicgen_dir) -> None:
    """Copies of the tiny checkpoint (transformers' format) and of the same model saved in ours, each
    broken in one way: truncated, garbled or emptied weights, one flipped weight byte, a mistyped value."""
    import json
    import shutil

    import musicgen_lite

    own = root / "own_model"
    musicgen_lite.load_model(tiny_musicgen_dir).save_pretrained(own)

    def copy(source, name):
        shutil.copytree(source, root / name)
        return root / name

    weights = copy(tiny_musicgen_dir, "truncated_weights") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    weights = copy(tiny_musicgen_dir, "garbled_header") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    (copy(tiny_musicgen_dir, "empty_weights") / "model.safetensors").write_bytes(b"")
    weights = copy(own, "flipped_data") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # a valid file still: only the checksum can tell
    weights.write_bytes(bytes(data))
    for source, name, file, section, key in [
        (own, "mistyped_config", "config.json", "lm", "num_heads"),
        (own, "mistyped_codec_config", "codec/config.json", None, "hidden_size"),
        (tiny_musicgen_dir, "mistyped_hf_config", "config.json", "decoder", "num_attention_heads"),
        (tiny_musicgen_dir, "mistyped_hf_subconfig", "config.json", "text_encoder", "d_model"),
    ]:
        directory = copy(source, name)
        if source == own:  # as a config edited by hand, its checksums dropped
            (directory / "checksums.sha256").unlink()
        values = json.loads((directory / file).read_text())
        (values[section] if section else values)[key] = "four"
        (directory / file).write_text(json.dumps(values))


def _resolve(args: list[str], root) -> list[str]:
    return [str(root / a[1:]) if a.startswith("@") else a for a in args]


def _run_cli(main, argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("entry, case, args, message", CASES, ids=[f"{e}: {c}" for e, c, _, _ in CASES])
def test_bad_input(entry, case, args, message, files, tiny_musicgen_dir, tiny_melody_dir, capsys, monkeypatch):
    monkeypatch.chdir(files)
    before = sorted(p.name for p in files.rglob("*"))
    model_dir = tiny_melody_dir
    if entry == "api":
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            _api(model_dir, files, **args)
        text = str(err.value)
        assert "\n" not in text
    elif entry == "app":
        gr = pytest.importorskip("gradio", reason="the web page needs the [demo] extra")
        from app import Generator

        call = dict(text="piano", melody=None, duration=0.2, top_k=250, top_p=0.0, temperature=1.0, cfg_coef=3.0, seed=0)
        call.update({k: (str(files / v[1:]) if isinstance(v, str) and v.startswith("@") else v) for k, v in args.items()})
        with pytest.raises(gr.Error) as err:
            list(Generator(str(model_dir))(**call))
        text = str(err.value.message)
    else:
        if entry == "generate.py":
            from musicgen_lite.cli import generate_main as main

            argv = _resolve(args, files) + ([] if "--model" in args else ["--model", str(model_dir)])
            argv += [] if "--out" in args else ["--out", str(files / "out.wav")]
        else:
            from train import main

            argv = _resolve(args, files)
            if args[0] == "lm" and "--model" not in args:
                argv += ["--model", str(tiny_musicgen_dir)]  # fine-tuning needs no codec of its own
        code, text = _run_cli(main, argv, capsys)
        assert code == 2
        assert len(text.strip().splitlines()) == 1, text
        assert "Traceback" not in text
    assert message in text, text
    assert sorted(p.name for p in files.rglob("*")) == before  # nothing written, nothing half-written


@contextlib.contextmanager
def _tiny_disk(folder: Path, size: int):
    """A file system of `size` bytes at `folder`: a tmpfs where mounting is permitted (root), else a
    limit of size / 2 bytes per file on this process (RLIMIT_FSIZE: writes past it fail with EFBIG as
    writes to a full disk fail with ENOSPC). Yields how the fault was made."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, check=False).returncode == 0 if shutil.which("mount") else False
    if mounted:
        try:
            yield "tmpfs"
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))
    try:
        yield "RLIMIT_FSIZE"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, tiny_melody_dir, files, capsys):
    """Two outputs of 13 kB each on a 16 kB disk: the first fits, the second does not. Neither is
    left behind (all or nothing), nor any temporary file, and the error is one line, exit code 2."""
    from musicgen_lite.cli import generate_main

    disk = tmp_path / "disk"
    argv = ["--batch-file", str(files / "two_prompts.txt"), "--duration", "0.2", "--model", str(tiny_melody_dir),
            "--out", str(disk / "song.wav")]
    musicgen_lite.load_model(tiny_melody_dir)  # imports and first loads happen before the disk is small
    with _tiny_disk(disk, 16384) as how:
        code, err = _run_cli(generate_main, argv, capsys)
        left = sorted(p.name for p in disk.iterdir())
    assert code == 2, (how, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "cannot write" in err and "song_" in err, err
    assert left == [], (how, left)
