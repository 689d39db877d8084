"""Memory of loading a large transformers checkpoint: random weights shaped like facebook/musicgen-medium.

    python benchmarks/bench_load.py [--seconds 1] [--transformers] [--keep]

1. Writes (once, cached in ~/.cache/musicgen_lite/bench_medium) a transformers-format checkpoint with
   random weights in the musicgen-medium architecture: decoder d=1536, 48 layers, 24 heads, FFN 6144,
   4 x 2048 codebooks (1.8 B parameters with the cross-attention); a t5-base-sized text encoder;
   EnCodec configured like facebook/encodec_32khz. The decoder's tensors are drawn and written a shard
   at a time (2 GB shards, with model.safetensors.index.json, as the hub's large checkpoints are), so
   building never holds the model either.
2. In a fresh process: `musicgen_lite.load_model` on it, then 1 s of sampling (top-k 250, guidance 3).
   Prints the checkpoint's size, the load time, the peak RSS while loading (VmHWM), the RSS after
   loading, the peak RSS while generating (VmHWM reset after loading) and the generation speed.
3. With --transformers, the same in a fresh process with transformers' MusicgenForConditionalGeneration.

Not part of the test suite: it writes 7 GB and needs about 8 GB of free memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_generate import text_and_codec_configs  # noqa: E402  (benchmarks/ is on the path when run as a script)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CACHE_DIR = Path.home() / ".cache" / "musicgen_lite" / "bench_medium"
SHARD_BYTES = 2 * 1024**3
CAPTIONS = ["80s pop track with bassy drums and synth", "a calm piano melody in a minor key", "lofi hip hop beat"]
PROMPT = "a calm piano melody in a minor key"


def configs():
    from transformers import MusicgenConfig, MusicgenDecoderConfig

    text, audio = text_and_codec_configs(pad_token_id=0, eos_token_id=1)
    decoder = MusicgenDecoderConfig(  # musicgen-medium
        vocab_size=2048, hidden_size=1536, num_hidden_layers=48, num_attention_heads=24, ffn_dim=6144,
        num_codebooks=4, max_position_embeddings=2048, pad_token_id=2048, bos_token_id=2048,
    )
    return MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder)


def build_checkpoint(path: Path) -> Path:
    """Random weights in the musicgen-medium layout, in transformers' sharded format; skipped if present."""
    if (path / "model.safetensors.index.json").is_file():
        return path
    from safetensors.torch import save_file
    from transformers import (
        EncodecModel,
        GenerationConfig,
        MusicgenForConditionalGeneration,
        T5EncoderModel,
    )

    from conditioning.text import train_sentencepiece_tokenizer

    print(f"building the benchmark checkpoint in {path} (once) ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    train_sentencepiece_tokenizer(CAPTIONS, tmp, vocab_size=64)
    config = configs()
    with torch.device("meta"):  # names and shapes only
        shapes = {k: v.shape for k, v in MusicgenForConditionalGeneration(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    small = {}  # the T5 encoder and EnCodec with their own initialisation
    for prefix, model in (("text_encoder.", T5EncoderModel(config.text_encoder)), ("audio_encoder.", EncodecModel(config.audio_encoder))):
        seen = set()
        for k, v in model.state_dict().items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                small[prefix + k] = v.contiguous()
    names = [k for k in shapes if k.startswith(("decoder.", "enc_to_dec_proj."))] + list(small)
    weight_map, shard, shard_bytes, count = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, count
        count += 1
        name = f"model-{count:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for k in names:
        if k in small:
            t = small[k]
        elif k.endswith("norm.weight"):
            t = torch.ones(shapes[k])
        elif k.endswith("bias"):
            t = torch.zeros(shapes[k])
        else:
            t = torch.randn(shapes[k], generator=generator) * 0.02
        shard[k] = t
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(tmp)
    GenerationConfig(decoder_start_token_id=2048, pad_token_id=2048, bos_token_id=2048, do_sample=True, top_k=250,
                     guidance_scale=3.0, max_length=1500).save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def vm(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024**2
    raise KeyError(field)


def worker(side: str, path: Path, seconds: float) -> None:
    """Load and generate in this (fresh) process; print one JSON line of figures."""
    import warnings

    warnings.simplefilter("ignore")
    import musicgen_lite

    if side == "transformers":
        from transformers import AutoTokenizer, MusicgenForConditionalGeneration
    baseline = vm("VmRSS")
    start = time.perf_counter()
    if side == "musicgen_lite":
        model = musicgen_lite.load_model(path)
    else:
        model = MusicgenForConditionalGeneration.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    load_seconds = time.perf_counter() - start
    loading_peak, loaded = vm("VmHWM"), vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    if side == "musicgen_lite":
        musicgen_lite.generate(PROMPT, duration=seconds, model=model, seed=0)
    else:
        torch.manual_seed(0)
        with torch.no_grad():
            model.generate(**tokenizer([PROMPT], return_tensors="pt"), do_sample=True, top_k=250, guidance_scale=3.0,
                           max_new_tokens=round(seconds * 50) + 3)
    generate_seconds = time.perf_counter() - start
    print(json.dumps({"baseline": baseline, "load_seconds": load_seconds, "loading_peak": loading_peak, "loaded": loaded,
                      "generation_peak": vm("VmHWM"), "generate_seconds": generate_seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="audio to generate after loading")
    ap.add_argument("--transformers", action="store_true", help="also measure transformers' MusicGen")
    ap.add_argument("--keep", action="store_true", help="keep the 7 GB checkpoint in the cache afterwards")
    ap.add_argument("--worker", nargs=2, metavar=("SIDE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, path = args.worker[0], Path(args.worker[1])
        build_checkpoint(path) if side == "build" else worker(side, path, args.seconds)
        return
    path = CACHE_DIR  # built in a process of its own, which hands its memory back when it ends
    subprocess.run([sys.executable, __file__, "--worker", "build", str(path)], check=True)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1024**3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; checkpoint {path}: {size:.2f} GiB of safetensors")
    print(f"{'':14s} {'load s':>7s} {'loading peak GiB':>16s} {'after loading GiB':>17s} {'generating peak GiB':>19s} "
          f"{'s per audio s':>14s}  load average")
    for side in ["musicgen_lite"] + (["transformers"] if args.transformers else []):
        before = "/".join(f"{x:.1f}" for x in os.getloadavg())
        out = subprocess.run([sys.executable, __file__, "--seconds", str(args.seconds), "--worker", side, str(path)],
                             capture_output=True, text=True, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        print(f"{side:14s} {m['load_seconds']:7.1f} {m['loading_peak']:16.2f} {m['loaded']:17.2f} {m['generation_peak']:19.2f} "
              f"{m['generate_seconds'] / args.seconds:14.1f}  {before} -> {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    if not args.keep:
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
