"""Tiny, randomly initialised transformers MusicGen checkpoints and a greedy-decoding oracle.

The library promises two things that can only be checked against transformers itself:
`musicgen_lite.load_model()` reads directories written by
`MusicgenForConditionalGeneration.save_pretrained` / `MusicgenMelodyForConditionalGeneration.save_pretrained`,
and its greedy decoding yields exactly the tokens of transformers' `generate(do_sample=False)`.
Real checkpoints are gigabytes and need the network, so the tests build miniature ones here:

* `build_tiny_musicgen` writes a directory with the same layout as facebook/musicgen-small or
  facebook/musicgen-melody (config.json with text_encoder / audio_encoder / decoder sub-configs,
  generation_config.json, model.safetensors, sentencepiece tokenizer files), but with a two-layer
  T5, a two-layer decoder and a tiny 32 kHz / 50 Hz EnCodec, so a build takes seconds on a CPU.
* `hf_greedy_tokens` runs transformers' own `generate` on such a directory and returns the
  de-delayed codebook tokens it hands to EnCodec, i.e. the reference our decoder must reproduce.

This is a plain helper module (imported by `conftest.py` and by tests), not a test file.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    EncodecConfig,
    GenerationConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    MusicgenMelodyConfig,
    MusicgenMelodyDecoderConfig,
    MusicgenMelodyForConditionalGeneration,
    PreTrainedModel,
    T5Config,
)

from conditioning.text import train_sentencepiece_tokenizer

#: Captions the tiny tokenizer is trained on. Tests may use any text: unknown characters map to <unk>.
CAPTIONS: tuple[str, ...] = (
    "80s pop track with bassy drums and synth",
    "90s rock song with loud guitars and heavy drums",
    "a calm piano melody in a minor key",
    "upbeat electronic dance music with a strong bass line",
    "lofi hip hop beat with vinyl crackle",
    "orchestral film score with soaring strings and brass",
    "jazz trio with walking bass and brushed drums",
    "acoustic folk song with guitar and whistling",
    "ambient drone with slow evolving pads",
    "funky disco groove with slap bass and horns",
)

#: EnCodec geometry of facebook/encodec_32khz: 32 kHz audio, hop 8*5*4*4 = 640 samples -> 50 frames/s.
SAMPLING_RATE = 32_000
UPSAMPLING_RATIOS = (8, 5, 4, 4)
NUM_CHROMA = 12

#: Std of the normal init of every decoder-side matrix (embeddings, attention, MLP, LM heads, projections).
#: With transformers' default (0.02) on this 32-wide model the text barely reaches the logits (two
#: different captions decode to identical tokens) and the smallest greedy argmax gap over 20 frames is
#: ~2e-4; at 0.3 captions lead to different tokens and that gap is ~1e-2.
DECODER_INIT_STD = 0.3
#: Std of the perturbation of norm gains (around 1) and biases (around 0), so that a norm
#: implementation that ignores its affine parameters is caught.
NORM_INIT_STD = 0.1

#: Default generation length stored in generation_config.json (musicgen-small stores 1500 = 30 s;
#: the tiny models keep it short because a caller that forgets max_new_tokens should not wait).
GENERATION_MAX_LENGTH = 256


def encodec_bandwidth_for(num_codebooks: int, codebook_size: int, frame_rate: int) -> float:
    """The target bandwidth (kbps) at which EnCodec uses exactly `num_codebooks` quantizers.

    transformers derives the number of residual quantizers from the bandwidth instead of storing it:
    `EncodecConfig.num_quantizers = int(1000 * target_bandwidths[-1] // (frame_rate * ceil(log2(size))))`,
    and `EncodecResidualVectorQuantizer.get_num_quantizers_for_bandwidth` floors
    `bw * 1000 / (log2(size) * frame_rate)`.
    Like facebook/encodec_32khz (4 quantizers * 11 bits * 50 Hz = 2.2 kbps) the bandwidth is the exact
    product; `_tiny_encodec_config` checks that float rounding did not floor it to one quantizer fewer.
    """
    return num_codebooks * math.log2(codebook_size) * frame_rate / 1000


def _tiny_encodec_config(num_codebooks: int, codebook_size: int) -> EncodecConfig:
    """A miniature of facebook/encodec_32khz: same rates and options, a few filters instead of 64."""
    frame_rate = math.ceil(SAMPLING_RATE / math.prod(UPSAMPLING_RATIOS))
    bandwidth = encodec_bandwidth_for(num_codebooks, codebook_size, frame_rate)
    config = EncodecConfig(
        sampling_rate=SAMPLING_RATE,
        audio_channels=1,
        upsampling_ratios=list(UPSAMPLING_RATIOS),
        target_bandwidths=[bandwidth],
        codebook_size=codebook_size,
        hidden_size=16,
        num_filters=4,
        num_residual_layers=1,
        num_lstm_layers=1,
        norm_type="weight_norm",
        use_causal_conv=False,
        use_conv_shortcut=False,
        pad_mode="reflect",
        chunk_length_s=None,
        overlap=None,
        normalize=False,
    )
    if config.frame_rate != 50 or config.hop_length != 640:
        raise AssertionError(
            f"tiny EnCodec runs at {config.frame_rate} Hz / hop {config.hop_length}, expected 50 Hz / 640"
        )
    if config.num_quantizers != num_codebooks:
        raise AssertionError(
            f"bandwidth {bandwidth} kbps gives {config.num_quantizers} quantizers, expected {num_codebooks}"
        )
    return config


def _tiny_t5_config(vocab_size: int, d_model: int, pad_token_id: int, eos_token_id: int) -> T5Config:
    """A two-layer T5 encoder. With the default widths (24 vs a 32-wide decoder) MusicGen gets an
    `enc_to_dec_proj`, as musicgen-small does (768 -> 1024)."""
    num_heads = 4
    if d_model % num_heads:
        raise ValueError(f"text_d_model must be divisible by {num_heads}, got {d_model}")
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="relu",
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        decoder_start_token_id=pad_token_id,
    )


def _randomise_weights(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Overwrite the decoder-side weights with a seeded, deliberately large random init.

    Covers the LM decoder, `enc_to_dec_proj` and (melody) `audio_enc_to_dec_proj` at `DECODER_INIT_STD`,
    norm gains/biases of decoder and T5 at `NORM_INIT_STD` around 1 / 0, and the EnCodec codebooks
    (zeros by default, which would make every code decode to the same vector). The remaining T5 and
    EnCodec weights keep transformers' default init, drawn from the seeded global RNG.
    """
    def normal_(tensor: torch.Tensor, mean: float, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * std + mean)

    with torch.no_grad():
        decoder_side = [model.decoder]
        for name in ("enc_to_dec_proj", "audio_enc_to_dec_proj"):
            if hasattr(model, name):
                decoder_side.append(getattr(model, name))
        for part in decoder_side:
            for module in part.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    normal_(module.weight, 0.0, DECODER_INIT_STD)
                    if getattr(module, "bias", None) is not None:
                        normal_(module.bias, 0.0, NORM_INIT_STD)
                elif isinstance(module, nn.LayerNorm):
                    normal_(module.weight, 1.0, NORM_INIT_STD)
                    normal_(module.bias, 0.0, NORM_INIT_STD)
        for module in model.text_encoder.modules():
            if type(module).__name__ == "T5LayerNorm":
                normal_(module.weight, 1.0, NORM_INIT_STD)
        for module in model.audio_encoder.modules():
            if type(module).__name__ == "EncodecEuclideanCodebook":
                normal_(module.embed, 0.0, 1.0)
                module.embed_avg.copy_(module.embed)
                module.cluster_size.fill_(1.0)


