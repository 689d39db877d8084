"""A model's own sampling defaults, kept in its directory as a Hugging Face `generation_config.json`.

Callers' sampling arguments default to None, "the model's default"; any argument given wins. A model
directory (ours or a transformers checkpoint) may say what those defaults are in the file transformers
writes beside its MusicGen checkpoints, read with transformers' meanings:

    do_sample false           greedy (our top_k 1, top_p 0)
    top_k                     top_k; 0 switches top-k off (sampling from the whole distribution)
    top_p                     top_p; 1.0 switches it off (our 0). Where both are on, ours lets top-p win
    temperature               temperature
    guidance_scale            cfg_coef

A key that is missing (or the whole file) falls back to MusicGen's defaults: top-k 250, top-p off,
temperature 1, guidance 3. Other keys (max_length, token ids, ...) are transformers' business.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from .sampling import SamplingParams

FILE = "generation_config.json"
MUSICGEN_DEFAULTS = SamplingParams(top_k=250, top_p=0.0, temperature=1.0, cfg_coef=3.0)


def sampling_overrides(top_k=None, top_p=None, temperature=None, cfg_coef=None) -> dict:
    """The sampling arguments a caller gave (None = the model's default), each checked: a one-line
    ValueError for a bad one, before any model is loaded."""
    given = {"top_k": top_k, "top_p": top_p, "temperature": temperature, "cfg_coef": cfg_coef}
    given = {k: v for k, v in given.items() if v is not None}
    replace(MUSICGEN_DEFAULTS, **given)  # SamplingParams checks every field
    return given


def read_generation_defaults(directory: str | Path) -> SamplingParams:
    """The sampling defaults in `directory`/generation_config.json, MusicGen's where it says nothing."""
    path = Path(directory) / FILE
    if not path.is_file():
        return MUSICGEN_DEFAULTS
    hf = read_json_object(path)
    try:
        return replace(MUSICGEN_DEFAULTS, **_ours(hf))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def read_json_object(path: Path) -> dict:
    """The JSON object in the file `path` (a model directory's config), or a one-line ValueError."""
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a JSON object")
    return obj


def _ours(hf: dict) -> dict:
    """transformers' generation keys -> the SamplingParams fields they set."""
    ours = {}
    top_k, top_p = hf.get("top_k"), hf.get("top_p")
    if top_p is not None:
        ours["top_p"] = 0.0 if top_p >= 1.0 else top_p
    if top_k == 0:  # transformers: no top-k filter
        ours["top_p"] = ours.get("top_p") or 1.0
    elif top_k is not None:
        ours["top_k"] = top_k
    for theirs, name in (("temperature", "temperature"), ("guidance_scale", "cfg_coef")):
        if hf.get(theirs) is not None:
            ours[name] = hf[theirs]
    if hf.get("do_sample") is False:
        ours.update(top_k=1, top_p=0.0)
    return ours


def transformers_keys(params: SamplingParams) -> dict:
    """`params` in the generation_config keys and meanings transformers reads."""
    p = asdict(params)
    return {
        "do_sample": True,
        "top_k": p["top_k"],
        "top_p": p["top_p"] if p["top_p"] > 0 else 1.0,
        "temperature": p["temperature"],
        "guidance_scale": p["cfg_coef"],
    }


def write_generation_defaults(params: SamplingParams, directory: str | Path) -> Path:
    """Write `params` as `directory`/generation_config.json, in the keys and meanings transformers reads."""
    path = Path(directory) / FILE
    path.write_text(json.dumps(transformers_keys(params), indent=2) + "\n")
    return path
