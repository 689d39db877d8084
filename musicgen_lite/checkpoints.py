"""Loading models: the project's own directories and Hugging Face MusicGen / MusicGen-Melody checkpoints.

A transformers checkpoint (the format of facebook/musicgen-small and facebook/musicgen-melody,
sharded or not) is read straight from its safetensors files: the decoder's tensors go into a
`TransformerLM` built empty, q/k/v and the K heads fused as they are read (`decoder_sources` is the
table), and the T5 encoder and EnCodec become their own transformers classes, built from the
sub-configs. transformers' MusicGen modelling classes are never built, and no second copy of the
weights is ever held. Such a model batches as transformers does (`MusicGen.batch_like_transformers`),
which token-exactness with transformers needs; the project's own models keep the flag they were
saved with in config.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import torch
from torch import Tensor, nn

try:  # how transformers 5 configs refuse a mistyped field
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # older huggingface_hub: transformers 4 configs raise TypeError
    StrictDataclassError = TypeError

from codebooks.codec import EncodecCodec
from conditioning.chroma import ChromaConditioner
from conditioning.text import T5Conditioner

from .checksums import verify_manifest
from .generation_config import read_generation_defaults, read_json_object
from .lm import PRECISIONS, RENAMED_KEYS, LMConfig, TransformerLM
from .model import FORMAT, SAVED_PRECISIONS, MusicGen
from .quiet import transformers_silenced
from .threads import intra_op_threads
from .weight_files import SafetensorsFile, WeightFiles, release

HF_MODEL_TYPES = ("musicgen", "musicgen_melody")
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"


def load_model(path_or_id: str | Path, precision: str | None = None) -> MusicGen:
    """A `MusicGen` from a directory (ours or transformers'), or a hub id found in the local cache.
    `precision` ("fp32", "bf16", "fp16" or "int8") is the LM's, see `TransformerLM.set_precision`; None
    is the precision the model was saved in: fp16 for a model saved so (the bundled one), else fp32.
    Training and export need "fp32" (fp16 weights then become the same numbers in fp32)."""
    check_precision(precision)
    return with_precision(_load(resolve_model_path(path_or_id)), precision)


def check_precision(precision: str | None) -> None:
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")


def with_precision(model: MusicGen, precision: str | None) -> MusicGen:
    model.lm.set_precision(model.saved_precision if precision is None else precision)
    return model


def _load(path: Path) -> MusicGen:
    # one intra-op thread: loading is many small operations (building T5 and EnCodec, their weight-norm
    # set-up), and handing each to a second thread costs more than it saves; on 2 shared cores the
    # bundled model loaded in 2.2 s with 2 threads, 0.3 s with 1. Large copies stay memory-bound.
    # transformers' loading bars and notices stay off the caller's terminal while it builds T5 and EnCodec.
    with intra_op_threads(1), transformers_silenced():
        return _load_directory(path)


def _load_directory(path: Path) -> MusicGen:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a model directory (no config.json)")
    verify_manifest(path)
    cfg = read_json_object(config_file)
    check_files(path)
    if cfg.get("format") == FORMAT:
        check_config(cfg, config_file)
        return _checked(path, MusicGen.from_pretrained, path)
    if cfg.get("model_type") in HF_MODEL_TYPES:
        model = _checked(path, from_transformers, path)
        model.generation_defaults = read_generation_defaults(path)
        return model
    raise ValueError(f"{path} holds neither a musicgen_lite model nor a transformers MusicGen checkpoint")


def check_config(cfg: dict, where: Path) -> None:
    """The values of a musicgen_lite config.json, each of the type it must have: one line naming the
    first that is not, instead of a TypeError from deep inside a constructor."""
    lm = cfg.get("lm")
    if not isinstance(lm, dict):
        raise ValueError(f"{where}: no lm section")
    lm = {RENAMED_KEYS.get(k, k): v for k, v in lm.items()}
    kinds = {"int": (int, "a positive integer"), "float": ((int, float), "a number"), "str": (str, "a string")}
    for f in fields(LMConfig):
        kind, words = kinds[getattr(f.type, "__name__", f.type)]
        value = lm.get(f.name, f.default)
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 1):
            raise ValueError(f"{where}: lm.{f.name} must be {words}, got {value!r}")
    try:
        LMConfig.from_dict(lm)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    for name in ("max_duration", "extend_stride"):
        value = cfg.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{where}: {name} must be a positive number of seconds, got {value!r}")
    if cfg.get("precision", "fp32") not in SAVED_PRECISIONS:
        raise ValueError(f"{where}: precision must be one of {tuple(SAVED_PRECISIONS)}, got {cfg['precision']!r}")
    if not isinstance(cfg.get("batch_like_transformers", False), bool):
        raise ValueError(f"{where}: batch_like_transformers must be true or false, got {cfg['batch_like_transformers']!r}")
    if cfg.get("chroma") is not None:
        if not isinstance(cfg["chroma"], dict):
            raise ValueError(f"{where}: chroma must be an object or null")
        _ints(cfg["chroma"], tuple(cfg["chroma"]), where, section="chroma")


def check_files(path: Path) -> None:
    """The header of every safetensors file against the file's size, before anything is read."""
    for file in sorted(path.rglob("*.safetensors")):
        SafetensorsFile(file).close()


def load_default_model(precision: str | None = None) -> MusicGen:
    """The model bundled in the package (musicgen_lite/assets/default_model), see docs/MODEL_CARD.md;
    `precision` as for load_model (None: fp16, the precision it is stored in)."""
    check_precision(precision)
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            "no default model is bundled with this installation; pass model=PATH "
            "(a musicgen_lite model directory or a Hugging Face MusicGen checkpoint)"
        )
    return with_precision(_load(DEFAULT_MODEL_DIR), precision)


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
    """Turn the many ways an incomplete directory or a mistyped sub-config fails into one clear error."""
    try:
        return loader(*args)
    except (OSError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path} is not a complete model directory: {_first_line(e)}") from None
    except (TypeError, StrictDataclassError) as e:  # transformers' configs check their own fields' types
        raise ValueError(f"{path}: a config.json holds a value of the wrong type: {_one_line(e)}") from None