def build_tiny_musicgen(
    out_dir: str | Path,
    *,
    melody: bool = False,
    seed: int = 0,
    num_codebooks: int = 4,
    codebook_size: int = 32,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    text_d_model: int = 24,
    chroma_length: int = 20,
) -> Path:
    """Write a random tiny MusicGen (or MusicGen-Melody) checkpoint + tokenizer into `out_dir`; return it.

    The directory loads offline with `MusicgenForConditionalGeneration.from_pretrained(out_dir)`
    (`MusicgenMelodyForConditionalGeneration` when `melody`) and `AutoTokenizer.from_pretrained(out_dir)`.
    Token ids follow the real checkpoints: codes are 0..codebook_size-1 and the special
    start/pad/bos id is `codebook_size` (2048 in facebook/musicgen-*). The same arguments and seed give
    bit-identical weights. `chroma_length` only matters for `melody` (the real model uses 235).
    """
    if codebook_size & (codebook_size - 1):
        raise ValueError(f"codebook_size must be a power of two (EnCodec bandwidth maths), got {codebook_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_sentencepiece_tokenizer(list(CAPTIONS), out_dir, vocab_size=128)
    text_config = _tiny_t5_config(len(tokenizer), text_d_model, tokenizer.pad_token_id, tokenizer.eos_token_id)
    audio_config = _tiny_encodec_config(num_codebooks, codebook_size)
    decoder_kwargs = dict(
        vocab_size=codebook_size,
        max_position_embeddings=512,
        num_hidden_layers=num_layers,
        ffn_dim=64,
        num_attention_heads=num_heads,
        hidden_size=hidden_size,
        num_codebooks=num_codebooks,
        audio_channels=1,
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=codebook_size,
        bos_token_id=codebook_size,
        tie_word_embeddings=False,
    )
    if melody:
        config = MusicgenMelodyConfig(
            text_encoder=text_config,
            audio_encoder=audio_config,
            decoder=MusicgenMelodyDecoderConfig(**decoder_kwargs),
            num_chroma=NUM_CHROMA,
            chroma_length=chroma_length,
        )
        model_class = MusicgenMelodyForConditionalGeneration
    else:
        config = MusicgenConfig(
            text_encoder=text_config,
            audio_encoder=audio_config,
            decoder=MusicgenDecoderConfig(**decoder_kwargs),
        )
        model_class = MusicgenForConditionalGeneration

    # transformers' own init draws from the global RNG; fork it so building never disturbs the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    _randomise_weights(model, torch.Generator().manual_seed(seed))
    bandwidth = audio_config.target_bandwidths[-1]
    if model.audio_encoder.quantizer.get_num_quantizers_for_bandwidth(bandwidth) != num_codebooks:
        raise AssertionError(f"EnCodec would encode with a different number of quantizers than {num_codebooks}")
    model.eval()

    # Same fields as facebook/musicgen-small's generation_config.json (which has max_length 1500).
    model.generation_config = GenerationConfig(
        decoder_start_token_id=codebook_size,
        pad_token_id=codebook_size,
        bos_token_id=codebook_size,
        do_sample=True,
        top_k=250,
        guidance_scale=3.0,
        max_length=GENERATION_MAX_LENGTH,
    )
    model.save_pretrained(out_dir)
    return out_dir


def one_hot_chroma(bins: torch.Tensor) -> torch.Tensor:
    """A one-hot chromagram [B, T, 12] (float) from pitch-class indices [B, T] in 0..11.

    MusicGen-Melody's feature extractor keeps only the argmax bin of each chroma frame, so one-hot
    frames are exactly the `input_features` it produces from audio.
    """
    if bins.ndim != 2:
        raise ValueError(f"bins must be [B, T], got shape {tuple(bins.shape)}")
    return nn.functional.one_hot(bins.long(), NUM_CHROMA).float()


def hf_model_class(model_dir: str | Path) -> type[PreTrainedModel]:
    """The transformers class of a checkpoint directory, from its config.json `model_type`."""
    model_type = MusicgenConfig.get_config_dict(str(model_dir))[0]["model_type"]
    classes = {"musicgen": MusicgenForConditionalGeneration, "musicgen_melody": MusicgenMelodyForConditionalGeneration}
    if model_type not in classes:
        raise ValueError(f"{model_dir} holds a {model_type!r} model, not musicgen / musicgen_melody")
    return classes[model_type]


@functools.lru_cache(maxsize=8)
def _load_hf(model_dir: str, attn_implementation: str, weights_mtime_ns: int) -> tuple[PreTrainedModel, object]:
    """Load (model, tokenizer) once per directory / attention kernel; the mtime key invalidates rebuilt dirs."""
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}")
    # EnCodec has no attention and rejects "sdpa", so the kernel is chosen per sub-model.
    kernels = {"text_encoder": attn_implementation, "decoder": attn_implementation, "audio_encoder": "eager"}
    model = hf_model_class(model_dir).from_pretrained(model_dir, attn_implementation=kernels)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def load_hf(model_dir: str | Path, attn_implementation: str = "eager") -> tuple[PreTrainedModel, object]:
    """The transformers model and tokenizer of a checkpoint directory (cached; treat as read-only)."""
    model_dir = Path(model_dir).resolve()
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    return _load_hf(str(model_dir), attn_implementation, mtime)


