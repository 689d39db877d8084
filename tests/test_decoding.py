"""Decoding internals: the null-row skip, packed weights, the decoding thread count, opt-in precisions."""

import copy
import pickle
import threading

import numpy as np
import pytest
import torch

import musicgen_lite
from musicgen_lite.lm import attending_rows
from musicgen_lite.one_step import RECORDINGS
from musicgen_lite.packing import packed_weight

CAPTIONS = ["mozart sonata allegro in a bright major key with fast runs", "sad adagio"]


@pytest.fixture(scope="module")
def model(tiny_musicgen_dir):
    return musicgen_lite.load_model(tiny_musicgen_dir)


def step_logits(lm, conditions, tokens, packed: bool, attending: int | None = None) -> torch.Tensor:
    """Logits of three decoding steps fed `tokens` [N, K, 3] one step at a time: [3, N, K, codebook_size]."""
    cache = lm.new_cache(conditions, tokens.shape[-1])
    if not packed:
        cache.packed = {}
    if attending is not None:  # undo the skip: every row cross-attends, with its own (zero) keys and values
        cache.attending = attending
        cache.cross, cache.cross_bias = lm._cross(conditions.cross, conditions.cross_mask)
    with torch.no_grad():
        return torch.stack([lm.step(tokens[:, :, s : s + 1], cache, conditions) for s in range(tokens.shape[-1])])


def test_null_rows_skip_cross_attention_exactly(model):
    conditions = model.conditions(CAPTIONS, None, guided=True)  # 2 conditional rows, then 2 null rows
    assert attending_rows(conditions.cross, conditions.cross_mask) == 2
    tokens = torch.randint(0, model.lm.cfg.codebook_size, (4, model.lm.cfg.num_codebooks, 3), generator=torch.Generator().manual_seed(0))
    skipped = step_logits(model.lm, conditions, tokens, packed=False)
    full = step_logits(model.lm, conditions, tokens, packed=False, attending=4)
    assert torch.equal(skipped[:, 2:], full[:, 2:])  # null rows: x + 0 is x
    torch.testing.assert_close(skipped[:, :2], full[:, :2])  # conditional rows: a 2-row instead of a 4-row product
    layer, x = model.lm.layers[0], torch.randn(4, 1, model.lm.cfg.dim)
    kv = layer.cross_attn.memory(conditions.cross)
    with torch.no_grad():
        update = layer.cross_attn(x, kv, model.lm.cross_bias(conditions.cross_mask, x.dtype))
    assert torch.all(update[2:] == 0)


def test_rows_with_text_or_a_mask_are_not_silent():
    cross, mask = torch.zeros(3, 5, 8), torch.zeros(3, 5)
    cross[0, 1], mask[1, 0] = 1.0, 1  # row 0 has states, row 1 a mask, row 2 neither
    assert attending_rows(cross, mask) == 2
    assert attending_rows(cross, None) == 3
    assert attending_rows(torch.zeros(2, 5, 8), torch.zeros(2, 5)) == 0


def test_packed_weights_replace_the_plain_ones_give_the_plain_products_and_follow_weight_updates(tiny_musicgen_dir):
    fresh = musicgen_lite.load_model(tiny_musicgen_dir)  # its weights are changed below
    lm, conditions = fresh.lm, fresh.conditions(CAPTIONS, None, guided=True)
    plain = copy.deepcopy(lm)  # the reference: the same weights, decoded with plain products
    tokens = torch.randint(0, lm.cfg.codebook_size, (4, lm.cfg.num_codebooks, 3), generator=torch.Generator().manual_seed(1))
    cache = lm.new_cache(conditions, 3)
    assert len(cache.packed) == 6 * lm.cfg.num_layers + 1  # self qkv/out, cross q/out, fc1, fc2 per layer; heads
    assert lm.new_cache(conditions, 3).packed[lm.heads] is cache.packed[lm.heads]  # made once, reused
    for module, packed in cache.packed.items():  # in place of the plain weight, not beside it
        assert packed_weight(module) is packed and dict.__getitem__(module._parameters, "weight").numel() == 0
    torch.testing.assert_close(step_logits(lm, conditions, tokens, True), step_logits(plain, conditions, tokens, False))
    with torch.no_grad():
        for m in (lm, plain):
            m.layers[0].fc1.weight.mul_(2.0)  # an in-place update (as an optimizer step makes) repacks
    new = torch.randn_like(plain.layers[1].fc2.weight)
    lm.layers[1].fc2.weight = torch.nn.Parameter(new.clone())  # so does a new tensor
    plain.layers[1].fc2.weight = torch.nn.Parameter(new)
    repacked = lm.new_cache(conditions, 3).packed
    assert repacked[lm.layers[0].fc1] is not cache.packed[lm.layers[0].fc1]
    assert repacked[lm.layers[1].fc2] is not cache.packed[lm.layers[1].fc2]
    assert repacked[lm.heads] is cache.packed[lm.heads]
    torch.testing.assert_close(step_logits(lm, conditions, tokens, True), step_logits(plain, conditions, tokens, False))
    for (name, a), b in zip(lm.state_dict().items(), plain.state_dict().values()):  # unpacked exactly
        assert torch.equal(a, b), name
    assert packed_weight(lm.heads) is None


