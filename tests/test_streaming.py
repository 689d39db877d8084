"""Streaming: generate_stream's chunks, the windowed decoder, and generate.py --stream / --out -."""

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import musicgen_lite
from codebooks.streaming import StreamingDecoder
from musicgen_lite.cli import generate_main
from musicgen_lite.wav_stream import stream_wav

ROOT = Path(__file__).resolve().parents[1]


def snr_db(test: np.ndarray, reference: np.ndarray) -> float:
    return float(10 * np.log10((reference**2).sum() / max(((test - reference) ** 2).sum(), 1e-30)))


@pytest.fixture(scope="module")
def model(tiny_musicgen_dir):
    return musicgen_lite.load_model(tiny_musicgen_dir)


def test_stream_chunks_add_up_to_generate(model):
    whole = musicgen_lite.generate("a calm chorale", duration=1.0, model=model, seed=4)
    stream = musicgen_lite.generate_stream("a calm chorale", duration=1.0, model=model, seed=4, chunk_seconds=0.2)
    assert (stream.sample_rate, stream.channels, stream.samples) == (32000, 1, whole.audio.shape[-1])
    chunks = list(stream)
    # sound starts after a quarter chunk; chunks then double up to 0.2 s (10 frames; 4 held back for lookahead)
    assert [c.shape[-1] // 640 for c in chunks[:4]] == [2, 8, 10, 10]
    assert all(c.dtype == np.float32 and c.ndim == 2 and c.shape[0] == 1 for c in chunks)
    audio = np.concatenate(chunks, axis=-1)
    assert audio.shape == whole.audio[0].shape
    assert snr_db(audio, whole.audio[0]) >= 30


def test_stream_follows_the_sliding_window_and_a_melody(model, tiny_melody_dir):
    from hum import synth_hum

    model.max_duration, model.extend_stride = 0.4, 0.2
    try:
        whole = musicgen_lite.generate("piano", duration=1.0, model=model, seed=1)
        audio = np.concatenate(list(musicgen_lite.generate_stream("piano", duration=1.0, model=model, seed=1, chunk_seconds=0.1)), -1)
    finally:
        model.max_duration, model.extend_stride = 30.0, 18.0
    assert audio.shape == whole.audio[0].shape and snr_db(audio, whole.audio[0]) >= 30
    melody_model = musicgen_lite.load_model(tiny_melody_dir)
    hum = synth_hum([60, 64, 67])
    whole = musicgen_lite.generate("folk", melody=hum, melody_sample_rate=32000, duration=0.6, model=melody_model, seed=2)
    chunks = musicgen_lite.generate_stream("folk", melody=hum, melody_sample_rate=32000, duration=0.6, model=melody_model, seed=2)
    audio = np.concatenate(list(chunks), -1)
    assert audio.shape == whole.audio[0].shape and snr_db(audio, whole.audio[0]) >= 30


def test_stream_of_the_default_model_matches_its_whole_decode():
    """The bundled model's trained codec (causal convolutions and an LSTM), decoded in windows."""
    whole = musicgen_lite.generate("mozart sonata allegro", duration=4.0, seed=0)
    audio = np.concatenate(list(musicgen_lite.generate_stream("mozart sonata allegro", duration=4.0, seed=0)), -1)
    assert audio.shape == whole.audio[0].shape
    assert snr_db(audio, whole.audio[0]) >= 30


def test_the_windowed_decoder_with_one_frame_pieces(model):
    codes = torch.randint(0, model.codec.codebook_size, (1, 4, 40), generator=torch.Generator().manual_seed(0))
    whole = model.codec.decode(codes)
    decoder = StreamingDecoder(model.codec, context_frames=30)
    parts = [decoder.push(codes[:, :, i : i + 1]) for i in range(40)] + [decoder.flush()]
    assert sum(p.shape[-1] for p in parts[:4]) == 0  # the first frames wait for their lookahead
    audio = torch.cat(parts, dim=-1)
    assert audio.shape == whole.shape
    assert snr_db(audio.numpy(), whole.numpy()) >= 30
    with pytest.raises(ValueError, match="nothing was pushed"):
        StreamingDecoder(model.codec).flush()


def test_stream_arguments_are_checked_at_the_call(model):
    with pytest.raises(ValueError, match="one output"):
        musicgen_lite.generate_stream(["a", "b"], duration=0.2, model=model)
    with pytest.raises(ValueError, match="chunk_seconds"):
        musicgen_lite.generate_stream("a", duration=0.2, model=model, chunk_seconds=0)
    with pytest.raises(ValueError, match="top_p"):
        musicgen_lite.generate_stream("a", duration=0.2, model=model, top_p=2.0)
    with pytest.raises(ValueError, match="threads"):
        musicgen_lite.generate_stream("a", duration=0.2, model=model, threads=0)


def test_stream_wav_sends_the_header_first_and_each_chunk_as_it_comes():
    out = io.BytesIO()
    seen = []

    def chunks():
        for i in range(3):
            seen.append(len(out.getvalue()))  # what was written before this chunk was made
            yield np.full((1, 100), 0.5 * i, dtype=np.float32)

    stream_wav(out, chunks(), 300, 32000, 1)
    assert seen == [44, 44 + 200, 44 + 400]
    data = out.getvalue()
    assert data[:4] == b"RIFF" and struct.unpack("<I", data[4:8])[0] == len(data) - 8
    audio, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 32000 and audio.shape == (300,) and audio[150] == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(ValueError, match="hold 300 samples, not the 400 announced"):
        stream_wav(io.BytesIO(), iter([np.zeros((1, 300), np.float32)]), 400, 32000, 1)


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, env=env, timeout=300)


