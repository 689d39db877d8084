"""Codec training: the RVQ's EMA, k-means and dead-code rules, SI-SDR, and `train.py codec` on a tiny codec."""
import contextlib
import copy
import csv
import io
import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import EncodecModel

from codebooks.codec import EncodecCodec
from codebooks import rvq as rvq_module
from codebooks.rvq import EMACodebook, ResidualVQ, beam_search_codes, nearest, swap_fine_codes
from musicgen_lite.audio_data import hash_split
from musicgen_lite.evaluate.signal import si_sdr
from musicgen_lite.training.checkpoints import read_checkpoint
from musicgen_lite.training.codec import (
    build_trainer,
    initialize_codebooks,
    load_audio_data,
    main,
    sample_batch,
    save_checkpoint,
    train_step,
)
from musicgen_lite.training.codec_config import LR_FLOOR, TrainConfig, build_codec

SR = 32000
# A codec small enough to train a few dozen steps in seconds: 0.2 s segments are 10 frames.
TINY = ["--filters", "4", "--hidden-size", "8", "--codebook-size", "64", "--segment-seconds", "0.2",
        "--batch-size", "4", "--kmeans-batches", "2", "--valid-segments", "8", "--quantize-prob", "1",
        "--mel-ramp-steps", "0"]  # fmt: skip


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- RVQ


def test_kmeans_init_puts_codewords_on_the_data_clusters():
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    x = (centers[:, None] + 0.1 * torch.randn(4, 50, 2, generator=gen(0))).reshape(-1, 2)  # [200, 2]
    torch.manual_seed(0)
    book = EMACodebook(size=4, dim=2, kmeans_iters=20)
    book.initialize(x, batches=2)
    # every cluster centre has a codeword within the noise level, and each codeword holds one cluster
    dist = torch.cdist(centers, book.embed)  # [4 centres, 4 codewords]
    assert dist.min(dim=1).values.max() < 0.1
    assert sorted(dist.argmin(dim=1).tolist()) == [0, 1, 2, 3]
    assert torch.allclose(book.cluster_size, torch.full((4,), 25.0))  # 50 latents per cluster over 2 batches
    assert torch.allclose(book.embed_avg, book.embed * 25.0)
    assert book.is_initialized


def test_ema_update_moves_codewords_toward_the_mean_of_their_latents():
    book = EMACodebook(size=2, dim=2, decay=0.9, dead_threshold=0.0)
    book.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    book.cluster_size.fill_(1.0)
    book.embed_avg.copy_(book.embed * 1.0)
    book.inited.fill_(1)
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]])  # both nearest to codeword 0; their mean is (2, 2)
    codes = book.encode(x)
    assert codes.tolist() == [0, 0]
    book.update(x, codes)
    # by hand: count 0.9 * 1 + 0.1 * 2 = 1.1, sum 0.9 * (0, 0) + 0.1 * (4, 4) = (0.4, 0.4) -> mean (0.364, 0.364)
    # (Laplace smoothing with eps 1e-5 changes this by ~1e-5); the unused codeword keeps its place
    assert book.cluster_size.tolist() == pytest.approx([1.1, 0.9])
    assert book.embed[0].tolist() == pytest.approx([0.4 / 1.1, 0.4 / 1.1], abs=1e-4)
    assert book.embed[1].tolist() == pytest.approx([10.0, 10.0], abs=1e-3)
    for _ in range(100):
        book.update(x, book.encode(x))
    assert book.embed[0].tolist() == pytest.approx([2.0, 2.0], abs=1e-3)


def test_a_grown_codebook_quantizes_as_before_then_splits_its_clusters():
    """Growing 4 codewords to 16 (LBG splits): the same quantization at first; EMA training then pulls the
    copies apart, and the 16 codewords quantize the data better than the 4 could."""
    torch.manual_seed(0)
    centers = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    x = (centers[:, None] + torch.randn(4, 200, 2, generator=gen(1))).reshape(-1, 2)  # [800, 2]: 4 wide clusters
    small = EMACodebook(size=4, dim=2, kmeans_iters=20, dead_threshold=0.0)
    small.initialize(x)
    grown = EMACodebook(size=16, dim=2, dead_threshold=0.0)
    grown.grow_from(small)
    assert grown.is_initialized
    assert torch.equal(grown.embed[:4], small.embed)  # code i keeps its codeword ...
    copies = grown.embed.view(4, 4, 2)  # [copy, codeword, D]
    assert (copies - small.embed).abs().max() < 0.01 and not torch.equal(copies[1], copies[0])  # ... its copies are near
    assert torch.allclose(grown.cluster_size, small.cluster_size.repeat(4) / 4)
    assert torch.allclose(grown.embed_avg, grown.embed * grown.cluster_size[:, None])

    def error(book):
        return (x - book.decode(book.encode(x))).pow(2).sum(1).mean().item()

    assert error(grown) == pytest.approx(error(small), rel=1e-2)
    for _ in range(200):
        grown.update(x, grown.encode(x))
    assert error(grown) < 0.5 * error(small)
    assert grown.encode(x).unique().numel() == 16  # every copy took a share of its cluster
    with pytest.raises(ValueError, match="power-of-two multiple"):
        EMACodebook(size=12, dim=2).grow_from(small)


