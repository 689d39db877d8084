"""Per-model sampling defaults (generation_config.json) and the decoding thread count."""

import json
import shutil

import numpy as np
import pytest
import torch

import musicgen_lite
from musicgen_lite.generation_config import MUSICGEN_DEFAULTS, read_generation_defaults
from musicgen_lite.sampling import SamplingParams
from tiny_models import hf_greedy_tokens

CAPTIONS = ["mozart sonata allegro in a bright major key with fast runs", "sad adagio"]


@pytest.fixture(scope="module")
def model(tiny_musicgen_dir):
    return musicgen_lite.load_model(tiny_musicgen_dir)


def with_generation_config(src, dst, **fields):
    """A copy of the checkpoint `src` whose generation_config.json has `fields` changed (None removes)."""
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    path.write_text(json.dumps(config))
    return dst


def test_a_checkpoint_written_like_musicgen_small_has_its_values(model):
    assert model.generation_defaults == SamplingParams(top_k=250, top_p=0.0, temperature=1.0, cfg_coef=3.0)


def test_transformers_generation_config_is_honoured_greedy(tiny_musicgen_dir, tmp_path):
    """do_sample false in the checkpoint: with no sampling arguments we decode greedily, as transformers'
    own generate() does with that file, and give its tokens."""
    greedy_dir = with_generation_config(tiny_musicgen_dir, tmp_path / "greedy", do_sample=False, guidance_scale=2.0)
    greedy = musicgen_lite.load_model(greedy_dir)
    assert greedy.generation_defaults == SamplingParams(top_k=1, top_p=0.0, temperature=1.0, cfg_coef=2.0)
    frames = 12
    ours = musicgen_lite.generate(CAPTIONS, duration=frames / 50, model=greedy, seed=0)
    expected = hf_greedy_tokens(tiny_musicgen_dir, CAPTIONS, frames, guidance_scale=2.0)
    np.testing.assert_array_equal(ours.tokens, expected.numpy())


def test_transformers_generation_config_sampling_values(tiny_musicgen_dir, tmp_path):
    d = with_generation_config(tiny_musicgen_dir, tmp_path / "k", top_k=7, top_p=0.9, temperature=0.7, guidance_scale=None)
    assert musicgen_lite.load_model(d).generation_defaults == SamplingParams(top_k=7, top_p=0.9, temperature=0.7, cfg_coef=3.0)
    no_k = with_generation_config(tiny_musicgen_dir, tmp_path / "no_k", top_k=0, top_p=1.0)  # transformers: the whole distribution
    assert read_generation_defaults(no_k).top_p == 1.0
    off = with_generation_config(tiny_musicgen_dir, tmp_path / "off", top_p=1.0)  # transformers: top-p off
    assert read_generation_defaults(off) == MUSICGEN_DEFAULTS
    (off / "generation_config.json").unlink()
    assert musicgen_lite.load_model(off).generation_defaults == MUSICGEN_DEFAULTS  # no file: MusicGen's


def test_the_callers_arguments_win(tiny_musicgen_dir, model, tmp_path):
    greedy = musicgen_lite.load_model(with_generation_config(tiny_musicgen_dir, tmp_path / "g", do_sample=False))
    sampled = musicgen_lite.generate("piano", duration=0.3, model=greedy, top_k=250, seed=5)  # the caller's top-k
    reference = musicgen_lite.generate("piano", duration=0.3, model=model, seed=5)  # MusicGen's defaults
    np.testing.assert_array_equal(sampled.tokens, reference.tokens)
    assert not np.array_equal(sampled.tokens, musicgen_lite.generate("piano", duration=0.3, model=greedy, seed=5).tokens)
    cold = musicgen_lite.generate("piano", duration=0.3, model=model, cfg_coef=1.0, temperature=0.5, seed=5)
    np.testing.assert_array_equal(
        cold.tokens, musicgen_lite.generate("piano", duration=0.3, model=greedy, top_k=250, cfg_coef=1.0, temperature=0.5, seed=5).tokens
    )


