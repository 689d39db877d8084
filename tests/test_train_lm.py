"""`train.py lm`: fine-tuning and from-scratch runs on a tiny synthetic dataset, the token cache,
exact resumption (in-process crash, SIGKILL, corrupt checkpoint), the NaN guard, two-process torchrun."""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import musicgen_lite
from codebooks.codec import EncodecCodec
from conditioning.chroma import ChromaExtractor
from musicgen_lite import audio_data
from musicgen_lite.training import checkpoints as ckpt
from musicgen_lite.training import lm as train_lm
from musicgen_lite.training import lm_batches, lm_config, lm_model
from musicgen_lite.training.codec_config import TrainConfig as CodecTrainConfig, build_codec, read_source_config
from musicgen_lite.training.retarget import code_counts, retarget
from musicgen_lite.audio_data import TokenCache, chroma_span, scan
from musicgen_lite.cli_errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
SR = 32000
CAPTION = "mozart string quartet, menuetto, G major, 3/4, piano"
# 0.5 s segments (25 frames) of batch 4, no data-loading processes, one CSV row per step
FAST = ["--segment-seconds", "0.5", "--batch-size", "4", "--num-workers", "0", "--log-every", "1"]


def tones(hz: list[float], seconds: float, sr: int = SR) -> np.ndarray:
    """Consecutive sine tones of equal length (harmonics make the pitch class unambiguous)."""
    n = int(seconds * sr) // len(hz)
    t = np.arange(n) / sr
    return np.concatenate([sum(0.3 / h * np.sin(2 * np.pi * f * h * t) for h in (1, 2, 3)) for f in hz]).astype(np.float32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Seven files: sidecar captions (wav and 44.1 kHz flac), metadata captions with train / valid / test
    splits, one uncaptioned wav and one corrupt file."""
    d = tmp_path_factory.mktemp("data")
    (d / "quartets").mkdir()
    sf.write(d / "quartets/one.wav", tones([261.63, 392.0], 3.0), SR)  # C then G
    (d / "quartets/one.txt").write_text(CAPTION + "\n")
    sf.write(d / "quartets/two.flac", tones([293.66], 2.0, 44100), 44100)
    (d / "quartets/two.txt").write_text("bach chorale, D minor, 4/4, organ")
    sf.write(d / "three.wav", tones([440.0, 220.0, 330.0], 2.5), SR)
    sf.write(d / "four.wav", tones([523.25], 2.0), SR)
    sf.write(d / "five.wav", tones([349.23], 1.0), SR)
    sf.write(d / "nocap.wav", tones([300.0], 1.5), SR)
    (d / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(200))
    rows = [
        {"path": "three.wav", "text": "haydn sonata, allegro, D major, piano", "split": "train"},
        {"path": "four.wav", "text": "chopin nocturne, E flat major, piano", "split": "valid"},
        {"path": "five.wav", "text": "satie gymnopedie, piano", "split": "test"},
        {"path": "quartets/two.flac", "split": "train"},  # caption from the sidecar
    ]
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


@pytest.fixture(scope="module")
def codec_dir(tiny_musicgen_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint's EnCodec (32-entry codebooks, 32 kHz, 50 fps) as a standalone codec directory."""
    out = tmp_path_factory.mktemp("codec")
    musicgen_lite.load_model(tiny_musicgen_dir).codec.save_pretrained(out)
    return out


def train(*args) -> int:
    return train_lm.main([str(a) for a in args])


def log_rows(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def train_losses(run: Path) -> dict[int, str]:
    return {int(r["step"]): r["train_loss"] for r in log_rows(run) if r["train_loss"]}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


# -- data -----------------------------------------------------------------------------------------


def test_scan_reads_captions_and_splits(data_dir):
    files = {f.rel: f for f in scan(data_dir, valid_fraction=0.0)}
    assert sorted(files) == ["broken.wav", "five.wav", "four.wav", "nocap.wav", "quartets/one.wav", "quartets/two.flac", "three.wav"]
    assert files["quartets/one.wav"].caption == CAPTION
    assert files["quartets/two.flac"].caption == "bach chorale, D minor, 4/4, organ"
    assert files["three.wav"].caption == "haydn sonata, allegro, D major, piano"
    assert files["nocap.wav"].caption is None
    assert (files["four.wav"].split, files["five.wav"].split, files["three.wav"].split) == ("valid", "test", "train")
    assert files["nocap.wav"].split == "train"  # no metadata split, valid_fraction 0
    # the hash split is a pure function of the path and about the requested share
    paths = [f"dir/file{i}.wav" for i in range(2000)]
    assert [audio_data.hash_split(p, 0.1) for p in paths] == [audio_data.hash_split(p, 0.1) for p in paths]
    assert 150 < sum(audio_data.hash_split(p, 0.1) == "valid" for p in paths) < 250


def test_bad_metadata_is_a_clear_error(tmp_path):
    sf.write(tmp_path / "a.wav", tones([440.0], 0.5), SR)
    (tmp_path / "metadata.jsonl").write_text('{"path": "a.wav", "text": "x"}\n{"path": "a.wav", oops\n')
    with pytest.raises(audio_data.DataError, match="line 2 is not valid JSON"):
        scan(tmp_path)


def test_token_cache_encodes_once_and_follows_file_changes(data_dir, codec_dir, tmp_path):
    data_dir = shutil.copytree(data_dir, tmp_path / "data")
    bad_middle = tones([440.0], 3.0)
    bad_middle[SR + 100] = np.nan  # the second of three 1 s chunks cannot be encoded
    sf.write(data_dir / "nan.wav", bad_middle, SR, subtype="FLOAT")
    codec = EncodecCodec.from_pretrained(codec_dir)
    files = [f for f in scan(data_dir) if f.split != "test"]
    cache = TokenCache(tmp_path / "cache", codec, chunk_seconds=1.0)
    assert cache.build(files, num_workers=2) == len(files)
    clips, skipped = cache.load(files)
    assert [(f.rel, bool(why)) for f, why in skipped] == [("broken.wav", True), ("nan.wav", True)]
    assert "nan.wav" not in {c.file.rel for c in clips}  # a file is used whole or not at all
    one = [c for c in clips if c.file.rel == "quartets/one.wav"]
    assert [c.frames for c in one] == [50, 50, 50]  # 3 s in 1 s chunks at 50 frames/s
    expected = codec.encode(torch.from_numpy(sf.read(data_dir / "quartets/one.wav", dtype="float32")[0][SR : 2 * SR]))[0]
    assert torch.equal(one[1].codes.long(), expected)
    assert cache.build(files) == 0  # everything (the corrupt file too) is answered from the cache
    again = TokenCache(tmp_path / "cache", codec, chunk_seconds=1.0)
    assert again.build(files) == 0
    os.utime(data_dir / "nocap.wav", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert again.build(files) == 1  # a changed file is encoded again
    with torch.no_grad():
        codec.model.quantizer.layers[0].codebook.embed.mul_(2.0)
    assert TokenCache(tmp_path / "cache", codec, chunk_seconds=1.0).build(files) == len(files)  # another codec


def test_a_segment_gets_the_chroma_of_its_own_time_span(data_dir, codec_dir, tmp_path):
    codec = EncodecCodec.from_pretrained(codec_dir)
    files = [f for f in scan(data_dir) if f.rel == "quartets/one.wav"]  # 1.5 s of C, then 1.5 s of G
    cache = TokenCache(tmp_path / "cache", codec, chroma=ChromaExtractor())
    cache.build(files)
    (clip,), _ = cache.load(files)
    rate = 32000 / 4096
    assert clip.frames == 150 and clip.chroma.shape[0] == 1 + 3 * 32000 // 4096
    first = chroma_span(clip, 0, codec.frame_rate, rate, 4)  # 0.0-0.5 s
    last = chroma_span(clip, 110, codec.frame_rate, rate, 4)  # 2.2-2.7 s
    assert first.tolist() == [0, 0, 0, 0] and last.tolist() == [7, 7, 7, 7]


def test_caption_augmentation_draws_subsets_and_orders_of_the_fields():
    g = torch.Generator().manual_seed(0)
    fields = [f.strip() for f in CAPTION.split(",")]
    seen = [lm_batches.augment_caption(CAPTION, g) for _ in range(300)]
    parts = [s.split(", ") for s in seen]
    assert all(p and set(p) <= set(fields) and len(set(p)) == len(p) for p in parts)
    assert {len(p) for p in parts} == set(range(1, 6))
    assert len({tuple(p) for p in parts if len(p) == 5}) > 1  # full captions in several orders
    assert lm_batches.augment_caption("solo cello", g) == "solo cello"


def test_caption_augmentation_says_tempo_words_in_plain_english_when_asked():
    """The data builder's captions name tempi in Italian; with --plain-tempo-words augmentation also says them
    as people do, so that "slow" and "fast" mean something to a trained model. Each word keeps to its own
    tempo's phrases; without the option nothing is reworded."""
    from musicgen_lite.data.scores.augment import TEMPO_WORDS
    from musicgen_lite.training import prior

    assert not lm_config.Config.plain_tempo_words and not prior.build_parser().get_default("plain_tempo_words")  # off
    assert set(lm_batches.PLAIN_TEMPO) == {word for word, _ in TEMPO_WORDS}
    g = torch.Generator().manual_seed(0)
    for word, phrases in lm_batches.PLAIN_TEMPO.items():
        caption = f"haydn string quartet, {word}, 100 bpm, F minor, piano"
        assert all(set(lm_batches.augment_caption(caption, g).split(", ")) <= set(caption.split(", ")) for _ in range(50))  # off
        seen = [lm_batches.augment_caption(caption, g, plain_tempo=True).split(", ") for _ in range(400)]
        assert all(set(fields) <= set(caption.split(", ")) | set(phrases) for fields in seen)  # its own phrases only
        assert {field for fields in seen for field in fields if field in phrases} == set(phrases)  # each comes up
        named = [fields for fields in seen if word in fields or set(fields) & set(phrases)]
        plain = [fields for fields in named if word not in fields]
        assert 0.35 < len(plain) / len(named) < 0.65  # about PLAIN_TEMPO_SHARE of them
    assert lm_batches.augment_caption("allegretto, piano", g, plain_tempo=True) in ("allegretto, piano", "piano, allegretto", "piano", "allegretto")


def test_loss_scores_only_real_codes_through_the_pattern(tiny_musicgen_dir):
    model = musicgen_lite.load_model(tiny_musicgen_dir)
    net = lm_model.TeacherForcing(model)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 32, (2, 4, 10), generator=g)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False  # row 1 ends after 6 frames
    codes[1, :, 6:] = model.lm.cfg.special_token
    ce_sum, count, loss = net(codes, valid, ["piano", "organ"], torch.tensor([True, True]), None, 0.0, 0.0, None)
    assert count.tolist() == [16, 16, 16, 16]
    torch.testing.assert_close(loss, (ce_sum / count).mean())  # no opening weight: the mean CE of the codebooks
    # reference: the logits predicting code (k, t) are at step index(k, t) - 1, per code
    cond = model.conditions(["piano", "organ"], None, guided=False)
    seq = model.pattern.build(codes, model.lm.cfg.special_token)
    logits = model.lm(seq[:, :, :-1], cond)
    per_code = model.pattern.revert(torch.nn.functional.pad(logits, (0, 0, 1, 0)), 10)  # [B, K, T, card]
    ce = torch.nn.functional.cross_entropy(per_code.flatten(0, 2), codes.clamp(max=31).flatten(), reduction="none")
    expected = (ce.view(2, 4, 10) * valid[:, None]).sum(dim=(0, 2))
    torch.testing.assert_close(ce_sum, expected)


# -- runs -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_a_transformers_checkpoint(tiny_musicgen_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, "--model", tiny_musicgen_dir, "--max-steps", 6,
                 "--eval-every", 3, "--save-every", 3, *FAST) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipping broken.wav: "), warnings
    assert "7 audio files: 4 train" in out and "1 valid" in out and "1 test (unused), 1 skipped (unreadable)" in out
    rows = log_rows(run)
    train_rows = [r for r in rows if r["train_loss"]]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(float(r["train_loss"])) and float(r["train_ppl_3"]) > 1 for r in train_rows)
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [3, 6]
    names = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    assert names == ["best.pt", "step-00000000.pt", "step-00000003.pt", "step-00000006.pt"]

    tuned, original = musicgen_lite.load_model(run), musicgen_lite.load_model(tiny_musicgen_dir)
    last = ckpt.read_checkpoint(run / "checkpoints" / "step-00000006.pt")["model"]
    for name, p in tuned.lm.state_dict().items():
        assert torch.equal(p, last[f"lm.{name}"])
    assert not torch.equal(tuned.lm.heads.weight, original.lm.heads.weight)  # it trained
    for (name, a), b in zip(tuned.text.encoder.state_dict().items(), original.text.encoder.state_dict().values()):
        assert torch.equal(a, b), f"the pretrained T5 is frozen by default, but {name} changed"
    res = musicgen_lite.generate("mozart sonata allegro", duration=0.2, model=tuned, seed=0)
    assert res.tokens.shape == (1, 4, 10)