def test_dead_code_is_replaced_by_a_latent_from_the_batch():
    torch.manual_seed(0)
    book = EMACodebook(size=3, dim=2, decay=0.5, dead_threshold=0.1)
    book.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]]))  # codeword 2 is far from all data
    book.cluster_size.fill_(1.0)
    book.embed_avg.copy_(book.embed)
    book.inited.fill_(1)
    x = torch.tensor([[0.1, 0.0], [0.0, 0.1], [1.1, 1.0], [1.0, 0.9]])
    for _ in range(3):  # its count halves each step: 0.5, 0.25, 0.125 -- still above the threshold
        book.update(x, book.encode(x))
        assert book.embed[2].tolist() == pytest.approx([100.0, 100.0], rel=1e-3)
    book.update(x, book.encode(x))  # 0.0625 < 0.1: replaced by one of the batch's latents
    assert any(torch.equal(book.embed[2], row) for row in x)
    assert book.cluster_size[2].item() == pytest.approx(0.1)
    assert torch.allclose(book.embed_avg[2], 0.1 * book.embed[2])
    assert (book.encode(x) == 2).any()  # it now wins latents of its own ...
    book.update(x, book.encode(x))
    assert book.cluster_size[2].item() > 0.1  # ... and so stays alive
    # a codeword that nothing joins moves on to another latent of the next batch
    far = EMACodebook(size=2, dim=2, decay=0.5, dead_threshold=0.1)
    far.embed.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0]]))
    far.cluster_size.copy_(torch.tensor([1.0, 0.01]))
    far.inited.fill_(1)
    y = torch.tensor([[0.0, 0.1], [0.1, 0.0]])
    far.update(y, torch.zeros(2, dtype=torch.long))  # codeword 1 replaced by a latent of y
    far.update(x, torch.zeros(4, dtype=torch.long))  # nothing assigned to it: replaced by a latent of x
    assert any(torch.equal(far.embed[1], row) for row in x)


def test_rvq_training_forward_initialises_updates_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_codebooks=3, codebook_size=16).train()
    assert not rvq.is_initialized
    rvq(torch.randn(2, 4, 30))
    assert rvq.is_initialized  # the first training call ran k-means on its latents
    before = copy.deepcopy(rvq)
    latents = torch.randn(2, 4, 30, requires_grad=True)  # [B, D, T]
    out = rvq(latents)
    assert out.codes.shape == (2, 3, 30)
    # the forward value is the sum of the chosen codewords (as they were before this step's EMA update) ...
    assert torch.allclose(out.quantized, before.decode(out.codes), atol=1e-6)
    assert not torch.equal(rvq.layers[0].embed, before.layers[0].embed)
    # ... and the gradient that of the identity
    out.quantized.sum().backward()
    assert torch.equal(latents.grad, torch.ones_like(latents))
    # each stage lowers the quantization error, and the commitment loss is the mean of the stage errors
    errors = [(latents - before.decode(out.codes[:, : k + 1])).pow(2).mean().item() for k in range(3)]
    assert errors[0] > errors[1] > errors[2]
    assert out.commit_loss.item() == pytest.approx(sum(errors) / 3, rel=1e-4)
    # eval mode: no update, and the output is exactly the decoded codes
    rvq.eval()
    frozen = copy.deepcopy(rvq.state_dict())
    out = rvq(latents)
    assert torch.equal(out.quantized, rvq.decode(out.codes))
    assert all(torch.equal(frozen[k], v) for k, v in rvq.state_dict().items())


