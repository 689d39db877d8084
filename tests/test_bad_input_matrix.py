"""One table: every public entry point x the bad inputs a user can give it.

Each case must end in one clear line naming the problem (an exception for the API, exit code 2 and
one stderr line for the command lines, a page error for the web app) and must write nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from hum import synth_hum


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_musicgen_dir):
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "not_audio.wav").write_text("this is not audio")
    sf.write(root / "silent.wav", np.zeros(32000, dtype=np.float32), 32000)
    sf.write(root / "hum.wav", synth_hum([60, 64, 67]), 32000)
    (root / "a_file").write_text("x")
    (root / "empty_dir").mkdir()
    incomplete = root / "incomplete_model"
    incomplete.mkdir()
    (incomplete / "config.json").write_text((tiny_musicgen_dir / "config.json").read_text())
    data = root / "data"
    data.mkdir()
    for i in range(6):
        sf.write(data / f"tone{i}.wav", 0.3 * np.sin(np.arange(32000 * 2) / (5 + i)).astype(np.float32), 32000)
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
]


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

        call = dict(text="piano", melody=None, duration=0.2, top_k=250, top_p=0.0, temperature=1.0, cfg=3.0, seed=0)
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