def relabelled_codec(codec_dir: Path, seed: int = 0) -> tuple[EncodecCodec, list[torch.Tensor]]:
    """The codec with each codebook's codewords in another order: the same audio under other codes. Returns
    it and, per codebook, the map old code -> new code."""
    codec = EncodecCodec.from_pretrained(codec_dir)
    g = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(codec.codebook_size, generator=g) for _ in range(codec.num_codebooks)]
    with torch.no_grad():
        for layer, order in zip(codec.model.quantizer.layers, orders):
            for name in ("embed", "embed_avg", "cluster_size"):
                buffer = getattr(layer.codebook, name)
                buffer.copy_(buffer[order])
    return codec, [torch.argsort(order) for order in orders]


@pytest.fixture(scope="module")
def noise_data_and_codec(codec_dir, tmp_path_factory) -> tuple[Path, Path]:
    """Six files of noise whose loudness and colour change every 20 ms, and the tiny codec with its codewords
    drawn from those files' own latents, so that the noise uses most of every codebook (the random codec
    codes everything with one or two codewords)."""
    d = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    clips = []
    for i in range(6):
        white = rng.standard_normal(SR * 2)
        tilt = np.repeat(rng.uniform(0, 0.95, 100), 640)  # one-pole low-pass, a new colour every frame
        x = np.zeros_like(white)
        for n in range(1, len(x)):
            x[n] = tilt[n] * x[n - 1] + white[n]
        x = (x / np.abs(x).max() * np.repeat(rng.uniform(0.05, 0.9, 100), 640)).astype(np.float32)
        sf.write(d / f"noise{i}.wav", x, SR)
        clips.append(torch.from_numpy(x))
    codec = EncodecCodec.from_pretrained(codec_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        residual = codec.model.encoder(torch.stack(clips)[:, None])  # [B, D, T]
        for layer in codec.model.quantizer.layers:  # farthest-point picks: each codeword far from the others
            frames = residual.transpose(1, 2).reshape(-1, residual.shape[1])  # [B * T, D]
            picks = [int(torch.randint(frames.shape[0], (1,), generator=g))]
            for _ in range(codec.codebook_size - 1):
                picks.append(int(torch.cdist(frames, frames[picks]).amin(dim=1).argmax()))
            layer.codebook.embed.copy_(frames[picks])
            residual = residual - layer.decode(layer.encode(residual))
    out = tmp_path_factory.mktemp("fitted_codec")
    codec.save_pretrained(out)
    return d, out


def test_a_model_moved_onto_a_relabelled_codec_plays_the_same_music(tiny_musicgen_dir, noise_data_and_codec):
    """Co-occurrence of a relabelling is a permutation, so the moved LM gives each new code its old partner's
    embedding and logit: greedy decoding picks the partners of the old codes, and the audio is the same."""
    data, fitted = noise_data_and_codec
    model = musicgen_lite.load_model(tiny_musicgen_dir, precision="fp32")
    model.codec = EncodecCodec.from_pretrained(fitted)
    codec, new_code = relabelled_codec(fitted)
    before = musicgen_lite.generate(["mozart sonata", "a slow chorale"], duration=0.6, model=model, seed=0, top_k=1)
    counts = code_counts(model.codec, codec, scan(data, 0.0), 60.0)  # [K, new, old]
    assert all((counts[k].sum(dim=1) > 0).all() for k in range(4)), "every code must be seen for this test"
    agree = retarget(model, codec, scan(data, 0.0))
    assert agree.tolist() == [1.0] * 4 and model.codec is codec
    after = musicgen_lite.generate(["mozart sonata", "a slow chorale"], duration=0.6, model=model, seed=0, top_k=1)
    for k in range(4):
        assert np.array_equal(after.tokens[:, k], new_code[k][before.tokens[:, k]].numpy())
    np.testing.assert_allclose(after.audio, before.audio, atol=1e-5)
    with pytest.raises(UsageError, match="an LM moves only between codecs of one layout"):
        retarget(model, EncodecCodec.from_pretrained(fitted, num_codebooks=2), scan(data, 0.0))


def test_a_model_moved_onto_its_codec_with_grown_codebooks_keeps_each_codes_rows(tiny_musicgen_dir,
                                                                                noise_data_and_codec, tmp_path):
    """Codebooks grown by splitting (train.py codec --codec C --codebook-size 2C) hold each codeword twice: code
    i and its copy i + C. Each copy the audio uses coincides with its original alone, so the moved LM gives it
    the original's embedding and head row; the original codes decode to the same audio as before."""
    data, fitted = noise_data_and_codec
    model = musicgen_lite.load_model(tiny_musicgen_dir, precision="fp32")
    model.codec = EncodecCodec.from_pretrained(fitted)
    size = model.codec.codebook_size
    cfg = CodecTrainConfig(data="", out="", codec=str(fitted), codebook_size=2 * size)
    source = read_source_config(str(fitted))
    cfg.start_from(source)
    grown = build_codec(cfg, source)
    torch.manual_seed(0)  # the copies' offsets
    grown.load_encodec(model.codec.model)
    grown.to_encodec().save_pretrained(tmp_path / "grown")
    codec = EncodecCodec.from_pretrained(tmp_path / "grown")
    assert codec.codebook_size == 2 * size and codec.num_codebooks == 4
    tokens = musicgen_lite.generate("mozart sonata", duration=0.6, model=model, seed=0).tokens  # [1, K, T]
    np.testing.assert_allclose(codec.decode(torch.from_numpy(tokens)), model.codec.decode(torch.from_numpy(tokens)),
                               atol=1e-5)

    counts = code_counts(model.codec, codec, scan(data, 0.0), 60.0)  # [K, 2C, C]
    old_embed, old_heads = [e.weight.clone() for e in model.lm.embed], model.lm.heads.weight.view(4, size, -1).clone()
    retarget(model, codec, scan(data, 0.0))
    heads = model.lm.heads.weight.view(4, 2 * size, -1)
    original = torch.arange(2 * size) % size  # code i and its copy i + C hold the same codeword
    same = counts[:, torch.arange(2 * size), original].sum(dim=1) / counts.sum(dim=(1, 2))  # [K]
    assert (same > 0.9).all()  # a latent on a boundary between codewords may go to a neighbour's copy
    assert (counts[:, size:].sum(dim=(1, 2)) > 0.2 * counts.sum(dim=(1, 2))).all()  # the copies are used
    for k in range(4):  # a code that coincides with its original alone takes the original's rows
        for code in (counts[k].count_nonzero(dim=1) == 1).nonzero().flatten().tolist():
            if counts[k, code, code % size] > 0:
                torch.testing.assert_close(model.lm.embed[k].weight[code], old_embed[k][code % size])
                torch.testing.assert_close(heads[k, code], old_heads[k, code % size])


@pytest.mark.slow
def test_train_py_moves_a_model_onto_another_codec_and_fine_tunes_it_there(tiny_musicgen_dir, codec_dir, data_dir,
                                                                         tmp_path, capsys):
    other = tmp_path / "other_codec"
    relabelled_codec(codec_dir, seed=1)[0].save_pretrained(other)
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, "--model", tiny_musicgen_dir, "--codec", other, "--max-steps", 2,
                 "--eval-every", 2, *FAST) == 0
    assert "of frames (per codebook)" in capsys.readouterr().out
    moved = musicgen_lite.load_model(run)
    codebook = moved.codec.model.quantizer.layers[0].codebook.embed
    assert torch.equal(codebook, EncodecCodec.from_pretrained(other).model.quantizer.layers[0].codebook.embed)
    assert musicgen_lite.generate("mozart sonata", duration=0.2, model=moved, seed=0).tokens.shape == (1, 4, 10)
    # rerunning the command resumes; the same run with another codec is refused
    assert train("--data", data_dir, "--out", run, "--model", tiny_musicgen_dir, "--codec", codec_dir,
                 "--max-steps", 2, *FAST) == 2
    assert "was started with --codec" in capsys.readouterr().err


