"""Export to transformers: any `MusicGen` written as a MusicGen or MusicGen-Melody checkpoint.

    musicgen_lite.export(model, "out_dir")          # then, in any transformers installation:
    MusicgenMelodyForConditionalGeneration.from_pretrained("out_dir")   # prefix (melody-style) models
    MusicgenForConditionalGeneration.from_pretrained("out_dir")         # cross-attention models

The directory is what transformers' `save_pretrained` writes: config.json with the decoder, text
encoder and EnCodec sub-configs, generation_config.json, model.safetensors and the tokenizer. The
decoder's fused tensors are split back into transformers' names (`checkpoints.decoder_sources`, the
table loading reads with, run backwards); the T5 encoder and EnCodec are transformers' own modules
already and are written as they are. transformers' greedy decoding of one prompt then gives exactly
this model's tokens. A melody prior (melody_prior.py) has no place in transformers' format and is not
written: the exported model decodes a prompt without a melody as this one does without its prior.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .checkpoints import decoder_sources, load_model
from .generation_config import transformers_keys
from .model import MusicGen, move_into_place

FORMATS = ("transformers",)


def export(model: MusicGen | str | Path, directory: str | Path, format: str = "transformers") -> Path:
    """Write `model` (a `MusicGen`, or a path / hub id to load) to `directory` in `format`; returns the
    directory. It is written under a temporary name and renamed into place, replacing what was there."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(model, MusicGen):
        model = load_model(model, precision="fp32")
    cfg = model.lm.cfg
    if model.lm.precision != "fp32":
        raise ValueError(f"this model's LM is {model.lm.precision}; export a model loaded in fp32")
    if cfg.pattern != "delay":
        raise ValueError(f"transformers' MusicGen decodes the delay pattern only, this model uses {cfg.pattern!r}")
    if cfg.norm_eps != 1e-5:
        raise ValueError(f"transformers' MusicGen uses layer norms with eps 1e-5, this model {cfg.norm_eps}")
    if cfg.conditioning == "prefix" and model.chroma is None:
        raise ValueError("a prefix model without melody conditioning has no MusicGen-Melody equivalent")
    path = Path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    config, generation = transformers_configs(model)
    config.save_pretrained(tmp)
    generation.save_pretrained(tmp)
    save_file(transformers_tensors(model), tmp / "model.safetensors", metadata={"format": "pt"})
    model.text.tokenizer.save_pretrained(tmp)
    move_into_place(tmp, path)
    return path


def transformers_configs(model: MusicGen):
    """(MusicgenConfig or MusicgenMelodyConfig, GenerationConfig) describing `model`."""
    from transformers import GenerationConfig

    cfg = model.lm.cfg
    decoder = dict(
        vocab_size=cfg.codebook_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        ffn_dim=cfg.ffn_dim,
        num_codebooks=cfg.num_codebooks,
        activation_function=cfg.activation,
        dropout=cfg.dropout,
        audio_channels=1,
        scale_embedding=False,
        max_position_embeddings=2048,
        pad_token_id=cfg.special_token,
        bos_token_id=cfg.special_token,
        tie_word_embeddings=False,
    )
    # copies: a composite config takes its sub-configs over (and resets their attention implementation)
    parts = dict(text_encoder=copy.deepcopy(model.text.encoder.config), audio_encoder=copy.deepcopy(model.codec.model.config))
    if cfg.conditioning == "prefix":
        from transformers import MusicgenMelodyConfig, MusicgenMelodyDecoderConfig

        config = MusicgenMelodyConfig(
            **parts,
            decoder=MusicgenMelodyDecoderConfig(**decoder),
            num_chroma=model.chroma.num_chroma,
            chroma_length=model.chroma.chroma_length,
        )
    else:
        from transformers import MusicgenConfig, MusicgenDecoderConfig

        config = MusicgenConfig(**parts, decoder=MusicgenDecoderConfig(**decoder))
    generation = GenerationConfig(
        decoder_start_token_id=cfg.special_token,
        pad_token_id=cfg.special_token,
        bos_token_id=cfg.special_token,
        max_length=round(model.max_duration * model.frame_rate),
        **transformers_keys(model.generation_defaults),  # the model's own sampling defaults
    )
    return config, generation


def transformers_tensors(model: MusicGen) -> dict[str, Tensor]:
    """Every tensor of the checkpoint, by transformers' names."""
    out: dict[str, Tensor] = {}
    lm_state = model.lm.state_dict()
    for name, parts in decoder_sources(model.lm.cfg).items():
        for part, piece in zip(parts, torch.chunk(lm_state[name], len(parts))):
            out[part] = piece
    for prefix, module in (("text_encoder.", model.text.encoder), ("audio_encoder.", model.codec.model)):
        seen = set()
        for name, tensor in module.state_dict().items():
            if tensor.data_ptr() not in seen:  # tied weights (T5's shared embedding) are written once
                seen.add(tensor.data_ptr())
                out[prefix + name] = tensor
    for prefix, proj in (("enc_to_dec_proj.", model.text.proj), ("audio_enc_to_dec_proj.", getattr(model.chroma, "proj", None))):
        if isinstance(proj, nn.Linear):
            out.update({prefix + k: v for k, v in proj.state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}