def test_beam_search_is_greedy_at_width_one_and_exhaustive_when_wide(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(300, 4)
    embeds = [torch.randn(8, 4) * scale for scale in (1.0, 0.6, 0.3)]
    sums = lambda codes: sum(e[codes[:, k]] for k, e in enumerate(embeds))  # noqa: E731
    error = lambda codes: (x - sums(codes)).pow(2).sum(1)  # noqa: E731
    # width 1: the stage-by-stage nearest codeword, as transformers encodes
    greedy, residual = [], x
    for e in embeds:
        greedy.append(nearest(residual, e))
        residual = residual - e[greedy[-1]]
    assert torch.equal(beam_search_codes(x, embeds, 1), torch.stack(greedy, 1))
    # width C^(K-1) = 64 keeps every partial sum until the last stage: the best of all 512 code triples
    grid = torch.cartesian_prod(*(torch.arange(8),) * 3)  # [512, 3]
    best = (x[:, None] - sums(grid)[None]).pow(2).sum(-1).min(1).values  # [300]
    exhaustive = beam_search_codes(x, embeds, 64)
    torch.testing.assert_close(error(exhaustive), best)
    # in between: nearer than greedy on average, never nearer than the optimum
    middle = error(beam_search_codes(x, embeds, 4))
    assert middle.mean() < error(torch.stack(greedy, 1)).mean() and (middle >= best - 1e-5).all()
    # long inputs are searched in chunks with the same result
    monkeypatch.setattr(rvq_module, "BEAM_CHUNK", 7)
    assert torch.equal(beam_search_codes(x, embeds, 64), exhaustive)
    with pytest.raises(ValueError, match="beam width"):
        beam_search_codes(x, embeds, 0)


def test_rvq_with_a_beam_width_trains_each_codebook_on_the_residual_of_the_searched_codes():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_codebooks=3, codebook_size=16, beam_width=8).train()
    rvq(torch.randn(2, 4, 30))
    before = copy.deepcopy(rvq)
    latents = torch.randn(2, 4, 30)
    out = rvq(latents)
    x = latents.transpose(1, 2).reshape(-1, 4)
    searched = beam_search_codes(x, [layer.embed for layer in before.layers], 8)  # [60, 3]
    assert torch.equal(out.codes, searched.view(2, 30, 3).permute(0, 2, 1))
    torch.testing.assert_close(out.quantized, before.decode(out.codes))
    # codebook 2's EMA moved toward what codebook 1's searched code left of each latent
    expected = copy.deepcopy(before.layers[1])
    expected.update(x - before.layers[0].embed[searched[:, 0]], searched[:, 1])
    torch.testing.assert_close(rvq.layers[1].embed_avg, expected.embed_avg)


def test_rvq_ignores_non_finite_latents():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, num_codebooks=2, codebook_size=8).train()
    rvq(torch.randn(2, 4, 20))
    before = {k: v.clone() for k, v in rvq.state_dict().items()}
    bad = torch.randn(2, 4, 20)
    bad[0, 0, 0] = float("nan")
    rvq(bad)
    assert all(torch.equal(before[k], v) for k, v in rvq.state_dict().items())


# ----------------------------------------------------------------------------- metrics and data


def test_si_sdr_matches_a_hand_computation():
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    est = torch.tensor([1.5, 1.5, 3.5, 3.5])
    # zero-mean: ref (-1.5, -0.5, 0.5, 1.5), est (-1, -1, 1, 1); a = <est, ref> / |ref|^2 = 4 / 5 = 0.8
    # target 0.8 * ref = (-1.2, -0.4, 0.4, 1.2), |target|^2 = 3.2; noise (0.2, -0.6, 0.6, -0.2), |noise|^2 = 0.8
    assert si_sdr(ref, est).item() == pytest.approx(10 * math.log10(3.2 / 0.8), abs=1e-4)
    assert si_sdr(ref, 3.0 * ref + 7.0).item() > 80  # invariant to gain and offset
    batch = torch.stack([est, ref])
    assert si_sdr(torch.stack([ref, ref]), batch).shape == (2,)


