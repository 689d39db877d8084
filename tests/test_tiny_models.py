"""Sanity checks of the tiny checkpoints and of the transformers greedy oracle in tests/tiny_models.py.

Every exact-match test of our own LM leans on these fixtures, so they have to be shown to be what
they claim: loadable offline like the real checkpoints, with the real token geometry, and random
enough that greedy decoding depends on the prompt, the chroma and the guidance scale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    MusicgenForConditionalGeneration,
    MusicgenMelodyForConditionalGeneration,
)

from tiny_models import (
    CAPTIONS,
    build_tiny_musicgen,
    hf_greedy_margin,
    hf_greedy_tokens,
    load_hf,
    one_hot_chroma,
)

K = 4
CODEBOOK_SIZE = 32
LONG = "80s pop track with bassy drums and synth"
SHORT = "a calm piano"


def chroma_pair(frames: int = 30) -> torch.Tensor:
    """Two different one-hot chromagrams [2, frames, 12]: a rising scale and a held note."""
    bins = torch.stack([torch.arange(frames) % 12, torch.full((frames,), 7)])
    return one_hot_chroma(bins)


def test_hub_is_offline() -> None:
    import huggingface_hub.constants

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE


@pytest.mark.parametrize(
    ("fixture", "model_type", "decoder_type", "model_class"),
    [
        ("tiny_musicgen_dir", "musicgen", "musicgen_decoder", MusicgenForConditionalGeneration),
        ("tiny_melody_dir", "musicgen_melody", "musicgen_melody_decoder", MusicgenMelodyForConditionalGeneration),
    ],
)
def test_checkpoint_layout_matches_the_hub_ones(
    request: pytest.FixtureRequest, fixture: str, model_type: str, decoder_type: str, model_class: type
) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    for name in ("config.json", "generation_config.json", "model.safetensors", "spiece.model", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name

    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == model_type
    assert config["text_encoder"]["model_type"] == "t5"
    assert config["audio_encoder"]["model_type"] == "encodec"
    assert config["decoder"]["model_type"] == decoder_type
    assert config["decoder"]["vocab_size"] == CODEBOOK_SIZE
    assert config["decoder"]["num_codebooks"] == K
    assert config["decoder"]["max_position_embeddings"] >= 512
    assert config["audio_encoder"]["sampling_rate"] == 32_000
    assert config["audio_encoder"]["chunk_length_s"] is None
    assert config["audio_encoder"]["normalize"] is False
    # a projection between T5 and decoder widths must exist, as in the real checkpoints
    assert config["text_encoder"]["d_model"] != config["decoder"]["hidden_size"]

    generation = json.loads((model_dir / "generation_config.json").read_text())
    for key in ("decoder_start_token_id", "pad_token_id", "bos_token_id"):
        assert generation[key] == CODEBOOK_SIZE, key
    assert generation["do_sample"] is True
    assert generation["guidance_scale"] == 3.0
    assert generation["top_k"] == 250

    model = model_class.from_pretrained(model_dir)
    assert model.enc_to_dec_proj.in_features == config["text_encoder"]["d_model"]
    assert model.audio_encoder.config.frame_rate == 50
    assert model.audio_encoder.config.num_quantizers == K
    assert GenerationConfig.from_pretrained(model_dir).decoder_start_token_id == CODEBOOK_SIZE

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == config["text_encoder"]["vocab_size"]
    assert tokenizer(SHORT)["input_ids"][-1] == tokenizer.eos_token_id


def test_melody_checkpoint_has_chroma_settings(tiny_melody_dir: Path) -> None:
    config = json.loads((tiny_melody_dir / "config.json").read_text())
    assert config["num_chroma"] == 12
    assert config["chroma_length"] == 20
    model, _ = load_hf(tiny_melody_dir)
    assert model.audio_enc_to_dec_proj.in_features == 12


def test_encodec_uses_exactly_k_quantizers_at_50_hz(tiny_musicgen_dir: Path) -> None:
    model, _ = load_hf(tiny_musicgen_dir)
    bandwidth = model.audio_encoder.config.target_bandwidths[-1]
    assert model.audio_encoder.quantizer.get_num_quantizers_for_bandwidth(bandwidth) == K
    audio = torch.randn(1, 1, 6400, generator=torch.Generator().manual_seed(0))  # 0.2 s at 32 kHz
    with torch.no_grad():
        encoded = model.audio_encoder.encode(audio, bandwidth=bandwidth)
    assert encoded.audio_codes.shape == (1, 1, K, 10)
    # random codebooks: the frames do not all quantize to one code
    assert encoded.audio_codes.unique().numel() > 1


def test_same_seed_same_weights_other_seed_other_weights(tiny_musicgen_dir: Path, tmp_path: Path) -> None:
    reference = load_file(tiny_musicgen_dir / "model.safetensors")
    again = load_file(build_tiny_musicgen(tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(build_tiny_musicgen(tmp_path / "other", seed=1) / "model.safetensors")
    assert reference.keys() == again.keys() == other.keys()
    assert all(torch.equal(reference[name], again[name]) for name in reference)
    lm_head = "decoder.lm_heads.0.weight"
    assert not torch.equal(reference[lm_head], other[lm_head])
    # the decoder init is deliberately far from transformers' std of 0.02
    assert reference[lm_head].std() > 0.2


def test_oracle_shape_and_range(tiny_musicgen_dir: Path) -> None:
    tokens = hf_greedy_tokens(tiny_musicgen_dir, [LONG], frames=12)
    assert tokens.shape == (1, K, 12)
    assert tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < CODEBOOK_SIZE


def test_oracle_refuses_lengths_without_a_delay_pattern(tiny_musicgen_dir: Path) -> None:
    assert hf_greedy_tokens(tiny_musicgen_dir, [LONG], frames=K - 1).shape == (1, K, K - 1)
    with pytest.raises(ValueError, match="frames must be"):
        hf_greedy_tokens(tiny_musicgen_dir, [LONG], frames=K - 2)


def test_oracle_tokens_are_not_degenerate(tiny_musicgen_dir: Path) -> None:
    tokens = hf_greedy_tokens(tiny_musicgen_dir, [LONG, SHORT], frames=20)
    for row in range(2):
        for codebook in range(K):
            assert tokens[row, codebook].unique().numel() >= 2, (row, codebook)
    assert tokens.unique().numel() >= 8
    assert not torch.equal(tokens[0], tokens[1])
    # a third caption also lands elsewhere
    third = hf_greedy_tokens(tiny_musicgen_dir, [CAPTIONS[2]], frames=20)
    assert not torch.equal(third[0], tokens[0]) and not torch.equal(third[0], tokens[1])


def test_padded_batch_rows_equal_single_caption_runs(tiny_musicgen_dir: Path) -> None:
    """MusicGen masks padded text in cross-attention, so a row does not depend on its batch mates."""
    _, tokenizer = load_hf(tiny_musicgen_dir)
    lengths = tokenizer([LONG, SHORT], padding=True)["attention_mask"]
    assert sum(lengths[0]) > sum(lengths[1])  # the short caption really is padded

    batch = hf_greedy_tokens(tiny_musicgen_dir, [LONG, SHORT], frames=16)
    assert batch.shape == (2, K, 16)
    assert torch.equal(batch[0], hf_greedy_tokens(tiny_musicgen_dir, [LONG], frames=16)[0])
    assert torch.equal(batch[1], hf_greedy_tokens(tiny_musicgen_dir, [SHORT], frames=16)[0])


def test_guidance_scale_changes_tokens(tiny_musicgen_dir: Path) -> None:
    guided = hf_greedy_tokens(tiny_musicgen_dir, [LONG, SHORT], frames=16, guidance_scale=3.0)
    unguided = hf_greedy_tokens(tiny_musicgen_dir, [LONG, SHORT], frames=16, guidance_scale=1.0)
    assert (guided != unguided).float().mean() > 0.2


@pytest.mark.parametrize("fixture", ["tiny_musicgen_dir", "tiny_melody_dir"])
def test_eager_and_sdpa_give_the_same_tokens(request: pytest.FixtureRequest, fixture: str) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    features = chroma_pair() if fixture == "tiny_melody_dir" else None
    eager = hf_greedy_tokens(model_dir, [LONG, SHORT], frames=16, input_features=features)
    sdpa = hf_greedy_tokens(model_dir, [LONG, SHORT], frames=16, input_features=features, attn_implementation="sdpa")
    assert torch.equal(eager, sdpa)
    sdpa_model, _ = load_hf(model_dir, "sdpa")
    assert sdpa_model.decoder.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_unconditional_rows_get_zero_cross_attention(tiny_musicgen_dir: Path, attn_implementation: str) -> None:
    """CFG's null rows have every text key masked; both kernels must return exactly zero there.

    eager gives a fully masked query uniform weights (the mean of the values), torch's sdpa gives
    zeros; the values are zero because transformers multiplies the projected text states by the
    all-zero mask, so the two agree. A re-implementation has to produce the same zeros.
    """
    model, tokenizer = load_hf(tiny_musicgen_dir, attn_implementation)
    seen: list[torch.Tensor] = []
    hooks = [
        layer.encoder_attn.out_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
        for layer in model.decoder.model.decoder.layers
    ]
    try:
        inputs = tokenizer([LONG, SHORT], padding=True, return_tensors="pt")
        with torch.no_grad():
            model.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=6)
    finally:
        for hook in hooks:
            hook.remove()
    # one forward per new token (transformers 5.23 also runs one extra, discarded prefill forward)
    assert len(seen) >= 6 * len(model.decoder.model.decoder.layers)
    for attended in seen:  # [2B, 1, hidden]: conditional rows first, null rows second
        assert attended.shape[0] == 4
        assert torch.equal(attended[2:], torch.zeros_like(attended[2:]))
        assert attended[:2].abs().amax() > 0.1


def test_greedy_argmaxes_are_well_separated(tiny_musicgen_dir: Path, tiny_melody_dir: Path) -> None:
    """Exact-token comparisons need argmax gaps far above float noise (~1e-6) on the oracle prompts."""
    assert hf_greedy_margin(tiny_musicgen_dir, [LONG, SHORT], frames=20) > 1e-4
    assert hf_greedy_margin(tiny_melody_dir, [LONG, SHORT], frames=20, input_features=chroma_pair()) > 1e-4


def test_melody_oracle_follows_the_chromagram(tiny_melody_dir: Path) -> None:
    features = chroma_pair()
    tokens = hf_greedy_tokens(tiny_melody_dir, [LONG, SHORT], frames=16, input_features=features)
    assert tokens.shape == (2, K, 16)
    assert tokens.min() >= 0 and tokens.max() < CODEBOOK_SIZE
    assert tokens.unique().numel() >= 8

    swapped = hf_greedy_tokens(tiny_melody_dir, [LONG, SHORT], frames=16, input_features=features.flip(0))
    assert not torch.equal(tokens, swapped)
    without = hf_greedy_tokens(tiny_melody_dir, [LONG, SHORT], frames=16)
    assert not torch.equal(tokens, without)
    unguided = hf_greedy_tokens(tiny_melody_dir, [LONG, SHORT], frames=16, input_features=features, guidance_scale=1.0)
    assert not torch.equal(tokens, unguided)


def test_melody_attends_to_padded_text_positions(tiny_melody_dir: Path) -> None:
    """transformers' MusicGen-Melody zeroes padded text states but does not mask them out of the prefix.

    So unlike plain MusicGen, the short caption's tokens change when it is batched with a longer one;
    the long caption (no padding) is unaffected. An exact re-implementation must keep the zero vectors.
    """
    features = chroma_pair()
    batch = hf_greedy_tokens(tiny_melody_dir, [LONG, SHORT], frames=16, input_features=features)
    long_alone = hf_greedy_tokens(tiny_melody_dir, [LONG], frames=16, input_features=features[:1])
    short_alone = hf_greedy_tokens(tiny_melody_dir, [SHORT], frames=16, input_features=features[1:])
    assert torch.equal(batch[0], long_alone[0])
    assert not torch.equal(batch[1], short_alone[0])


def test_oracle_rejects_chroma_for_text_only_model(tiny_musicgen_dir: Path) -> None:
    with pytest.raises(ValueError, match="MusicGen-Melody"):
        hf_greedy_tokens(tiny_musicgen_dir, [LONG, SHORT], frames=8, input_features=chroma_pair())


def test_oracle_matches_an_uncached_step_by_step_argmax_loop(tiny_musicgen_dir: Path) -> None:
    """The oracle is plain greedy CFG decoding with the delay pattern, nothing more.

    Rebuilt here from single transformers forward passes without a KV cache: the null rows are zero
    text states with an all-zero mask, guided logits are `uncond + (cond - uncond) * scale`, codebook k
    of frame t is predicted at step t + k, and not-yet-valid delay slots hold the pad/start id.
    """
    scale, frames = 3.0, 12
    model, tokenizer = load_hf(tiny_musicgen_dir)
    inputs = tokenizer([LONG, SHORT], padding=True, return_tensors="pt")
    batch, pad = 2, CODEBOOK_SIZE
    with torch.no_grad():
        text = model.text_encoder(**inputs).last_hidden_state
        text = torch.cat([text, torch.zeros_like(text)])
        mask = torch.cat([inputs["attention_mask"], torch.zeros_like(inputs["attention_mask"])])
        length = frames + K  # start token + frames + (K - 1) delay slots
        sequence = torch.full((batch, K, length), pad)
        for step in range(length - 1):
            decoder_ids = sequence[:, :, : step + 1].repeat(2, 1, 1).reshape(2 * batch * K, step + 1)
            logits = model(
                encoder_outputs=(text,), attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False
            ).logits[:, -1].reshape(2 * batch, K, -1)
            cond, uncond = logits.split(batch)
            best = (uncond + (cond - uncond) * scale).argmax(-1)  # [B, K]
            for k in range(K):
                if k <= step < frames + k:  # position step + 1 is a real token of codebook k
                    sequence[:, k, step + 1] = best[:, k]
    expected = torch.stack([sequence[:, k, k + 1 : k + 1 + frames] for k in range(K)], dim=1)
    assert torch.equal(hf_greedy_tokens(tiny_musicgen_dir, [LONG, SHORT], frames, guidance_scale=scale), expected)