def test_cli_streams_a_wav_to_stdout_and_nothing_else(tiny_musicgen_dir, tmp_path):
    common = ["--text", "mozart sonata allegro", "--duration", "0.5", "--model", str(tiny_musicgen_dir), "--seed", "3"]
    proc = run_cli(*common, "--stream", "--out", "-")
    assert proc.returncode == 0, proc.stderr.decode()
    wav = proc.stdout
    assert wav[:4] == b"RIFF" and wav[36:40] == b"data"
    assert struct.unpack("<I", wav[40:44])[0] == len(wav) - 44 == 25 * 640 * 2  # the size, announced in advance
    streamed, rate = sf.read(io.BytesIO(wav), dtype="float32")
    whole = tmp_path / "whole.wav"
    proc = run_cli(*common, "--no-loudness", "--float", "--out", str(whole))
    assert proc.returncode == 0, proc.stderr.decode()
    reference, _ = sf.read(whole, dtype="float32")
    assert rate == 32000 and streamed.shape == reference.shape
    assert snr_db(streamed, reference) >= 30


def test_cli_stops_with_one_line_when_the_reader_goes_away(tiny_musicgen_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = ["--text", "piano", "--duration", "2", "--model", str(tiny_musicgen_dir), "--stream", "--out", "-"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(44)[:4] == b"RIFF"
    proc.stdout.close()  # as `| head -c 44` does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert err.decode().strip().splitlines() == ["generate.py: stdout was closed; stopped"]


def test_cli_stream_to_a_file_renames_at_the_end(tiny_musicgen_dir, tmp_path, capsys):
    out = tmp_path / "song.flac"
    code = generate_main(["--text", "piano", "--duration", "0.4", "--model", str(tiny_musicgen_dir), "--stream", "--out", str(out)])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    audio, rate = sf.read(out)
    assert rate == 32000 and audio.shape == (20 * 640,)
    assert [p.name for p in tmp_path.iterdir()] == ["song.flac"]  # no temporary file left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stream", "--plot"], "--plot needs the whole clip"),
        (["--stream", "--batch-file", "prompts.txt"], "--batch-file"),
        (["--stream", "--out", "-", "--format", "flac"], "FLAC cannot be streamed to stdout"),
        (["--stream", "--loudness", "-20"], "--loudness cannot be used with --stream"),
        (["--out", "-"], "needs --stream"),
        (["--format", "flac", "--out", "x.wav"], "does not match"),
        (["--threads", "0"], "threads must be a positive integer"),
    ],
)
def test_cli_stream_refusals_are_one_line(tiny_musicgen_dir, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a\n")
    code = generate_main(["--text", "x", "--model", str(tiny_musicgen_dir), "--duration", "0.2", *args])
    err = capsys.readouterr()
    assert code == 2 and err.out == ""
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_stream_help_says_loudness_is_not_applied(capsys):
    with pytest.raises(SystemExit):
        generate_main(["--help"])
    assert "no loudness normalisation" in " ".join(capsys.readouterr().out.split())