def from_transformers(path: str | Path) -> MusicGen:
    """A `MusicgenForConditionalGeneration` / `MusicgenMelodyForConditionalGeneration` directory as a `MusicGen`."""
    from transformers import (
        AutoTokenizer,
        EncodecConfig,
        EncodecModel,
        T5Config,
        T5EncoderModel,
    )

    path = Path(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    melody = config["model_type"] == "musicgen_melody"
    for section in ("decoder", "text_encoder", "audio_encoder"):
        if not isinstance(config.get(section), dict):
            raise ValueError(f"{config_file}: no {section} sub-config")
    lm_cfg = hf_decoder_config(config["decoder"], melody, config_file)
    with WeightFiles(path) as weights:
        with torch.device("meta"):
            lm = TransformerLM(lm_cfg)
        weights.fill(lm, decoder_sources(lm_cfg))
        encoder = _hf_module(T5EncoderModel, T5Config, config, "text_encoder", weights, config_file)
        text_proj = nn.Identity()
        if "enc_to_dec_proj.weight" in weights:
            text_proj = nn.Linear(*reversed(weights.shape("enc_to_dec_proj.weight")))
            text_proj.load_state_dict(weights.state_dict("enc_to_dec_proj."))
        chroma = None
        if melody:
            chroma = ChromaConditioner(dim=lm_cfg.dim, **_ints(config, ("chroma_length", "num_chroma"), config_file))
            if isinstance(chroma.proj, nn.Linear):
                chroma.proj.load_state_dict(weights.state_dict("audio_enc_to_dec_proj."))
        codec_model = _hf_module(EncodecModel, EncodecConfig, config, "audio_encoder", weights, config_file)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    text = T5Conditioner(encoder, tokenizer, dim=lm_cfg.dim, proj=text_proj)
    codec = EncodecCodec(codec_model, num_codebooks=lm_cfg.num_codebooks)
    return MusicGen(lm, codec, text, chroma, batch_like_transformers=True).eval()  # token-exact batching with transformers


def hf_decoder_config(dec: dict, melody: bool, where: Path) -> LMConfig:
    """A transformers `MusicgenDecoderConfig` (as a dict) -> `LMConfig`, its values checked."""
    sizes = ("num_codebooks", "vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "ffn_dim")
    values = _ints(dec, sizes, where, section="decoder")
    activation = dec.get("activation_function", "gelu")
    if not isinstance(activation, str):
        raise ValueError(f"{where}: decoder.activation_function must be a string, got {activation!r}")
    if dec.get("audio_channels", 1) != 1:
        raise ValueError("stereo MusicGen checkpoints are not supported")
    if dec.get("scale_embedding", False):
        raise ValueError(f"{where}: decoder.scale_embedding is not supported (MusicGen checkpoints do not use it)")
    try:
        return LMConfig(
            num_codebooks=values["num_codebooks"],
            codebook_size=values["vocab_size"],
            dim=values["hidden_size"],
            num_heads=values["num_attention_heads"],
            num_layers=values["num_hidden_layers"],
            ffn_dim=values["ffn_dim"],
            activation=activation,
            conditioning="prefix" if melody else "cross",
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def decoder_sources(cfg: LMConfig) -> dict[str, list[str]]:
    """`TransformerLM` tensor -> the transformers checkpoint tensors that, stacked along the first
    dimension, make it: q/k/v into one `qkv`, cross k/v into one `kv`, the K `lm_heads` into `heads`."""
    src = "decoder.model.decoder."
    out = {f"embed.{k}.weight": [f"{src}embed_tokens.{k}.weight"] for k in range(cfg.num_codebooks)}
    out["norm.weight"], out["norm.bias"] = [f"{src}layer_norm.weight"], [f"{src}layer_norm.bias"]
    out["heads.weight"] = [f"decoder.lm_heads.{k}.weight" for k in range(cfg.num_codebooks)]
    for i in range(cfg.num_layers):
        a, b = f"{src}layers.{i}.", f"layers.{i}."
        out[b + "self_attn.qkv.weight"] = [f"{a}self_attn.{p}_proj.weight" for p in "qkv"]
        out[b + "self_attn.out.weight"] = [f"{a}self_attn.out_proj.weight"]
        norms = [("norm_self", "self_attn_layer_norm"), ("norm_ffn", "final_layer_norm")]
        if cfg.conditioning == "cross":
            norms.append(("norm_cross", "encoder_attn_layer_norm"))
            out[b + "cross_attn.q.weight"] = [f"{a}encoder_attn.q_proj.weight"]
            out[b + "cross_attn.kv.weight"] = [f"{a}encoder_attn.{p}_proj.weight" for p in "kv"]
            out[b + "cross_attn.out.weight"] = [f"{a}encoder_attn.out_proj.weight"]
        for ours, theirs in norms:
            out[f"{b}{ours}.weight"], out[f"{b}{ours}.bias"] = [f"{a}{theirs}.weight"], [f"{a}{theirs}.bias"]
        out[b + "fc1.weight"], out[b + "fc2.weight"] = [f"{a}fc1.weight"], [f"{a}fc2.weight"]
    return out


def _ints(values: dict, names: tuple[str, ...], where: Path, section: str = "") -> dict[str, int]:
    """`values[name]` for each name, each a positive integer, else one line naming the field."""
    out = {}
    for name in names:
        field = f"{section}.{name}" if section else name
        if name not in values:
            raise ValueError(f"{where}: no {field}")
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {field} must be a positive integer, got {v!r}")
        out[name] = v
    return out


def _hf_module(model_class, config_class, config: dict, section: str, weights: WeightFiles, where: Path) -> nn.Module:
    """A transformers model (T5 encoder, EnCodec) from a sub-config and the checkpoint's `section.` tensors."""
    try:
        sub_config = config_class.from_dict(config[section])
    except (TypeError, ValueError, StrictDataclassError) as e:
        raise ValueError(f"{where}: the {section} sub-config is invalid: {_one_line(e)}") from None
    state = weights.state_dict(f"{section}.", copy=False)  # the model adopts views of the mapped file
    try:
        model = model_class.from_pretrained(None, config=sub_config, state_dict=state, dtype=torch.float32)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{where}: the {section} sub-config does not build a {model_class.__name__}: {_first_line(e)}") from None
    for tensor in state.values():  # what the set-up read (EnCodec's weight norms) is read again when used
        release(tensor)
    return model.eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def state_digest(tensors: dict[str, Tensor], header: bytes = b"") -> str:
    """sha256 of `header`, then every tensor's name and bytes in name order: equal digests, equal weights."""
    h = hashlib.sha256(header)
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
