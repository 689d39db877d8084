"""Loading models: the project's own directories and Hugging Face MusicGen / MusicGen-Melody checkpoints.

A transformers checkpoint (the format of facebook/musicgen-small and facebook/musicgen-melody)
is read with transformers itself; the T5 encoder and the EnCodec model are used as they are, and
the decoder's tensors are renamed (q/k/v and the K heads fused) into a `TransformerLM`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from codebooks.codec import EncodecCodec
from conditioning.chroma import ChromaConditioner
from conditioning.text import T5Conditioner

from .generation_config import read_generation_defaults
from .lm import PRECISIONS, LMConfig, TransformerLM
from .model import FORMAT, MusicGen

HF_MODEL_TYPES = ("musicgen", "musicgen_melody")
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"


def load_model(path_or_id: str | Path, precision: str = "fp32") -> MusicGen:
    """A `MusicGen` from a directory (ours or transformers'), or a hub id found in the local cache.
    `precision` ("fp32", "bf16", "fp16" or "int8") is the LM's, see `TransformerLM.set_precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model = _load(resolve_model_path(path_or_id))
    model.lm.set_precision(precision)
    return model


def _load(path: Path) -> MusicGen:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a model directory (no config.json)")
    try:
        cfg = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    if cfg.get("format") == FORMAT:
        return _checked(path, MusicGen.from_pretrained, path)
    if cfg.get("model_type") in HF_MODEL_TYPES:
        model = _checked(path, from_transformers, path)
        model.generation_defaults = read_generation_defaults(path)
        return model
    raise ValueError(f"{path} holds neither a musicgen_lite model nor a transformers MusicGen checkpoint")


def load_default_model(precision: str = "fp32") -> MusicGen:
    """The model bundled in the package (musicgen_lite/assets/default_model), see docs/MODEL_CARD.md."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            "no default model is bundled with this installation; pass model=PATH "
            "(a musicgen_lite model directory or a Hugging Face MusicGen checkpoint)"
        )
    model = MusicGen.from_pretrained(DEFAULT_MODEL_DIR)
    model.lm.set_precision(precision)
    return model


def resolve_model_path(path_or_id: str | Path) -> Path:
    """A local directory as is; otherwise an `owner/name` hub id looked up in the local HF cache only."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is not a model directory")
        return path
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {text} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, local_files_only=True))
    except Exception:  # any cache miss: offline lookups fail in several ways
        raise FileNotFoundError(
            f"model {text!r} is not a local directory and is not in the local Hugging Face cache "
            "(no download is attempted); download it once where the hub is reachable, or pass a directory"
        ) from None


def _checked(path: Path, loader, *args) -> MusicGen:
    """Turn the many ways an incomplete directory fails into one clear error."""
    try:
        return loader(*args)
    except (OSError, KeyError, RuntimeError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a complete model directory: {first}") from None


def from_transformers(path: str | Path) -> MusicGen:
    """Convert a `MusicgenForConditionalGeneration` / `MusicgenMelodyForConditionalGeneration` directory."""
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration, MusicgenMelodyForConditionalGeneration

    model_type = json.loads((Path(path) / "config.json").read_text())["model_type"]
    hf_class = MusicgenMelodyForConditionalGeneration if model_type == "musicgen_melody" else MusicgenForConditionalGeneration
    hf = hf_class.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    dec = hf.config.decoder
    if getattr(dec, "audio_channels", 1) != 1:
        raise ValueError("stereo MusicGen checkpoints are not supported")
    cfg = LMConfig(
        num_codebooks=dec.num_codebooks,
        card=dec.vocab_size,
        dim=dec.hidden_size,
        num_heads=dec.num_attention_heads,
        num_layers=dec.num_hidden_layers,
        ffn_dim=dec.ffn_dim,
        activation=dec.activation_function,
        conditioning="prefix" if model_type == "musicgen_melody" else "cross",
    )
    lm = TransformerLM(cfg)
    lm.load_state_dict(convert_decoder_state(hf.decoder.state_dict(), cfg))
    text_proj = getattr(hf, "enc_to_dec_proj", None) or nn.Identity()
    text = T5Conditioner(hf.text_encoder, tokenizer, dim=cfg.dim, proj=text_proj)
    chroma = None
    if model_type == "musicgen_melody":
        chroma = ChromaConditioner(dim=cfg.dim, chroma_length=hf.config.chroma_length, num_chroma=hf.config.num_chroma)
        audio_proj = getattr(hf, "audio_enc_to_dec_proj", None)
        if audio_proj is not None:
            chroma.proj.load_state_dict(audio_proj.state_dict())
    codec = EncodecCodec(hf.audio_encoder, num_codebooks=cfg.num_codebooks)
    return MusicGen(lm, codec, text, chroma).eval()


def convert_decoder_state(hf: dict[str, Tensor], cfg: LMConfig) -> dict[str, Tensor]:
    """transformers `Musicgen(Melody)ForCausalLM` state dict -> `TransformerLM` state dict."""
    src = "model.decoder."
    out = {f"embed.{k}.weight": hf[f"{src}embed_tokens.{k}.weight"] for k in range(cfg.num_codebooks)}
    out["norm.weight"], out["norm.bias"] = hf[f"{src}layer_norm.weight"], hf[f"{src}layer_norm.bias"]
    out["heads.weight"] = torch.cat([hf[f"lm_heads.{k}.weight"] for k in range(cfg.num_codebooks)])
    for i in range(cfg.num_layers):
        a, b = f"{src}layers.{i}.", f"layers.{i}."
        out[b + "self_attn.qkv.weight"] = torch.cat([hf[f"{a}self_attn.{p}_proj.weight"] for p in "qkv"])
        out[b + "self_attn.out.weight"] = hf[f"{a}self_attn.out_proj.weight"]
        for ours, theirs in (("norm_self", "self_attn_layer_norm"), ("norm_ffn", "final_layer_norm")):
            out[f"{b}{ours}.weight"], out[f"{b}{ours}.bias"] = hf[f"{a}{theirs}.weight"], hf[f"{a}{theirs}.bias"]
        out[b + "fc1.weight"], out[b + "fc2.weight"] = hf[f"{a}fc1.weight"], hf[f"{a}fc2.weight"]
        if cfg.conditioning == "cross":
            out[b + "cross_attn.q.weight"] = hf[f"{a}encoder_attn.q_proj.weight"]
            out[b + "cross_attn.kv.weight"] = torch.cat([hf[f"{a}encoder_attn.{p}_proj.weight"] for p in "kv"])
            out[b + "cross_attn.out.weight"] = hf[f"{a}encoder_attn.out_proj.weight"]
            out[b + "norm_cross.weight"] = hf[f"{a}encoder_attn_layer_norm.weight"]
            out[b + "norm_cross.bias"] = hf[f"{a}encoder_attn_layer_norm.bias"]
    return out