@pytest.mark.slow
def test_from_scratch_melody_model_with_a_jointly_trained_t5(codec_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, "--codec", codec_dir, "--preset", "tiny", "--melody",
                 "--max-steps", 4, "--eval-every", 4, *FAST) == 0
    model = musicgen_lite.load_model(run)
    assert model.has_melody and model.lm.cfg.conditioning == "prefix" and model.lm.cfg.dim == 64
    assert model.chroma.chroma_length == 1 + 16000 // 4096  # one 0.5 s segment at the chroma rate
    assert model.lm.cfg.codebook_size == 32 and model.max_duration == 0.5
    tokenizer = model.text.tokenizer
    assert tokenizer.unk_token_id not in tokenizer("mozart string quartet, menuetto")["input_ids"]
    start = ckpt.read_checkpoint(run / "checkpoints" / "step-00000000.pt")["model"]
    changed = [k for k, v in model.text.state_dict().items() if k.startswith("encoder.") and not torch.equal(v, start[f"text.{k}"])]
    assert changed, "the T5 built from the captions trains with the LM"
    hum = torch.from_numpy(tones([392.0, 440.0], 1.0))
    res = musicgen_lite.generate("bach chorale", melody=hum, melody_sample_rate=SR, duration=0.3, model=model, seed=0)
    assert res.tokens.shape == (1, 4, 15)


