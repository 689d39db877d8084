"""Codebook interleaving patterns: hand-drawn layouts, round trips, and transformers' delay pattern."""
import pytest
import torch
from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

from codebooks.patterns import (
    CoarseFirstPattern,
    DelayPattern,
    FlatteningPattern,
    ParallelPattern,
    make_pattern,
)

NAMES = ["delay", "parallel", "flattening", "coarse_first"]

# K=3 codebooks, T=4 frames; a digit is the frame index of the code in that slot, "." the special token.
EXPECTED_GRIDS = {
    "delay": """
        . 0 1 2 3 . .
        . . 0 1 2 3 .
        . . . 0 1 2 3
    """,
    "parallel": """
        . 0 1 2 3
        . 0 1 2 3
        . 0 1 2 3
    """,
    "flattening": """
        . 0 . . 1 . . 2 . . 3 . .
        . . 0 . . 1 . . 2 . . 3 .
        . . . 0 . . 1 . . 2 . . 3
    """,
    "coarse_first": """
        . 0 1 2 3 . . . .
        . . . . . 0 1 2 3
        . . . . . 0 1 2 3
    """,
}


def parse_grid(text: str) -> torch.Tensor:
    rows = [[-1 if cell == "." else int(cell) for cell in line.split()] for line in text.strip().splitlines()]
    return torch.tensor(rows)  # [K, S]


@pytest.mark.parametrize("name", NAMES)
def test_build_matches_hand_drawn_grid(name):
    pattern = make_pattern(name, 3)
    codes = torch.arange(4).expand(1, 3, 4)  # code of frame t is t, in every codebook
    expected = parse_grid(EXPECTED_GRIDS[name])
    assert pattern.num_steps(4) == expected.shape[1]
    assert torch.equal(pattern.build(codes, special_token=-1)[0], expected)
    assert torch.equal(pattern.slot_mask(4), expected >= 0)


def test_make_pattern_classes_and_unknown_name():
    assert isinstance(make_pattern("delay", 4), DelayPattern)
    assert isinstance(make_pattern("parallel", 4), ParallelPattern)
    assert isinstance(make_pattern("flattening", 4), FlatteningPattern)
    assert isinstance(make_pattern("coarse_first", 4), CoarseFirstPattern)
    with pytest.raises(ValueError, match="unknown codebook pattern"):
        make_pattern("zigzag", 4)