def test_split_by_hash_is_deterministic_and_metadata_wins(tmp_path):
    assert hash_split("a/b.wav", 0.5) == hash_split("a/b.wav", 0.5)
    splits = [hash_split(f"piece{i}.wav", 0.25) for i in range(400)]
    assert 60 < splits.count("valid") < 140
    for name in ("x.wav", "y.wav", "z.wav", "t.wav"):
        sf.write(tmp_path / name, 0.1 * np.ones(SR // 10, dtype=np.float32), SR)
    rows = [{"path": p, "split": split} for p, split in (("x.wav", "valid"), ("y.wav", "train"), ("t.wav", "test"))]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_audio_data(tmp_path, SR, valid_fraction=0.01)  # z.wav, not listed, goes by hash: train
    assert (len(data.train), len(data.valid), data.left_out, data.skipped) == (2, 1, 1, 0)


# ----------------------------------------------------------------------------- training end to end


def write_dataset(folder, corrupt: bool = True):
    """Five 1.5 s files of tones with a little noise, and (optionally) a file that is not audio."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(1.5 * SR)) / SR
    for i in range(5):
        f = 110.0 * (i + 2)
        x = 0.3 * np.sin(2 * np.pi * f * t) + 0.1 * np.sin(2 * np.pi * 2.5 * f * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(folder / f"tone{i}.wav", x.astype(np.float32), SR)
    if corrupt:
        (folder / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really audio")
    return folder


def read_log(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny codec trained 30 steps: (run dir, stdout, stderr)."""
    root = tmp_path_factory.mktemp("codec")
    data = write_dataset(root / "data")
    run = root / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--data", str(data), "--out", str(run), *TINY, "--max-steps", "30", "--log-every", "1",
                     "--eval-every", "10", "--save-every", "10", "--keep-checkpoints", "2"])  # fmt: skip
    assert code == 0, err.getvalue()
    return run, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_corrupt_file_is_skipped_with_a_warning(trained):
    run, stdout, stderr = trained
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "broken.wav" in warnings[0]
    assert "4 train files" in stdout and "1 validation files" in stdout and "1 unreadable skipped" in stdout