class Crash(Exception):
    pass


def crash_after_step_3(monkeypatch, *args) -> None:
    """Run train.py lm with `args` until it has written its step-3 checkpoint, then stop it as a crash would."""
    write = ckpt.write_checkpoint

    def write_then_crash(state, path):
        write(state, path)
        if state["step"] == 3:
            raise Crash

    monkeypatch.setattr(ckpt, "write_checkpoint", write_then_crash)
    with pytest.raises(Crash):
        train(*args)
    monkeypatch.setattr(ckpt, "write_checkpoint", write)


SCRATCH = ["--preset", "tiny", "--max-steps", 6, "--save-every", 3, "--eval-every", 3, "--cfg-dropout", 0.3, *FAST]


@pytest.fixture(scope="module")
def straight_run(codec_dir, data_dir, tmp_path_factory) -> Path:
    """Six uninterrupted steps from scratch (joint T5 with dropout, CFG dropout, caption augmentation)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert train("--data", data_dir, "--out", run, "--codec", codec_dir, *SCRATCH) == 0
    return run


@pytest.mark.slow
def test_resumed_run_follows_the_uninterrupted_one_bitwise(straight_run, codec_dir, data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    crash_after_step_3(monkeypatch, "--data", data_dir, "--out", run, "--codec", codec_dir, *SCRATCH)
    assert not (run / "model.safetensors").exists()
    capsys.readouterr()
    assert train("--data", data_dir, "--out", run, "--codec", codec_dir, *SCRATCH) == 0
    assert "resuming from step 3" in capsys.readouterr().out
    straight = train_losses(straight_run)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    assert train_losses(run) == straight  # every step's loss, to the last digit
    a, b = final_weights(straight_run), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_run_written_before_the_renames_resumes(straight_run, codec_dir, data_dir, tmp_path, capsys):
    """Runs of earlier versions recorded their base model with the key "card": they resume, onto the
    same loss curve, and publish a model that says codebook_size."""
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    base = run / "checkpoints" / "base" / "config.json"
    config = json.loads(base.read_text())
    config["lm"] = {("card" if k == "codebook_size" else k): v for k, v in config["lm"].items()}
    base.write_text(json.dumps(config))
    for path in [run / "model.safetensors", run / "checkpoints" / "step-00000006.pt", run / "checkpoints" / "best.pt"]:
        path.unlink()
    capsys.readouterr()
    assert train("--data", data_dir, "--out", run, "--codec", codec_dir, *SCRATCH) == 0
    assert "resuming from step 3" in capsys.readouterr().out
    assert train_losses(run) == train_losses(straight_run)
    assert json.loads((run / "config.json").read_text())["lm"]["codebook_size"] == 32


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(straight_run, codec_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    latest = run / "checkpoints" / "step-00000006.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a torn write
    (run / "model.safetensors").unlink()
    assert train("--data", data_dir, "--out", run, "--codec", codec_dir, *SCRATCH) == 0
    out = capsys.readouterr().out
    assert "checkpoint step-00000006.pt is corrupt" in out and "resuming from step 3" in out
    assert "0 files encoded, 6 from the cache" in out
    a, b = final_weights(straight_run), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(run) == train_losses(straight_run)


@pytest.mark.slow
def test_huge_learning_rate_ends_with_finite_weights(tiny_musicgen_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, "--model", tiny_musicgen_dir, "--lr", 1000, "--warmup-steps", 0,
                 "--max-steps", 40, "--eval-every", 1000, *FAST) == 0
    out = capsys.readouterr().out
    assert "step skipped" in out and "rolled back to step 0, learning rate x0.5" in out
    events = [r["event"] for r in log_rows(run) if r["event"]]
    assert any("step skipped" in e for e in events) and any("rolled back" in e for e in events)
    weights = final_weights(run)
    assert all(torch.isfinite(t).all() for t in weights.values())
    for path in (run / "checkpoints").glob("step-*.pt"):
        assert ckpt.all_finite(ckpt.read_checkpoint(path)["model"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{tmp}/r", "--codec", "{codec}"], "the following arguments are required: --data"),
        (["--data", "{tmp}/nowhere", "--out", "{tmp}/r", "--codec", "{codec}"], "does not exist"),
        (["--data", "{data}", "--out", "{tmp}/r"], "needs --codec"),
        (["--data", "{data}", "--out", "{tmp}/r", "--model", "{tmp}/none"], "does not exist"),
        (["--data", "{data}", "--out", "{tmp}/r", "--model", "{codec}", "--preset", "tiny"], "--preset applies"),
        (["--data", "{data}", "--out", "{tmp}/r", "--codec", "{codec}", "--batch-size", "0"], "--batch-size must be > 0"),
        (["--data", "{data}", "--out", "{tmp}/r", "--codec", "{tmp}"], "cannot load --codec"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, data_dir, codec_dir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, data=data_dir, codec=codec_dir) for a in args]
    try:
        rc = train_lm.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_rerun_with_another_architecture_is_refused(straight_run, codec_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_run / "checkpoints" / "base", run / "checkpoints" / "base")
    args = [a if a != "tiny" else "small-cpu" for a in SCRATCH]
    assert train("--data", data_dir, "--out", run, "--codec", codec_dir, *args) == 2
    assert "was started with --preset tiny, not small-cpu" in capsys.readouterr().err


# -- processes ------------------------------------------------------------------------------------


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


@pytest.mark.slow
def test_train_py_lists_both_commands():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0 and "lm" in proc.stdout and "codec" in proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "lmm"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 2 and "unknown command 'lmm'" in proc.stderr


def _train_single_threaded(*args) -> int:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    return train(*args)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes(tiny_musicgen_dir, data_dir, tmp_path, capsys):
    """The run is a forked child process (it starts without re-importing torch and transformers),
    killed with SIGKILL once its step-4 checkpoint exists; the same command then resumes."""
    run = tmp_path / "run"
    argv = ["--data", data_dir, "--out", run, "--model", tiny_musicgen_dir, "--max-steps", 60, "--save-every", 4,
            "--eval-every", 1000, *FAST]
    child = multiprocessing.get_context("fork").Process(target=_train_single_threaded, args=argv)
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step-00000004.pt").exists():
            assert child.is_alive() and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL and not (run / "model.safetensors").exists()
    capsys.readouterr()
    assert train(*argv) == 0
    out = capsys.readouterr().out
    resumed = [line for line in out.splitlines() if line.startswith("resuming from step")]
    assert len(resumed) == 1 and 4 <= int(resumed[0].split()[3]) < 60, out
    assert "0 files encoded, 6 from the cache" in out
    assert sorted(train_losses(run)) == list(range(1, 61))
    assert musicgen_lite.load_model(run).lm.cfg.codebook_size == 32


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_musicgen_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "lm", "--data", str(data_dir), "--out", str(run), "--model", str(tiny_musicgen_dir),
           "--max-steps", "4", "--eval-every", "2", "--device", "cpu", *map(str, FAST)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr and "[transformers]" not in proc.stderr, proc.stderr[-3000:]
    # both processes hashed their final weights; the main process compared them and wrote that model
    agreed = re.search(r"all 2 processes hold identical weights \(sha256 ([0-9a-f]{12})\)", proc.stdout)
    assert agreed, proc.stdout
    assert proc.stdout.count("done at step 4") == 1  # only the main process reports
    assert [int(r["step"]) for r in log_rows(run) if r["train_loss"]] == [1, 2, 3, 4]
    model = musicgen_lite.load_model(run)
    assert lm_model.weights_digest(model).startswith(agreed.group(1))


# -- TensorBoard ----------------------------------------------------------------------------------


def read_events(run: Path):
    """TensorBoard's own reader over RUN/tensorboard: tags, scalars and audio as the tool would show them."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"audio": 0, "scalars": 0})
    return events.Reload()