def test_own_models_keep_their_defaults_in_the_transformers_format(model, tmp_path):
    from transformers import GenerationConfig

    chosen = SamplingParams(top_k=40, top_p=0.0, temperature=0.8, cfg_coef=4.5)
    before = model.generation_defaults
    model.generation_defaults = chosen
    try:
        model.save_pretrained(tmp_path / "ours")
    finally:
        model.generation_defaults = before
    assert musicgen_lite.load_model(tmp_path / "ours").generation_defaults == chosen
    hf = GenerationConfig.from_pretrained(tmp_path / "ours")  # transformers reads the same file
    assert (hf.do_sample, hf.top_k, hf.top_p, hf.temperature, hf.guidance_scale) == (True, 40, 1.0, 0.8, 4.5)


def test_a_bad_generation_config_is_one_clear_error(tiny_musicgen_dir, tmp_path):
    bad = with_generation_config(tiny_musicgen_dir, tmp_path / "bad", temperature=0)
    with pytest.raises(ValueError, match="generation_config.json: temperature must be > 0"):
        musicgen_lite.load_model(bad)
    (bad / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        musicgen_lite.load_model(bad)


def test_bad_sampling_arguments_are_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        musicgen_lite.generate("x", model=tmp_path / "nothing_here", top_k=0)


def test_threads_default_by_model_size_and_do_not_change_tokens(model):
    from musicgen_lite.lm import SMALL_STEP_BYTES, LMConfig, step_weight_bytes

    assert model.lm.decode_threads is None
    everything = torch.get_num_threads()
    # a tiny model: one thread or all, by timing, where that cannot change a number; else one
    assert model.lm.decoding_threads(independent_rows=True) == (1, everything)
    assert model.lm.decoding_threads(independent_rows=False) == (1,)
    small_cpu = LMConfig(codebook_size=1024, dim=256, num_heads=4, num_layers=6, ffn_dim=1024)  # the default model
    musicgen_small = LMConfig(codebook_size=2048, dim=1024, num_heads=16, num_layers=24, ffn_dim=4096)
    assert step_weight_bytes(small_cpu) < SMALL_STEP_BYTES < step_weight_bytes(musicgen_small)
    model.lm.cfg, saved = musicgen_small, model.lm.cfg
    try:
        assert model.lm.decoding_threads(True) == model.lm.decoding_threads(False) == (everything,)
    finally:
        model.lm.cfg = saved
    before = torch.get_num_threads()
    one = musicgen_lite.generate(CAPTIONS, duration=0.3, model=model, top_k=1, threads=1)
    two = musicgen_lite.generate(CAPTIONS, duration=0.3, model=model, top_k=1, threads=2)
    default = musicgen_lite.generate(CAPTIONS, duration=0.3, model=model, top_k=1)
    np.testing.assert_array_equal(one.tokens, two.tokens)
    np.testing.assert_array_equal(one.tokens, default.tokens)
    assert torch.get_num_threads() == before
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            musicgen_lite.generate("x", duration=0.1, model=model, threads=bad)


def test_the_threads_argument_sets_the_decoding_loops_threads(model, monkeypatch):
    import musicgen_lite.sampling as sampling

    seen = []
    real = sampling.intra_op_threads

    def spy(n):
        seen.append(n)
        return real(n)

    monkeypatch.setattr(sampling, "intra_op_threads", spy)
    musicgen_lite.generate("x", duration=0.1, model=model, threads=3)
    model.lm.decode_threads = 2
    try:
        musicgen_lite.generate("x", duration=0.1, model=model)  # the model's setting when the caller gives none
        musicgen_lite.generate("x", duration=0.1, model=model, threads=1)  # the caller's wins
    finally:
        model.lm.decode_threads = None
    assert seen == [3, 2, 1]


def test_fastest_threads_runs_on_the_count_whose_trial_steps_were_faster(monkeypatch):
    from musicgen_lite import threads

    clock = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock[0])
    cost = {1: 1.0, 2: 3.0, 3: 1.0}  # seconds a step takes on each count: one thread is faster, then two

    def run(pace, steps):
        used = []
        for _ in range(steps):
            n = pace.start()
            assert torch.get_num_threads() == n
            clock[0] += cost[n]
            pace.stop()
            used.append(n)
        return used

    before = torch.get_num_threads()
    try:
        pace = threads.FastestThreads((1, 2), trial=2, period=10)
        # the prefill on the most threads, the trial interleaved, then the faster count until the next trial
        assert run(pace, 11) == [2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 1]
        cost[1], cost[2] = 3.0, 1.0  # the machine changed
        assert run(pace, 10) == [1, 2, 1, 2, 2, 2, 2, 2, 2, 2]
        assert run(threads.FastestThreads((3,)), 4) == [3, 3, 3, 3]
        # two threads ten times slower (a busy machine): they leave each trial after one step, and trials
        # that keep one thread come half as often each time
        cost[1], cost[2] = 1.0, 10.0
        used = run(threads.FastestThreads((1, 2), trial=2, period=10), 41)
        assert [i for i, n in enumerate(used) if n == 2] == [0, 2, 12, 32]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_decoding_on_timed_thread_counts_gives_the_one_thread_tokens(tiny_default_like_dir, monkeypatch, precision):
    """A default-like model (prefix rows decoded independently) switches between one thread and two while
    it samples; its tokens are those of one thread throughout."""
    from musicgen_lite import sampling
    from musicgen_lite.threads import FastestThreads

    used = []

    class Switching(FastestThreads):  # a one-step trial every three steps: the count changes all the time
        def __init__(self, choices):
            super().__init__(choices, trial=1, period=3)

        def start(self):
            used.append(super().start())
            return used[-1]

    model = musicgen_lite.load_model(tiny_default_like_dir, precision=precision)
    before = torch.get_num_threads()
    one = musicgen_lite.generate(CAPTIONS, duration=0.5, model=model, seed=3, threads=1)
    monkeypatch.setattr(sampling, "FastestThreads", Switching)
    torch.set_num_threads(2)
    try:
        auto = musicgen_lite.generate(CAPTIONS, duration=0.5, model=model, seed=3)
    finally:
        torch.set_num_threads(before)
    assert set(used) == {1, 2}
    np.testing.assert_array_equal(one.tokens, auto.tokens)