@pytest.mark.slow
def test_training_lowers_the_loss_and_logs_validation(trained):
    run, stdout, _ = trained
    rows = read_log(run)
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    loss = [float(r["loss"]) for r in rows]
    assert np.mean(loss[-5:]) < 0.7 * np.mean(loss[:5])
    evals = [r for r in rows if r["valid_si_sdr"]]
    assert [int(r["step"]) for r in evals] == [10, 20, 30]
    mel = [float(r["valid_mel"]) for r in evals]
    assert mel[-1] < mel[0]
    assert all(float(r["steps_per_s"]) > 0 for r in rows)
    assert all(len(r["valid_codes_used"].split("/")) == 4 for r in evals)
    # the newest checkpoints are kept, and the exported codec sits in the run folder
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000020.pt", "step-00000030.pt"]
    assert "eval step 30 | SI-SDR" in stdout
    assert (run / "config.json").is_file() and (run / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("beam_width", [None, 4])
def test_export_loads_with_encodec_codec_and_matches_our_rvq(tmp_path, beam_width):
    data = load_audio_data(write_dataset(tmp_path / "data", corrupt=False), SR, valid_fraction=0.1)
    # A small learning rate: the EMA codebooks (and dead-code replacement) see a few steps of a barely moving
    # encoder, so they stay spread over its latents and the codes below vary with the input.
    cfg = TrainConfig(data="", out="", filters=4, hidden_size=8, codebooks=3, codebook_size=16, segment_seconds=0.2,
                      batch_size=4, kmeans_batches=4, lr=1e-6, beam_width=beam_width)  # fmt: skip
    t = build_trainer(cfg, torch.device("cpu"))
    initialize_codebooks(t, data, torch.device("cpu"))
    for _ in range(3):
        assert train_step(t, sample_batch(data.train, cfg.batch_size, cfg.segment_samples, t.generator)) is not None
    t.step = 3
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(t, run)
    ours = t.model.eval()

    codec = EncodecCodec.from_pretrained(run)
    assert (codec.num_codebooks, codec.codebook_size, codec.sample_rate, codec.frame_rate) == (3, 16, SR, 50)
    assert codec.model.config.normalize is False and codec.model.config.chunk_length_s is None
    assert codec.beam_width == (beam_width or 1)  # the codec encodes as it was trained
    wav = torch.cat([w.read(0, SR // 2) for w in data.train + data.valid])[None, None]  # every tone in turn, [1, 1, N]
    with torch.no_grad():
        out = ours(wav)
        decoded = ours.decoder(ours.quantizer.decode(out.codes))
    codes = codec.encode(wav)
    assert torch.equal(codes, out.codes)
    assert all(len(torch.unique(codes[:, k])) > 1 for k in range(3))  # the codes do depend on the input
    assert torch.equal(codec.decode(codes), decoded)
    assert torch.equal(decoded[..., : wav.shape[-1]], out.recon)
    for ours_layer, theirs in zip(ours.quantizer.layers, codec.model.quantizer.layers):
        for name in ("inited", "cluster_size", "embed", "embed_avg"):
            assert torch.equal(getattr(theirs.codebook, name), getattr(ours_layer, name))
    # the training checkpoint holds the same codec
    state = read_checkpoint(run / "checkpoints" / "step-00000003.pt")
    restored = build_codec(TrainConfig(**state["config"]))
    restored.load_state_dict(state["model"])
    with torch.no_grad():
        assert torch.equal(restored.eval()(wav).codes, codes)


def test_target_bandwidth_selects_exactly_k_codebooks():
    from musicgen_lite.training.codec_config import encodec_config

    config = encodec_config(TrainConfig(data="", out="", codebook_size=2048))
    assert config.target_bandwidths == [2.2] and config.frame_rate == 50  # MusicGen's codec: 4 x 11 bits at 50 Hz
    assert EncodecCodec.from_config(config).num_codebooks == 4
    # 31 codebooks of 7 bits at 75 Hz: 31 x 525 bps in floats lands just below 31 codebooks
    odd = TrainConfig(data="", out="", sample_rate=24000, ratios=(8, 5, 4, 2), codebooks=31, codebook_size=128,
                      filters=2, hidden_size=4)  # fmt: skip
    assert EncodecCodec.from_config(encodec_config(odd)).num_codebooks == 31


@pytest.mark.slow
def test_resume_continues_from_the_saved_step_exactly(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", corrupt=False)
    common = ["--data", str(data), *TINY, "--save-every", "3", "--eval-every", "3", "--log-every", "1"]
    assert main([*common, "--out", str(tmp_path / "straight"), "--max-steps", "6"]) == 0
    # an interrupted run: stopped after step 3's checkpoint, then the same command re-run
    assert main([*common, "--out", str(tmp_path / "resumed"), "--max-steps", "3"]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "resumed"), "--max-steps", "6"]) == 0
    assert "resuming from step 3" in capsys.readouterr().out
    straight = read_checkpoint(tmp_path / "straight" / "checkpoints" / "step-00000006.pt")
    resumed = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "step-00000006.pt")
    assert resumed["step"] == 6
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert [r["step"] for r in read_log(tmp_path / "resumed")] == [str(s) for s in range(1, 7)]
    # nothing left to do at the last step; a different codec in the same folder is refused
    assert main([*common, "--out", str(tmp_path / "resumed"), "--max-steps", "6"]) == 0
    assert main([*common, "--out", str(tmp_path / "resumed"), "--max-steps", "9", "--filters", "8"]) == 2
    assert "--filters 4 (now 8)" in capsys.readouterr().err


def test_cosine_rate_falls_to_its_floor_at_the_runs_max_steps_and_stays_there():
    cfg = TrainConfig(data="", out="", filters=4, hidden_size=8, codebook_size=64, segment_seconds=0.2, batch_size=2,
                      lr_schedule="cosine", max_steps=10, lr=1e-3)  # fmt: skip
    t = build_trainer(cfg, torch.device("cpu"))
    rates = []
    for step in (0, 5, 10, 20):
        t.step = step
        rates.append(t.learning_rate())
    assert rates == pytest.approx([1e-3, 1e-3 * (LR_FLOOR + (1 - LR_FLOOR) / 2), LR_FLOOR * 1e-3, LR_FLOOR * 1e-3])
    t.step = 5
    assert train_step(t, 0.1 * torch.randn(2, 1, cfg.segment_samples, generator=gen(0))) is not None
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(rates[1])  # the step ran at the schedule's rate
    constant = build_trainer(TrainConfig(data="", out="", filters=4, hidden_size=8, codebook_size=64, lr=1e-3),
                             torch.device("cpu"))  # fmt: skip
    constant.step = 9
    assert constant.learning_rate() == 1e-3


@pytest.mark.slow
def test_a_cosine_run_resumes_exactly_and_an_extended_one_never_raises_its_rate(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", corrupt=False)
    common = ["--data", str(data), *TINY, "--save-every", "3", "--eval-every", "3", "--lr-schedule", "cosine", "--lr", "1e-3"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main([*common, "--out", str(straight), "--max-steps", "6"]) == 0
    shutil.copytree(straight, interrupted)
    (interrupted / "checkpoints" / "step-00000006.pt").unlink()  # as if stopped after step 3's checkpoint
    capsys.readouterr()
    assert main([*common, "--out", str(interrupted), "--max-steps", "6"]) == 0
    assert "resuming from step 3" in capsys.readouterr().out
    a = read_checkpoint(straight / "checkpoints" / "step-00000006.pt")
    b = read_checkpoint(interrupted / "checkpoints" / "step-00000006.pt")
    assert all(torch.equal(value, b["model"][name]) for name, value in a["model"].items())
    last_rate = 1e-3 * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(last_rate)
    assert main([*common, "--out", str(straight), "--max-steps", "8"]) == 0  # extended: on at the floor
    c = read_checkpoint(straight / "checkpoints" / "step-00000008.pt")
    assert c["schedule_steps"] == 6 and c["optimizer"]["param_groups"][0]["lr"] == pytest.approx(LR_FLOOR * 1e-3)


def test_non_finite_step_is_skipped_without_touching_weights(tmp_path):
    cfg = TrainConfig(data="", out="", filters=4, hidden_size=8, codebook_size=64, segment_seconds=0.2, batch_size=2)
    t = build_trainer(cfg, torch.device("cpu"))
    wav = 0.1 * torch.randn(2, 1, cfg.segment_samples, generator=gen(0))
    assert train_step(t, wav) is not None  # initialises the codebooks
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    bad = wav.clone()
    bad[0, 0, 100] = float("inf")
    assert train_step(t, bad) is None
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_adversarial_step_trains_codec_and_discriminator(tmp_path):
    cfg = TrainConfig(data="", out="", filters=4, hidden_size=8, codebook_size=64, segment_seconds=0.2,
                      batch_size=2, adversarial=True, disc_filters=4)  # fmt: skip
    t = build_trainer(cfg, torch.device("cpu"))
    disc_before = [p.clone() for p in t.disc.parameters()]
    stats = train_step(t, 0.1 * torch.randn(2, 1, cfg.segment_samples, generator=gen(0)))
    assert stats is not None and {"adv", "feat", "disc"} <= stats.keys()
    assert all(math.isfinite(v) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, t.disc.parameters()))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--codebook-size", "1000"], "power of two"),
        (["--segment-seconds", "0.01"], "too short"),
        (["--quantize-prob", "2"], "--quantize-prob"),
        (["--device", "nonsense"], "--device"),
        (["--ratios", "8,x"], "--ratios"),
        (["--lr-schedule", "linear"], "--lr-schedule"),
        (["--beam-width", "0"], "--beam-width must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    data = write_dataset(tmp_path / "data", corrupt=False)
    assert main(["--data", str(data), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_run_started_from_a_trained_codec_keeps_its_architecture_weights_and_codes(trained, tmp_path, capsys):
    source_dir = trained[0]
    data = write_dataset(tmp_path / "data", corrupt=False)
    out = tmp_path / "tuned"
    # no architecture options: they come from the codec; a negligible rate and a near-frozen EMA keep it as it was
    assert main(["--data", str(data), "--out", str(out), "--codec", str(source_dir), "--max-steps", "2",
                 "--lr", "1e-12", "--ema-decay", "0.999999", "--dead-threshold", "0", "--segment-seconds", "0.2",
                 "--batch-size", "2", "--valid-segments", "4", "--eval-every", "2"]) == 0  # fmt: skip
    assert "starting from" in capsys.readouterr().out

    source, tuned = (EncodecModel.from_pretrained(d).eval() for d in (source_dir, out))
    assert tuned.config.num_filters == 4 and tuned.config.codebook_size == 64
    x = torch.from_numpy(sf.read(data / "tone3.wav", dtype="float32")[0])[None, None]  # [1, 1, N]
    with torch.no_grad():
        a, b = (m.encode(x, bandwidth=max(m.config.target_bandwidths)).audio_codes for m in (source, tuned))
        assert (a == b).float().mean() > 0.99
        assert torch.allclose(source.decode(a, [None]).audio_values, tuned.decode(a, [None]).audio_values, atol=1e-4)
    state = read_checkpoint(out / "checkpoints" / "step-00000002.pt")
    assert state["config"]["quantize_warmup"] == 0 and state["config"]["mel_ramp_steps"] == 0


def test_a_codec_to_start_from_is_checked_in_one_line(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", corrupt=False)
    source = tmp_path / "codec"
    build_codec(TrainConfig(data="", out="", filters=4, hidden_size=8, codebook_size=64)).to_encodec().save_pretrained(source)
    capsys.readouterr()  # save_pretrained's progress bar
    small = ["--segment-seconds", "0.2", "--batch-size", "2", "--valid-segments", "4", "--max-steps", "1"]
    run = tmp_path / "run"

    cases = [
        (["--codec", str(tmp_path / "data")], "not a codec directory"),
        (["--codec", str(source), "--filters", "8"], "--filters 8 differs from --codec"),
    ]
    for args, message in cases:
        assert main(["--data", str(data), "--out", str(run), *small, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1

    assert main(["--data", str(data), "--out", str(run), *small, "--codec", str(source), "--filters", "4"]) == 0
    capsys.readouterr()
    for other in ([], ["--codec", str(tmp_path / "other")]):
        if other:
            shutil.copytree(source, tmp_path / "other")
        assert main(["--data", str(data), "--out", str(run), *small, "--max-steps", "2", *other]) == 2
        assert "holds a run started from" in capsys.readouterr().err


def test_a_run_from_a_codec_can_grow_its_codebooks(tmp_path, capsys):
    """--codebook-size 2x the codec's: every codeword is split in two, the K codebooks stay K (the bandwidth
    grows by a bit per code), and the run resumes with the grown size; a smaller size is refused."""
    data = write_dataset(tmp_path / "data", corrupt=False)
    source = tmp_path / "codec"
    codec = build_codec(TrainConfig(data="", out="", filters=4, hidden_size=8, codebook_size=64))
    codec.quantizer.initialize(torch.randn(512, 8, generator=gen(0)))
    codec.to_encodec().save_pretrained(source)
    capsys.readouterr()
    small = ["--segment-seconds", "0.2", "--batch-size", "2", "--valid-segments", "4", "--codec", str(source),
             "--lr", "1e-12", "--ema-decay", "0.999999", "--dead-threshold", "0"]  # fmt: skip
    run = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(run), *small, "--codebook-size", "32", "--max-steps", "1"]) == 2
    assert "--codebook-size 32 differs from --codec" in capsys.readouterr().err

    assert main(["--data", str(data), "--out", str(run), *small, "--codebook-size", "128", "--max-steps", "1"]) == 0
    assert "4 x 128 codebooks" in capsys.readouterr().out
    before, after = (EncodecModel.from_pretrained(d) for d in (source, run))
    assert after.config.codebook_size == 128
    assert after.quantizer.get_num_quantizers_for_bandwidth(max(after.config.target_bandwidths)) == 4
    for old, new in zip(before.quantizer.layers, after.quantizer.layers):
        old, new = old.codebook.embed, new.codebook.embed  # [64, 8], [128, 8]
        assert torch.allclose(new[:64], old, atol=1e-4) and torch.allclose(new[64:], old, atol=0.05)
    assert main(["--data", str(data), "--out", str(run), *small, "--codebook-size", "128", "--max-steps", "2"]) == 0
    assert "resuming from step 1" in capsys.readouterr().out


def test_missing_or_empty_data_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "bad.wav").write_bytes(b"junk")
    assert main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("warning: skipping unreadable audio file") and "error: need audio" in lines[1]


@pytest.mark.slow
def test_tensorboard_gets_the_losses_and_validation_reconstructions(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    data = write_dataset(tmp_path / "data", corrupt=False)
    run = tmp_path / "run"
    assert main(["--data", str(data), "--out", str(run), *TINY, "--max-steps", "2", "--eval-every", "2",
                 "--log-every", "1", "--tensorboard"]) == 0
    events = accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"audio": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "l1", "mel", "valid/si_sdr", "valid/mel"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([float(r["loss"]) for r in read_log(run)])
    assert sorted(tags["audio"]) == ["valid/reconstruction_0", "valid/reconstruction_1"]
    (sample,) = events.Audio("valid/reconstruction_0")
    wav, rate = sf.read(io.BytesIO(sample.encoded_audio_string))
    assert sample.step == 2 and rate == SR and len(wav) == TrainConfig(data="", out="", segment_seconds=0.2).segment_samples


def test_checkpoints_of_the_earlier_format_are_refused_in_one_line(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", corrupt=False)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"step": 3}, tmp_path / "run" / "checkpoints" / "step_00000003.pt")  # the name and format before step-N.pt
    assert main(["--data", str(data), "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "earlier version" in err[0] and "new --out" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--adversarial"], ["--code-noise", "0.5"], ["--lm", "@default", "--lm-noise", "1"],
                                   ["--beam-width", "4"]])
def test_decoder_fine_tuning_keeps_every_token_and_changes_only_the_decoder(tmp_path, extra):
    """train.py decoder: the tuned codec encodes audio to exactly the same codes (an LM trained on them
    stays valid), and only decoder weights moved, with or without the discriminator beside it,
    swapped fine codes or the default model's LM-drawn codes in its batches. With --beam-width the
    codebooks stay and the saved codec searches its codes with that width."""
    from transformers import EncodecModel

    import train
    from musicgen_lite.checkpoints import DEFAULT_MODEL_DIR

    extra = [str(DEFAULT_MODEL_DIR) if a == "@default" else a for a in extra]

    data = tmp_path / "data"
    data.mkdir()
    t = np.arange(32000 * 3) / 32000
    for i, hz in enumerate((220.0, 330.0, 440.0, 550.0)):
        sf.write(data / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * hz * t) * np.exp(-t % 0.5)).astype(np.float32), 32000)
    codec_dir = DEFAULT_MODEL_DIR / "codec"
    out = tmp_path / "run"
    assert train.main(["decoder", "--codec", str(codec_dir), "--data", str(data), "--out", str(out),
                       "--max-steps", "2", "--batch-size", "2", "--valid-segments", "2", "--lr", "1e-3", *extra]) == 0
    before, after = EncodecModel.from_pretrained(codec_dir), EncodecModel.from_pretrained(out)
    moved = {name for name, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[name])}
    assert moved and all(name.startswith("decoder.") for name in moved)
    wav = torch.from_numpy(sf.read(data / "tone1.wav", dtype="float32")[0])[None, None]
    original, tuned = EncodecCodec.from_pretrained(codec_dir), EncodecCodec.from_pretrained(out)
    if "--beam-width" in extra:
        assert tuned.beam_width == 4 and tuned.model.config.rvq_beam_width == 4
        original.beam_width = 4
    assert torch.equal(original.encode(wav), tuned.encode(wav))


def test_code_noise_swaps_only_fine_codes_for_codes_of_the_same_codebook():
    """train.py decoder --code-noise: codebook 1 is kept; a fine code is swapped with about the asked
    probability, for a code its own codebook used in the batch."""
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(k * 100, k * 100 + 50, (4, 500), generator=g) for k in range(4)], dim=1)  # [4, 4, 500]
    assert torch.equal(swap_fine_codes(codes, 0.0, g), codes)
    noisy = swap_fine_codes(codes, 0.3, g)
    assert noisy.shape == codes.shape and torch.equal(noisy[:, 0], codes[:, 0])
    changed = (noisy[:, 1:] != codes[:, 1:]).float().mean().item()
    assert 0.3 * 49 / 50 - 0.03 < changed < 0.3 + 0.03  # a swap may draw the same code (1 in 50 here)
    for k in range(1, 4):
        assert set(noisy[:, k].unique().tolist()) <= set(codes[:, k].unique().tolist())


def test_code_noise_outside_zero_to_one_is_refused_in_one_line(tmp_path, capsys):
    import train
    from musicgen_lite.checkpoints import DEFAULT_MODEL_DIR

    assert train.main(["decoder", "--codec", str(DEFAULT_MODEL_DIR / "codec"), "--data", str(tmp_path),
                       "--out", str(tmp_path / "run"), "--code-noise", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train.py decoder: error: --code-noise must lie in [0, 1], got 1.5"]


def test_lm_noise_replaces_whole_rows_with_the_lms_draws(tiny_default_like_dir):
    """--lm-noise P: each row of a batch keeps its codes or takes the LM's draws for it, never a mix; a
    silent row is drawn under the null melody."""
    from musicgen_lite import load_model
    from musicgen_lite.training.codec_decoder import lm_drawn_codes

    model = load_model(tiny_default_like_dir)
    t = np.arange(32000) / 32000
    wav = torch.from_numpy(np.stack([0.3 * np.sin(2 * np.pi * hz * t) for hz in (220.0, 330.0, 440.0, 0.0)]))
    wav = wav.float()[:, None]  # [4, 1, N], the last row silent (as a zero-padded segment can be)
    codes = model.codec.encode(wav)  # [4, K, T]
    assert lm_drawn_codes(model, codes, wav, 0.0, gen(0)) is codes
    drawn = lm_drawn_codes(model, codes, wav, 1.0, gen(0))
    assert drawn.shape == codes.shape and 0 <= drawn.min() and drawn.max() < model.codec.codebook_size
    assert all(not torch.equal(drawn[i], codes[i]) for i in range(4))  # a random tiny LM never guesses a whole row
    half = lm_drawn_codes(model, codes, wav, 0.5, gen(1))
    kept = [torch.equal(half[i], codes[i]) for i in range(4)]
    assert any(kept) and not all(kept)


@pytest.mark.parametrize("args, message", [
    (["--lm-noise", "0.5"], "--lm-noise needs --lm MODEL"),
    (["--lm-noise", "2"], "--lm-noise must lie in [0, 1], got 2.0"),
    (["--lm", "@tiny", "--lm-noise", "0.5"], "was not trained on this codec's tokens"),
    (["--beam-width", "0"], "--beam-width must be >= 1, got 0"),
])
def test_lm_noise_bad_input_is_one_line(tmp_path, capsys, tiny_default_like_dir, args, message):
    import train
    from musicgen_lite.checkpoints import DEFAULT_MODEL_DIR

    write_dataset(tmp_path / "data", corrupt=False)
    args = [str(tiny_default_like_dir) if a == "@tiny" else a for a in args]
    assert train.main(["decoder", "--codec", str(DEFAULT_MODEL_DIR / "codec"), "--data", str(tmp_path / "data"),
                       "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