@pytest.mark.slow
def test_tensorboard_gets_losses_perplexities_lr_and_generated_audio(tiny_musicgen_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, "--model", tiny_musicgen_dir, "--max-steps", 2,
                 "--eval-every", 2, "--tensorboard", "--tensorboard-samples", 1, *FAST) == 0
    events = read_events(run)
    tags = events.Tags()
    assert {"train/loss", "train/ppl_0", "lr", "val/loss", "val/ppl_0"} <= set(tags["scalars"])
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2]
    assert [e.value for e in losses] == pytest.approx([float(r["train_loss"]) for r in log_rows(run) if r["train_loss"]])
    assert tags["audio"] == ["samples/0"]
    (sample,) = events.Audio("samples/0")
    assert sample.step == 2 and sample.sample_rate == 32000
    wav, rate = sf.read(io.BytesIO(sample.encoded_audio_string))
    assert rate == 32000 and len(wav) == 25 * 640  # one 0.5 s segment of 25 frames, decoded


def test_melody_dropout_of_one_trains_every_kept_row_on_the_null_melody(tiny_default_like_dir):
    """--melody-dropout reaches the loss: at 1.0 (and no guidance dropout) every row keeps its text and
    hears the null melody, exactly the text-only condition; at 0.0 the melody counts."""
    model = musicgen_lite.load_model(tiny_default_like_dir, precision="fp32")
    net = lm_model.TeacherForcing(model)
    k, card, c = model.lm.cfg.num_codebooks, model.codec.codebook_size, model.chroma.chroma_length
    g = torch.Generator().manual_seed(0)
    codes, valid = torch.randint(0, card, (2, k, 12), generator=g), torch.ones(2, 12, dtype=torch.bool)
    chroma, null = torch.randint(1, 12, (2, c), generator=g), torch.zeros(2, c, dtype=torch.long)  # bin 0 = null
    texts, captioned = ["piano, C major", "piano, adagio"], torch.tensor([True, True])

    def loss(chroma, melody_dropout):
        ce_sum, count, _ = net(codes, valid, texts, captioned, chroma, 0.0, melody_dropout, torch.Generator().manual_seed(1))
        return ce_sum / count

    torch.testing.assert_close(loss(chroma, 1.0), loss(null, 0.0))
    assert not torch.allclose(loss(chroma, 0.0), loss(null, 0.0))