def _hf_greedy_generate(
    model_dir: str | Path,
    texts: Sequence[str],
    frames: int,
    guidance_scale: float,
    input_features: torch.Tensor | None,
    attn_implementation: str,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """Run transformers' greedy generate; return (de-delayed codes [B, K, frames], guided scores [steps, B, K, V])."""
    model, tokenizer = load_hf(model_dir, attn_implementation)
    num_codebooks = model.decoder.config.num_codebooks
    if frames < num_codebooks - 1:
        raise ValueError(
            f"frames must be >= num_codebooks - 1 = {num_codebooks - 1}: transformers skips the delay pattern "
            f"for shorter generations, got {frames}"
        )
    if not texts or isinstance(texts, str):
        raise ValueError("texts must be a non-empty list of captions")
    is_melody = isinstance(model, MusicgenMelodyForConditionalGeneration)
    if input_features is not None and not is_melody:
        raise ValueError("input_features (a chromagram) only apply to a MusicGen-Melody checkpoint")

    inputs = tokenizer(list(texts), padding=True, return_tensors="pt")
    if input_features is not None:
        if input_features.ndim != 3 or input_features.shape[0] != len(texts) or input_features.shape[2] != NUM_CHROMA:
            raise ValueError(
                f"input_features must be [B={len(texts)}, T, {NUM_CHROMA}], got {tuple(input_features.shape)}"
            )
        inputs["input_features"] = input_features.to(model.dtype)

    captured: list[torch.Tensor] = []
    original_decode = model.audio_encoder.decode

    def recording_decode(audio_codes: torch.Tensor, *args, **kwargs):
        captured.append(audio_codes.detach().clone())
        return original_decode(audio_codes, *args, **kwargs)

    model.audio_encoder.decode = recording_decode
    try:
        with torch.no_grad():
            outputs = model.generate(
                **inputs,
                do_sample=False,
                guidance_scale=guidance_scale,
                max_new_tokens=frames + num_codebooks - 1,
                return_dict_in_generate=True,
                output_scores=True,
            )
    finally:
        del model.audio_encoder.decode  # drop the instance attribute; the class method shows again

    if len(captured) != 1:
        raise AssertionError(f"expected one audio_encoder.decode call, saw {len(captured)}")
    codes = captured[0]
    expected = (1, len(texts), num_codebooks, frames)
    if tuple(codes.shape) != expected:
        raise AssertionError(f"transformers decoded codes of shape {tuple(codes.shape)}, expected {expected}")
    # scores: one [B * K, V] tensor per step, already combined by classifier-free guidance.
    scores = torch.stack(outputs.scores).reshape(len(outputs.scores), len(texts), num_codebooks, -1)
    codes = codes[0].long()
    # Cross-check the delay relation: codebook k of frame t is the argmax of step t + k.
    for k in range(num_codebooks):
        if not torch.equal(scores[k : k + frames, :, k].argmax(-1).T, codes[:, k]):
            raise AssertionError(f"codebook {k}: decoded codes are not the step-(t+{k}) argmaxes")
    return codes, scores


def hf_greedy_tokens(
    model_dir: str | Path,
    texts: Sequence[str],
    frames: int,
    *,
    guidance_scale: float = 3.0,
    input_features: torch.Tensor | None = None,
    attn_implementation: str = "eager",
) -> torch.LongTensor:
    """Reference tokens: transformers' greedy `generate` on `model_dir`, de-delayed, as [B, K, frames].

    The captions are tokenized with the directory's tokenizer (`padding=True`), then
    `generate(**inputs, do_sample=False, guidance_scale=guidance_scale, max_new_tokens=frames + K - 1)`
    runs; for a melody checkpoint `input_features` [B, T, 12] (a chromagram) is passed through.
    The tokens are captured where transformers hands them to `audio_encoder.decode`, i.e. after it
    has undone the delay pattern and dropped the pad/start ids, so no re-implementation of the
    delay logic sits between transformers and the comparison.

    Length relation (read from `build_delay_pattern_mask`): the decoder starts from one start token,
    so generation stops at `max_length = 1 + max_new_tokens`, and codebook k holds real tokens at
    positions k+1 .. max_length-K+k, i.e. `max_length - K` frames. Hence `max_new_tokens = frames + K - 1`.
    transformers only applies the delay pattern when `max_length >= 2K - 1`, i.e. `frames >= K - 1`;
    shorter requests would come back un-delayed with the wrong length, so they are refused here.

    Attention kernel: "eager" by default, i.e. the softmax written out, the plain maths a re-implementation
    is compared against; "sdpa" is what transformers picks when nothing is asked. The two differ for a
    query whose keys are all masked (eager: uniform weights, the mean of the values; torch sdpa: zeros),
    which is what the unconditional CFG rows see in MusicGen's cross-attention. Their values are zero
    there (text states are multiplied by the all-zero mask and `v_proj` has no bias), so both kernels
    give the same tokens; tests/test_tiny_models.py checks that on both tiny checkpoints.
    """
    codes, _ = _hf_greedy_generate(model_dir, texts, frames, guidance_scale, input_features, attn_implementation)
    return codes


def hf_greedy_margin(
    model_dir: str | Path,
    texts: Sequence[str],
    frames: int,
    *,
    guidance_scale: float = 3.0,
    input_features: torch.Tensor | None = None,
    attn_implementation: str = "eager",
) -> float:
    """Smallest gap between the best and second-best guided logit over every token `hf_greedy_tokens` keeps.

    An exact-token comparison is only meaningful when no argmax is a near tie: a gap of 1e-6 can flip
    under harmless float reordering. Tests comparing against the oracle can assert this margin is far
    above float noise for their prompts. Steps/codebooks that the delay pattern overwrites with the pad
    id are excluded (codebook k is kept at steps k .. frames + k - 1).
    """
    _, scores = _hf_greedy_generate(model_dir, texts, frames, guidance_scale, input_features, attn_implementation)
    top2 = scores.topk(2, dim=-1).values
    gaps = top2[..., 0] - top2[..., 1]  # [steps, B, K]
    num_codebooks = gaps.shape[2]
    kept = [gaps[k : k + frames, :, k] for k in range(num_codebooks)]
    return float(torch.cat([g.reshape(-1) for g in kept]).min())


def build_tiny_default_like(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 32, chroma_length: int = 20,
                            melody: bool = True) -> Path:
    """Write a random tiny model built the way the bundled default model is (train.py lm --melody from
    scratch): the project's own format, a prefix-conditioned LM, a chroma conditioner, a T5 encoder and
    sentencepiece tokenizer made from the captions, and an EnCodec codec. Returns `out_dir`.
    `melody=False`: as train.py lm builds it without --melody, a cross-attention LM and no chroma."""
    import tempfile

    from codebooks.codec import EncodecCodec
    from conditioning.chroma import ChromaConditioner
    from conditioning.text import T5Conditioner
    from musicgen_lite.lm import LMConfig, TransformerLM
    from musicgen_lite.model import MusicGen

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tokenizer_dir:
        torch.manual_seed(seed)
        codec = EncodecCodec.from_config(_tiny_encodec_config(4, 32))
        lm = TransformerLM(LMConfig(num_codebooks=4, codebook_size=codec.codebook_size, dim=hidden_size, num_heads=4,
                                    num_layers=2, ffn_dim=64, conditioning="prefix" if melody else "cross"))
        text = T5Conditioner.from_captions(list(CAPTIONS), hidden_size, tokenizer_dir, vocab_size=128, d_model=24,
                                           num_layers=2, num_heads=4, d_kv=6, d_ff=48, seed=seed)
        chroma = ChromaConditioner(hidden_size, chroma_length=chroma_length) if melody else None
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # large weights, as in build_tiny_musicgen, so that the text reaches the tokens
            for part in (lm, text.proj) + ((chroma.proj,) if melody else ()):
                for p in part.parameters():
                    if p.ndim == 2:  # embeddings and linear maps; norms keep their gains of 1
                        p.copy_(torch.randn(p.shape, generator=generator) * DECODER_INIT_STD)
            for module in codec.modules():
                if type(module).__name__ == "EncodecEuclideanCodebook":
                    module.embed.copy_(torch.randn(module.embed.shape, generator=generator))
        MusicGen(lm, codec, text, chroma, max_duration=10.0, extend_stride=6.0).save_pretrained(out_dir)
    return Path(out_dir)
