"""The melody prior: its losses, `train.py prior` (learning a key from captions, exact resumption), and
a model that plays the prior's line when asked for music without a melody."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import musicgen_lite
from musicgen_lite.melody_prior import MelodyPrior, PriorConfig
from musicgen_lite.sampling import SamplingParams
from musicgen_lite.training import checkpoints as ckpt
from musicgen_lite.training import prior as train_prior

SR = 32000
# two keys, each a line of its tonic triad: what a prior must learn to tell apart from the words alone
LINES = {"in C major": [261.63, 329.63, 392.0], "in F# minor": [369.99, 440.0, 277.18]}
TRIADS = {"in C major": {0, 4, 7}, "in F# minor": {6, 9, 1}}


def tones(hz: list[float], seconds: float) -> np.ndarray:
    n = int(seconds * SR) // len(hz)
    t = np.arange(n) / SR
    return np.concatenate([sum(0.3 / h * np.sin(2 * np.pi * f * h * t) for h in (1, 2, 3)) for f in hz]).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tiny_default_like_dir) -> Path:
    return tiny_default_like_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Captioned piano files with their melody tracks: eight per key, in rotated orders of the key's triad."""
    d = tmp_path_factory.mktemp("prior_data")
    (d / "melody").mkdir()
    rows = []
    for key, hz in LINES.items():
        for i in range(8):
            name = f"{key.split()[1].replace('#', 's')}{i}.wav"
            line = tones(hz[i % 3:] + hz[: i % 3], 3.0)
            sf.write(d / name, line, SR)
            sf.write(d / "melody" / name, line, SR)
            rows.append({"path": name, "melody": f"melody/{name}", "text": f"piano piece, {key}, moderato",
                         "split": "valid" if i == 7 else "train"})
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def tiny_prior(model: musicgen_lite.MusicGen, seed: int = 0, frames_per_token: int = 1) -> MelodyPrior:
    cfg = PriorConfig(dim=16, num_heads=4, num_layers=1, text_layers=1, ffn_dim=32, chroma_length=model.chroma.chroma_length,
                      frames_per_token=frames_per_token)
    return MelodyPrior.untrained(cfg, model.text.tokenizer, seed=seed)


def train(*args) -> int:
    return train_prior.main([str(a) for a in args])


FAST = ["--dim", 16, "--layers", 1, "--batch-size", 8, "--warmup-steps", 5]