def test_the_opening_weight_and_the_pitch_loss_reach_the_loss(tiny_default_like_dir):
    """--opening-weight counts the codes of a segment's first steps w times (code (k, t) is predicted at
    step t + k of the delay pattern); --pitch-loss adds the soft cross-entropy of a head reading the
    opening's states against the histogram of the mix's chromagram."""
    model = musicgen_lite.load_model(tiny_default_like_dir, precision="fp32")
    k, card, c = model.lm.cfg.num_codebooks, model.codec.codebook_size, model.chroma.chroma_length
    g = torch.Generator().manual_seed(0)
    codes, valid = torch.randint(0, card, (2, k, 12), generator=g), torch.ones(2, 12, dtype=torch.bool)
    mix, null = torch.randint(0, 12, (2, c), generator=g), torch.zeros(2, c, dtype=torch.long)  # bin 0 = null
    texts, captioned = ["piano, C major", "piano, A minor"], torch.tensor([True, True])
    ce_sum, count, loss = lm_model.TeacherForcing(model)(codes, valid, texts, captioned, null, 0.0, 0.0, None, mix)

    cond = model.conditions(texts, None, guided=False)  # text and the null melody, as the rows above
    seq = model.pattern.build(codes, model.lm.cfg.special_token)
    per_code = model.pattern.revert(torch.nn.functional.pad(model.lm(seq[:, :, :-1], cond), (0, 0, 1, 0)), 12)
    ce = torch.nn.functional.cross_entropy(per_code.flatten(0, 2), codes.flatten(), reduction="none").view(2, k, 12)
    torch.testing.assert_close(ce.sum(dim=(0, 2)), ce_sum)
    step = torch.arange(12)[None] + torch.arange(k)[:, None]  # [K, T] the step that predicts code (k, t)
    weight = torch.where(step < 5, 4.0, 1.0)
    expected = ((ce * weight).sum(dim=(0, 2)) / (2 * weight.sum(dim=1))).mean()
    weighted_sum, weighted_count, weighted_loss = lm_model.TeacherForcing(model, opening_steps=5, opening_weight=4.0)(
        codes, valid, texts, captioned, null, 0.0, 0.0, None, mix)
    torch.testing.assert_close(weighted_loss, expected)
    torch.testing.assert_close((weighted_sum, weighted_count), (ce_sum, count))  # what the log shows stays unweighted
    assert not torch.allclose(expected, loss)

    pitched = lm_model.TeacherForcing(model, opening_steps=5, pitch_weight=0.5)
    total = pitched(codes, valid, texts, captioned, null, 0.0, 0.0, None, mix)[2]
    target = torch.stack([torch.bincount(row, minlength=12) for row in mix]).float() / c  # [B, 12]
    guess = torch.log_softmax(pitched.pitch_head(model.lm.states(seq[:, :, :-1], cond)[:, :5]), dim=-1)  # [B, 5, 12]
    torch.testing.assert_close(total, loss + 0.5 * -(target[:, None] * guess).sum(-1).mean())
    total.backward()
    assert pitched.pitch_head.weight.grad.abs().sum() > 0  # the head trains with the model