def test_custom_delays_and_bad_delays():
    pattern = DelayPattern(3, delays=[0, 2, 2])
    codes = torch.arange(2).expand(1, 3, 2)
    expected = parse_grid(
        """
        . 0 1 . .
        . . . 0 1
        . . . 0 1
        """
    )
    assert torch.equal(pattern.build(codes, special_token=-1)[0], expected)
    with pytest.raises(ValueError):
        DelayPattern(3, delays=[0, 1])
    with pytest.raises(ValueError):
        DelayPattern(2, delays=[0, -1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_codebooks", [1, 2, 4])
@pytest.mark.parametrize("frames", [0, 1, 5])
def test_round_trip_and_layout(name, num_codebooks, frames):
    pattern = make_pattern(name, num_codebooks)
    special = 64
    codes = torch.randint(0, special, (2, num_codebooks, frames), generator=torch.Generator().manual_seed(frames))
    seq = pattern.build(codes, special)
    steps = pattern.num_steps(frames)
    assert seq.shape == (2, num_codebooks, steps) and seq.dtype == codes.dtype
    assert torch.equal(pattern.revert(seq, frames), codes)

    mask = pattern.slot_mask(frames)  # [K, S]
    assert mask.shape == (num_codebooks, steps)
    assert not mask[:, 0].any()  # the start step is all special
    assert torch.equal(seq != special, mask.expand_as(seq))
    assert torch.equal(mask.sum(dim=1), torch.full((num_codebooks,), frames))

    layout = pattern.layout(frames)
    assert len(layout) == steps and layout[0] == []
    seen = set()
    index = pattern.step_index(frames)
    for s, coords in enumerate(layout):
        assert len({k for _, k in coords}) == len(coords)  # at most one code per codebook per step
        for t, k in coords:
            assert index[k, t] == s
            assert torch.equal(seq[:, k, s], codes[:, k, t])
            seen.add((t, k))
    assert seen == {(t, k) for t in range(frames) for k in range(num_codebooks)}


@pytest.mark.parametrize("name", NAMES)
def test_revert_logits_gathers_per_code_scores(name):
    pattern = make_pattern(name, 3)
    frames, vocab = 4, 5
    steps = pattern.num_steps(frames)
    logits = torch.randn(2, 3, steps, vocab, requires_grad=True)
    reverted = pattern.revert(logits, frames)
    assert reverted.shape == (2, 3, frames, vocab)
    for s, coords in enumerate(pattern.layout(frames)):
        for t, k in coords:
            assert torch.equal(reverted[:, k, t], logits[:, k, s])
    reverted.sum().backward()  # gradient reaches exactly the slots that hold codes
    touched = (logits.grad != 0).all(dim=-1)  # [B, K, S]
    assert torch.equal(touched, pattern.slot_mask(frames).expand(2, -1, -1))

    extra = torch.randn(2, 3, steps, 2, 3)  # any trailing shape
    assert torch.equal(pattern.revert(extra, frames)[:, 1, 2], extra[:, 1, pattern.step_index(frames)[1, 2]])


def test_bad_inputs_raise():
    pattern = DelayPattern(4)
    with pytest.raises(ValueError):
        pattern.build(torch.zeros(2, 3, 5, dtype=torch.long), 64)  # wrong K
    with pytest.raises(ValueError):
        pattern.build(torch.zeros(4, 5, dtype=torch.long), 64)  # wrong ndim
    with pytest.raises(ValueError):
        pattern.build(torch.zeros(2, 4, 5), 64)  # float codes
    assert pattern.revert(torch.zeros(2, 4, 9, dtype=torch.long), 5).shape == (2, 4, 5)  # S = 5 + 3 + 1
    with pytest.raises(ValueError):
        pattern.revert(torch.zeros(2, 4, 8, dtype=torch.long), 5)  # wrong S
    with pytest.raises(ValueError):
        pattern.revert(torch.zeros(2, 3, 9, dtype=torch.long), 5)  # wrong K
    with pytest.raises(ValueError):
        pattern.num_steps(-1)
    with pytest.raises(ValueError):
        ParallelPattern(0)


def tiny_musicgen_decoder(num_codebooks: int, cardinality: int) -> MusicgenForCausalLM:
    config = MusicgenDecoderConfig(
        vocab_size=cardinality,
        num_codebooks=num_codebooks,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=cardinality,
        bos_token_id=cardinality,
    )
    return MusicgenForCausalLM(config).eval()


# transformers only applies the delay when max_length >= 2K - 1, i.e. T >= K - 1
@pytest.mark.parametrize("num_codebooks,frames", [(1, 3), (2, 1), (4, 3), (4, 10)])
def test_delay_pattern_matches_transformers(num_codebooks, frames):
    card, batch = 32, 2
    decoder = tiny_musicgen_decoder(num_codebooks, card)
    pattern = DelayPattern(num_codebooks)
    codes = torch.randint(0, card, (batch, num_codebooks, frames), generator=torch.Generator().manual_seed(0))
    steps = pattern.num_steps(frames)
    assert steps == frames + num_codebooks

    # 1) a full prompt [start] + codes: transformers' pattern mask is the delayed sequence itself
    start = torch.full((batch, num_codebooks, 1), card)
    prompt = torch.cat([start, codes], dim=-1).reshape(batch * num_codebooks, 1 + frames)
    _, hf_seq = decoder.build_delay_pattern_mask(prompt, pad_token_id=card, max_length=steps)
    assert torch.equal(hf_seq.reshape(batch, num_codebooks, steps), pattern.build(codes, card))

    # 2) generation from the start token alone: -1 marks the slots the LM must fill
    _, hf_mask = decoder.build_delay_pattern_mask(
        start.reshape(batch * num_codebooks, 1), pad_token_id=card, max_length=steps
    )
    assert torch.equal((hf_mask == -1).reshape(batch, num_codebooks, steps)[0], pattern.slot_mask(frames))

    # a "generated" sequence: codes in the slots, arbitrary tokens elsewhere (step 0 is the input start token)
    generated = pattern.build(codes, card)
    noise = torch.randint(0, card, generated.shape, generator=torch.Generator().manual_seed(1))
    generated = torch.where(pattern.slot_mask(frames), generated, noise)
    generated[:, :, 0] = card
    # transformers' de-delay, as in MusicgenForCausalLM.generate: re-apply the mask, drop pad ids
    flat = decoder.apply_delay_pattern_mask(generated.reshape(batch * num_codebooks, steps), hf_mask)
    hf_codes = flat[flat != card].reshape(batch, num_codebooks, -1)
    assert torch.equal(hf_codes, codes)
    assert torch.equal(pattern.revert(generated, frames), hf_codes)
