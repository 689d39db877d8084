"""What the opt-in precisions cost in quality, on the bundled default model (a trained model, unlike the
random musicgen-small weights of bench_generate.py).

    python benchmarks/bench_precision.py [--prompts 4] [--seconds 8] [--precisions fp16 int8 bf16]

For each precision, against fp32 with the same prompts and seeds:

- greedy token agreement: the share of greedy tokens equal to fp32's (once one differs, the rest of
  that clip follows its own path, so this falls fast with length);
- log-mel distance of the decoded audio (sampled with the model's defaults, same seed), beside the
  distance between two fp32 clips of the same prompt with different seeds: a precision whose clips
  sit as far from fp32 as another seed does makes different music, not necessarily worse music;
- the adherence figures of `python -m musicgen_lite.evaluate` (melody: chroma cosine to a hum with and
  without it; text: parallel major/minor accuracy and the allegro/adagio onset-rate ratio), which say
  whether the music still follows its conditions;
- the LM's speed (seconds per audio second, one thread).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import musicgen_lite  # noqa: E402  first: it sets OpenMP's wait policy, read once when torch loads
import torch  # noqa: E402
from musicgen_lite.checkpoints import load_default_model  # noqa: E402
from musicgen_lite.evaluate import MELODY_PROMPTS, evaluate_melody, evaluate_text, log_mel_distance  # noqa: E402


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def figures(model, reference: dict | None, prompts: list[str], seconds: float) -> dict:
    """The figures of one precision; `reference` holds fp32's (None: this is fp32)."""
    greedy = musicgen_lite.generate(prompts, duration=seconds, model=model, top_k=1, seed=0)
    t = time.perf_counter()
    sampled = musicgen_lite.generate(prompts, duration=seconds, model=model, seed=list(range(len(prompts))), threads=1)
    speed = (time.perf_counter() - t) / (seconds * len(prompts))
    rate = model.sample_rate
    melody = evaluate_melody(model, len(prompts), seconds, seed=0)
    text = evaluate_text(model, len(prompts), seconds, seed=0)
    if reference is None:
        reference = {"greedy": greedy.tokens, "audio": sampled.audio}
    return {
        "greedy agreement": float((greedy.tokens == reference["greedy"]).mean()),
        "log-mel vs fp32": float(np.mean([log_mel_distance(a, b, rate) for a, b in zip(reference["audio"], sampled.audio)])),
        "melody cos": melody.get("chroma_cosine_with_melody", float("nan")),
        "melody gain": melody.get("gain", float("nan")),
        "mode acc": text["mode_accuracy"],
        "tempo ratio": text["tempo_ratio"] or float("nan"),
        "s per audio s": speed,
        "audio": sampled.audio,
        "greedy": greedy.tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--precisions", nargs="*", default=["fp16", "int8", "bf16"])
    args = ap.parse_args()
    prompts = [MELODY_PROMPTS[i % len(MELODY_PROMPTS)] for i in range(args.prompts)]
    print(f"default model, {args.prompts} prompts x {args.seconds:g} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {load()}", flush=True)
    fp32 = load_default_model("fp32")
    rows = {"fp32": figures(fp32, None, prompts, args.seconds)}
    reference = rows["fp32"]
    other_seed = musicgen_lite.generate(prompts, duration=args.seconds, model=fp32, seed=[1000 + i for i in range(args.prompts)])
    baseline = float(np.mean([log_mel_distance(a, b, fp32.sample_rate) for a, b in zip(reference["audio"], other_seed.audio)]))
    print(f"fp32 done ({load()}); fp32 vs fp32 with other seeds: log-mel distance {baseline:.3f}", flush=True)
    for precision in args.precisions:
        rows[precision] = figures(load_default_model(precision), reference, prompts, args.seconds)
        print(f"{precision} done ({load()})", flush=True)
    keys = ["greedy agreement", "log-mel vs fp32", "melody cos", "melody gain", "mode acc", "tempo ratio", "s per audio s"]
    print(f"\n{'':6s}" + "".join(f"{k:>18s}" for k in keys))
    for name, row in rows.items():
        print(f"{name:6s}" + "".join(f"{row[k]:18.3f}" for k in keys))
    print(f"(log-mel distance between fp32 clips of the same prompts with other seeds: {baseline:.3f}; {load()})")


if __name__ == "__main__":
    main()