@pytest.mark.slow
def test_import_bounds_openmp_spinning_unless_the_user_chose():
    import os
    import subprocess
    import sys

    def spin_after_import(**preset):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | preset
        code = "import os, musicgen_lite; print(os.environ.get('GOMP_SPINCOUNT'))"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()

    assert spin_after_import() == "10000"
    assert spin_after_import(GOMP_SPINCOUNT="5") == "5"
    assert spin_after_import(OMP_WAIT_POLICY="PASSIVE") == "None"


def test_a_stream_is_the_same_whatever_thread_counts_the_loop_chose(tiny_default_like_dir, monkeypatch):
    """The decoding loop's timed thread choice differs from run to run; the streamed audio does not."""
    from musicgen_lite import sampling
    from musicgen_lite.threads import FastestThreads

    model = musicgen_lite.load_model(tiny_default_like_dir)
    runs = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for period in (3, 4):  # other switching patterns: the loop's last count before each chunk differs
            monkeypatch.setattr(sampling, "FastestThreads", lambda choices, p=period: FastestThreads(choices, trial=1, period=p))
            stream = musicgen_lite.generate_stream(CAPTIONS[0], duration=0.6, model=model, seed=5, chunk_seconds=0.2)
            runs.append(np.concatenate(list(stream), axis=-1))
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(runs[0], runs[1])