@pytest.mark.slow
def test_a_run_with_the_pitch_loss_resumes_bitwise_and_keeps_its_head(codec_dir, data_dir, tmp_path, monkeypatch, capsys):
    """The pitch head is saved in every checkpoint: a crashed run resumes onto the uninterrupted run's
    losses, and a rerun without --pitch-loss is refused rather than continued with another loss."""
    args = [*SCRATCH, "--melody", "--opening-weight", 3, "--opening-seconds", 0.1, "--pitch-loss", 0.5]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert train("--data", data_dir, "--out", straight, "--codec", codec_dir, *args) == 0
    head = ckpt.read_checkpoint(straight / "checkpoints" / "step-00000006.pt")["pitch_head"]
    assert head["weight"].shape == (12, 64)
    assert head["bias"].abs().sum() > 0  # it starts at zero: the run's batches gave it targets
    assert not any("pitch" in k for k in final_weights(straight))  # training only: the model never holds it
    crash_after_step_3(monkeypatch, "--data", data_dir, "--out", run, "--codec", codec_dir, *args)
    capsys.readouterr()
    without = args[:-2]  # no --pitch-loss
    assert train("--data", data_dir, "--out", run, "--codec", codec_dir, *without) == 2
    assert "trained with --pitch-loss" in capsys.readouterr().err
    assert train("--data", data_dir, "--out", run, "--codec", codec_dir, *args) == 0
    assert train_losses(run) == train_losses(straight) and len(train_losses(run)) == 6