@pytest.mark.parametrize("frames_per_token", [1, 2])
def test_losses_are_the_decoding_loop_s_next_token_and_the_caption_s_key(model_dir, frames_per_token):
    """The teacher-forced cross-entropy equals the one the one-token decoding steps give, and the key
    loss reads a start state that has seen only the caption (a pass of the start token alone gives it)."""
    model = musicgen_lite.load_model(model_dir)
    prior = tiny_prior(model, frames_per_token=frames_per_token).eval()
    g = torch.Generator().manual_seed(0)
    pitches = torch.randint(12, (2, prior.cfg.chroma_length), generator=g)
    tokens = prior.tokens(pitches)  # [2, ceil(C / F)]
    assert tokens.shape[1] == -(-pitches.shape[1] // frames_per_token) and int(tokens.max()) < 12**frames_per_token
    assert torch.equal(prior.pitches(tokens), pitches)  # F frames a token, and back
    texts = ["piano piece, in C major", None]
    with torch.no_grad():
        ce, key = prior.loss(pitches, texts)
        cond = prior.conditions(texts, guided=False)
        cache = prior.lm.new_cache(cond, tokens.shape[1] + 1)
        fed = torch.full((2, 1, 1), prior.lm.cfg.special_token)
        step_logits = []
        for t in range(tokens.shape[1]):
            step_logits.append(prior.lm.step(fed, cache, cond)[:, 0])  # [2, 12^F]
            fed = tokens[:, None, t : t + 1]
        nll = -torch.stack(step_logits, 1).log_softmax(-1).gather(-1, tokens[..., None]).mean()
        start = prior.lm.states(torch.full((2, 1, 1), prior.lm.cfg.special_token), cond)[:, 0]  # [2, d]
        histogram = torch.stack([torch.bincount(p, minlength=12) for p in pitches]).float() / pitches.shape[1]
        expected_key = -(histogram * prior.key_head(start).log_softmax(-1)).sum(-1).mean()
    assert ce.item() == pytest.approx(nll.item(), abs=1e-5)
    assert key.item() == pytest.approx(expected_key.item(), abs=1e-5)


def test_train_py_prior_learns_the_key_a_caption_names(model_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--model", model_dir, "--data", data_dir, "--out", run, "--max-steps", 150, "--eval-every", 50,
                 "--lr", 3e-3, "--frames-per-token", 1, *FAST) == 0
    out = capsys.readouterr().out
    assert "melody tracks: 16 (16 read now" in out and "done at step 150" in out
    model = musicgen_lite.load_model(run)  # the model with its prior, checksummed
    assert model.melody_prior is not None
    greedy = SamplingParams(top_k=1, cfg_coef=3.0)
    for key, triad in TRIADS.items():
        line = model.melody_prior.sample([f"moderato, {key}"], [torch.Generator().manual_seed(0)], greedy)[0].argmax(-1)
        assert np.mean([int(p) in triad for p in line]) > 0.8, (key, line.tolist())
    rows = [r for r in (run / "log.csv").read_text().splitlines()[1:] if r]
    first, last = (float(r.split(",")[6]) for r in (rows[0], rows[-1]))  # validation key loss
    assert last < first - 0.3


def test_a_crashed_run_resumes_onto_the_uninterrupted_one(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    args = ["--model", model_dir, "--data", data_dir, "--max-steps", 6, "--eval-every", 2, *FAST]
    assert train(*args, "--out", tmp_path / "straight") == 0
    write = ckpt.write_checkpoint

    def write_then_crash(state, path):
        write(state, path)
        if state["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_checkpoint", write_then_crash)
    assert train(*args, "--out", tmp_path / "resumed") == 130
    monkeypatch.setattr(ckpt, "write_checkpoint", write)
    capsys.readouterr()
    assert train(*args, "--out", tmp_path / "resumed") == 0
    out = capsys.readouterr().out
    assert "resuming from step 4" in out and "(0 read now, 16 from melody_lines.pt)" in out
    straight = MelodyPrior.from_pretrained(tmp_path / "straight" / "melody_prior").state_dict()
    resumed = MelodyPrior.from_pretrained(tmp_path / "resumed" / "melody_prior").state_dict()
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_silent_track_is_a_line_and_an_unreadable_one_is_skipped(model_dir, data_dir, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    sf.write(data / "melody" / "C0.wav", np.zeros(3 * SR, dtype=np.float32), SR)  # a hum that never sounds
    (data / "melody" / "C1.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(200))
    assert train("--model", model_dir, "--data", data, "--out", tmp_path / "run", "--max-steps", 2, *FAST) == 0
    out = capsys.readouterr().out
    assert "warning: skipping C1.wav: melody track:" in out
    assert "melody tracks: 15 (15 read now" in out and "done at step 2" in out


@pytest.mark.parametrize("args, message", [
    (["--max-steps", 0], "--max-steps must be at least 1"),
    (["--condition-dropout", 1.0], "--condition-dropout must be in [0, 1)"),
    (["--dim", 18], "--dim must be a multiple of 4"),
])
def test_bad_options_are_one_line_and_exit_2(args, message, model_dir, data_dir, tmp_path, capsys):
    assert train("--model", model_dir, "--data", data_dir, "--out", tmp_path / "run", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"train.py prior: error: {message}, got {args[1]}" or message in err
    assert len(err.splitlines()) == 1


def test_a_model_without_melody_is_refused(tiny_musicgen_dir, data_dir, tmp_path, capsys):
    assert train("--model", tiny_musicgen_dir, "--data", data_dir, "--out", tmp_path / "run") == 2
    assert "has no melody conditioning" in capsys.readouterr().err


def test_a_model_plays_its_prior_s_line_for_a_caption_without_melody(model_dir, tmp_path):
    """A row without a melody gets the prior's line, drawn from the row's generator before its codes; a
    row with a melody and a continuation do not use the prior."""
    plain = musicgen_lite.load_model(model_dir)
    with_prior = musicgen_lite.load_model(model_dir)
    with_prior.melody_prior = tiny_prior(with_prior, seed=1).eval()
    with_prior.save_pretrained(tmp_path / "m")
    loaded = musicgen_lite.load_model(tmp_path / "m")  # saved and checksummed with its prior
    params = SamplingParams(top_k=5, cfg_coef=3.0)
    texts, frames = ["piano piece, in C major", "moderato, in F# minor"], 30

    def gens():
        return [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]

    tokens = loaded.generate_tokens(texts, frames, params, gens())
    drawn = gens()
    lines = with_prior.melody_prior.sample(texts, drawn)  # what the prior draws first, from the same streams
    expected = plain.generate_tokens(texts, frames, params, drawn, melody=list(lines))
    assert torch.equal(tokens, expected)
    assert not torch.equal(tokens, plain.generate_tokens(texts, frames, params, gens()))

    hum = torch.from_numpy(tones([440.0, 523.25], 2.0))
    mixed = loaded.generate_tokens(texts, frames, params, gens(), melody=[hum, None])
    drawn = gens()
    line = with_prior.melody_prior.sample(texts[1:], drawn[1:])[0]  # only the row without a melody draws a line
    assert torch.equal(mixed, plain.generate_tokens(texts, frames, params, drawn, melody=[hum, line]))

    for m in (loaded, plain):  # a clip over several windows: later windows loop the prior's line, as a hum's
        m.max_duration, m.extend_stride = 0.4, 0.2
    drawn = gens()
    lines = with_prior.melody_prior.sample(texts, drawn)
    assert torch.equal(loaded.generate_tokens(texts, 50, params, gens()),
                       plain.generate_tokens(texts, 50, params, drawn, melody=list(lines)))

    prompt = tokens[:, :, :10]
    assert torch.equal(loaded.generate_tokens(texts, frames, params, gens(), prompt=prompt),
                       plain.generate_tokens(texts, frames, params, gens(), prompt=prompt))


def test_cli_no_prior_lets_the_lm_read_the_text_alone(model_dir, tmp_path):
    from musicgen_lite.cli import generate_main

    model = musicgen_lite.load_model(model_dir)
    model.melody_prior = tiny_prior(model, seed=2).eval()
    model.save_pretrained(tmp_path / "m")
    args = ["--text", "a minuet in G major", "--duration", "0.4", "--model", str(tmp_path / "m"), "--seed", "4",
            "--float", "--no-loudness"]
    assert generate_main([*args, "--out", str(tmp_path / "prior.wav")]) == 0
    assert generate_main([*args, "--no-prior", "--out", str(tmp_path / "text.wav")]) == 0
    plain = musicgen_lite.generate("a minuet in G major", duration=0.4, model=str(model_dir), seed=4).audio[0]
    with_prior = musicgen_lite.generate("a minuet in G major", duration=0.4, model=str(tmp_path / "m"), seed=4).audio[0]
    np.testing.assert_array_equal(sf.read(tmp_path / "text.wav", dtype="float32", always_2d=True)[0].T, plain)
    np.testing.assert_array_equal(sf.read(tmp_path / "prior.wav", dtype="float32", always_2d=True)[0].T, with_prior)
    assert not np.array_equal(plain, with_prior)


def test_the_bundled_prior_writes_lines_in_the_keys_its_captions_name():
    """Krumhansl-Kessler keys of the lines the bundled prior writes for 24 keys x 2 wordings (its own
    sampling defaults, fixed seeds): the parallel mode and the tonic the caption names."""
    from musicgen_lite.checkpoints import load_default_model
    from musicgen_lite.evaluate.music import KK_MAJOR, KK_MINOR, PITCH_CLASSES

    prior = load_default_model().melody_prior
    assert prior is not None
    cases = [(tonic, mode, template) for tonic in range(12) for mode in ("major", "minor")
             for template in ("classical piano piece in {}, moderato", "{}, sonata, allegro, piano")]
    texts = [template.format(f"{PITCH_CLASSES[tonic]} {mode}") for tonic, mode, template in cases]
    lines = prior.sample(texts, [torch.Generator().manual_seed(i) for i in range(len(texts))])  # [48, C, 12]
    profiles = np.stack([[np.roll(p, t) for t in range(12)] for p in (KK_MAJOR, KK_MINOR)])  # [2, 12, 12]
    mode_right = tonic_right = 0
    for (tonic, mode, _), line in zip(cases, lines.mean(1).numpy()):
        scores = np.array([[np.corrcoef(line, profiles[m, t])[0, 1] for t in range(12)] for m in range(2)])
        mode_right += ("major" if scores[0, tonic] >= scores[1, tonic] else "minor") == mode
        tonic_right += int(np.unravel_index(np.nanargmax(scores), scores.shape)[1]) == tonic
    assert mode_right / len(cases) >= 0.8 and tonic_right / len(cases) >= 0.45, (mode_right, tonic_right)


def test_a_row_s_line_and_codes_do_not_depend_on_its_batch(model_dir):
    model = musicgen_lite.load_model(model_dir)
    model.melody_prior = tiny_prior(model, seed=3).eval()
    params = SamplingParams(top_k=5, cfg_coef=3.0)
    texts = ["a much longer caption: mozart string quartet, menuetto, in G major, 3/4, piano", "in C minor"]
    both = model.generate_tokens(texts, 20, params, [torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = model.generate_tokens(texts[1:], 20, params, [torch.Generator().manual_seed(2)])
    assert torch.equal(both[1:], alone)


def test_the_lm_trainer_carries_a_model_s_prior_and_resumes(model_dir, data_dir, tmp_path, capsys):
    from musicgen_lite.training import lm as train_lm

    model = musicgen_lite.load_model(model_dir)
    model.melody_prior = tiny_prior(model, seed=4).eval()
    model.save_pretrained(tmp_path / "m")
    fast = ["--segment-seconds", "0.5", "--batch-size", "4", "--num-workers", "0", "--melody"]
    args = ["--model", tmp_path / "m", "--data", data_dir, "--out", tmp_path / "run", *fast]
    assert train_lm.main([str(a) for a in (*args, "--max-steps", 2, "--save-every", 2)]) == 0
    assert train_lm.main([str(a) for a in (*args, "--max-steps", 3, "--save-every", 2)]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    carried = musicgen_lite.load_model(tmp_path / "run").melody_prior.state_dict()
    assert all(torch.equal(v, carried[k]) for k, v in model.melody_prior.state_dict().items())