def test_decoding_threads_do_not_change_tokens_or_the_callers_thread_count(model):
    before = torch.get_num_threads()
    one = musicgen_lite.generate(CAPTIONS, duration=0.3, model=model, top_k=1)
    assert torch.get_num_threads() == before
    model.lm.decode_threads = 2
    try:
        two = musicgen_lite.generate(CAPTIONS, duration=0.3, model=model, top_k=1)
    finally:
        model.lm.decode_threads = None
    np.testing.assert_array_equal(one.tokens, two.tokens)
    assert torch.get_num_threads() == before


def test_an_lm_with_packed_weights_copies_and_pickles(model):
    model.lm.new_cache(model.conditions(["x"], None, guided=True), 2)  # packs
    assert packed_weight(model.lm.heads) is not None
    for clone in (copy.deepcopy(model.lm), pickle.loads(pickle.dumps(model.lm))):
        assert all(packed_weight(m) is None for m in clone.modules() if isinstance(m, torch.nn.Linear))
        for a, b in zip(clone.state_dict().values(), model.lm.state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.05), ("fp16", 0.005), ("int8", 0.15)])
def test_opt_in_precisions_stay_close_to_fp32(tiny_musicgen_dir, model, precision, tolerance):
    low = musicgen_lite.load_model(tiny_musicgen_dir, precision=precision)
    assert low.lm.precision == precision
    conditions = model.conditions(CAPTIONS, None, guided=True)
    tokens = torch.randint(0, model.lm.cfg.codebook_size, (4, model.lm.cfg.num_codebooks, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = model.lm(tokens, conditions), low.lm(tokens, conditions).float()
    assert (out - ref).abs().max() <= tolerance * ref.abs().max()
    result = musicgen_lite.generate(CAPTIONS, duration=0.3, model=low, seed=0)
    assert result.tokens.shape == (2, 4, 15) and np.isfinite(result.audio).all()


def test_precision_errors(tiny_musicgen_dir):
    with pytest.raises(ValueError, match="precision must be one of"):
        musicgen_lite.load_model(tiny_musicgen_dir, precision="fp8")
    int8 = musicgen_lite.load_model(tiny_musicgen_dir, precision="int8")
    with pytest.raises(RuntimeError, match="inference only"):
        int8.lm.state_dict()
    with pytest.raises(ValueError, match="already int8"):
        int8.lm.set_precision("fp16")
    bf16 = musicgen_lite.load_model(tiny_musicgen_dir, precision="bf16")
    assert all(t.dtype == torch.bfloat16 for t in bf16.lm.state_dict().values())


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("which", ["musicgen", "melody"])
def test_the_one_token_step_gives_the_layers_numbers_exactly(which, independent, tiny_musicgen_dir, tiny_melody_dir):
    """The decoding loop's one-token step skips the modules' calls, not their arithmetic, in transformers'
    batch layout and with independent rows (prefix rows packed at their own positions)."""
    lm_model = musicgen_lite.load_model(tiny_musicgen_dir if which == "musicgen" else tiny_melody_dir)
    lm_model.batch_like_transformers = not independent
    lm, conditions = lm_model.lm, lm_model.conditions(CAPTIONS, None, guided=True)
    assert conditions.independent_rows == independent
    tokens = torch.randint(0, lm.cfg.codebook_size, (4, lm.cfg.num_codebooks, 5), generator=torch.Generator().manual_seed(3))
    logits = {}
    for mode in ("fast", "layers"):
        lm.train(mode == "layers")  # the layer-by-layer path (dropout is 0)
        logits[mode] = step_logits(lm, conditions, tokens, packed=True)
    lm.eval()
    assert torch.equal(logits["fast"], logits["layers"])


@pytest.mark.parametrize("which, independent, precision", [("musicgen", False, "fp16"), ("musicgen", True, "fp16"),
                                                            ("melody", False, "fp16"), ("melody", True, "fp16"),
                                                            ("melody", True, "int8")])
def test_the_recorded_step_replays_the_step_exactly(which, independent, precision, tiny_musicgen_dir, tiny_melody_dir):
    """A small fp16 / int8 model's cache records its one-token step and replays it: the same logits, bit for
    bit, over enough steps that the filled keys cross a key block (their length is an input of the recording)."""
    lm_model = musicgen_lite.load_model(tiny_musicgen_dir if which == "musicgen" else tiny_melody_dir, precision=precision)
    lm_model.batch_like_transformers = not independent
    lm, conditions = lm_model.lm, lm_model.conditions(CAPTIONS, None, guided=True)
    tokens = torch.randint(0, lm.cfg.codebook_size, (4, lm.cfg.num_codebooks, 150), generator=torch.Generator().manual_seed(4))
    prefill, steps = tokens[:, :, :20], tokens.shape[-1] - 20
    logits = {}
    for recorded in (True, False):
        lm.record_steps = recorded
        cache = lm.new_cache(conditions, tokens.shape[-1])
        with torch.no_grad():
            lm.step(prefill, cache, conditions)
            assert (cache.step_graph is not None) == recorded
            logits[recorded] = torch.stack([lm.step(tokens[:, :, s : s + 1], cache, conditions) for s in range(20, 20 + steps)])
    assert torch.equal(logits[True], logits[False])


def test_only_a_small_fbgemm_model_with_steps_ahead_records_its_step(tiny_musicgen_dir, model):
    from musicgen_lite.one_step import RECORD_MIN_STEPS

    fp16 = musicgen_lite.load_model(tiny_musicgen_dir, precision="fp16")
    for lm, steps, expected in ((fp16.lm, RECORD_MIN_STEPS + 1, True), (fp16.lm, RECORD_MIN_STEPS - 2, False),
                                (model.lm, RECORD_MIN_STEPS + 1, False)):  # fp32: oneDNN's product cannot be recorded
        conditions = fp16.conditions(CAPTIONS, None, guided=True)
        cache = lm.new_cache(conditions, steps)
        with torch.no_grad():
            lm.step(torch.zeros(4, lm.cfg.num_codebooks, 1, dtype=torch.long), cache, conditions)
        assert (cache.step_graph is not None) == expected
    assert all(p.requires_grad for p in fp16.lm.parameters())  # recording leaves the parameters as they were


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("which", ["musicgen", "melody"])
def test_one_recording_serves_every_cache_of_its_layout(which, independent, tiny_musicgen_dir, tiny_melody_dir):
    """Clips with other texts (other prefix or cross-attention lengths) replay the first clip's recording,
    exactly: a recording holds none of a cache's tensors, so memory does not grow clip by clip."""
    fp16 = musicgen_lite.load_model(tiny_musicgen_dir if which == "musicgen" else tiny_melody_dir, precision="fp16")
    fp16.batch_like_transformers = not independent
    lm = fp16.lm
    tokens = torch.randint(0, lm.cfg.codebook_size, (4, lm.cfg.num_codebooks, 80), generator=torch.Generator().manual_seed(5))
    graphs = []
    for captions in (CAPTIONS, ["a slow romantic nocturne in D flat major with a singing melody over broken chords", "x"]):
        conditions = fp16.conditions(captions, None, guided=True)
        logits = {}
        for recorded in (True, False):
            lm.record_steps = recorded
            cache = lm.new_cache(conditions, tokens.shape[-1])
            with torch.no_grad():
                logits[recorded] = torch.stack([lm.step(tokens[:, :, s : s + 1], cache, conditions) for s in range(tokens.shape[-1])])
            if recorded:
                graphs.append(cache.step_graph)
        assert torch.equal(logits[True], logits[False])
    assert graphs[0] is not None and graphs[0] is graphs[1]


def test_clips_generated_from_two_threads_at_once_share_one_recording(tiny_musicgen_dir):
    """A web page serves requests in threads: two first clips at once record one step and both come out
    as they do one after the other."""
    reference = musicgen_lite.load_model(tiny_musicgen_dir, precision="fp16")
    expected = [musicgen_lite.generate(CAPTIONS[i], duration=2.0, model=reference, seed=i).tokens for i in range(2)]
    fresh = musicgen_lite.load_model(tiny_musicgen_dir, precision="fp16")
    results = [None, None]

    def run(i):
        results[i] = musicgen_lite.generate(CAPTIONS[i], duration=2.0, model=fresh, seed=i).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(results, expected))
    assert len(RECORDINGS[fresh.lm]) == 1 and all(p.requires_grad for p in fresh.lm.parameters())
