"""Generation speed on CPU: musicgen_lite against transformers' MusicGen on the same weights.

    python benchmarks/bench_generate.py [--seconds 3] [--runs 3] [--threads N] [--skip-default]
                                        [--precision bf16 fp16 int8] [--decode-threads N] [--no-memory]

1. Builds (once, cached in ~/.cache/musicgen_lite/bench_small) random weights in the
   facebook/musicgen-small architecture with transformers and saves them as transformers does:
   decoder d=1024, 24 layers, 16 heads, FFN 4096, 4 x 2048 codebooks; a t5-base-sized text encoder;
   EnCodec configured like facebook/encodec_32khz (hop 640, 4 x 2048 codes at 2.2 kbps).
2. Measures the memory bandwidth (sum of a 1 GB tensor, on 1 and on N threads) and derives the bound
   of a decoding step: the bytes it must read (every decoder weight it uses, the cross keys/values,
   the KV cache) over the larger of the two.
3. Checks that greedy decoding gives transformers' tokens (1 s, guidance 3).
4. Times sampling (top-k 250, guidance 3) of the same prompt with transformers'
   `MusicgenForConditionalGeneration.generate` and `musicgen_lite.generate` (plus each --precision),
   alternating runs in one process, as seconds per second of audio: the LM tokens (text encoding
   included) and end to end (plus the EnCodec decode). Medians.
5. Memory of each side: a fresh process loads the model and generates 1 s; RSS after each and its
   peaks (VmHWM, reset after loading where the kernel allows it), with the part that is clean pages
   of the memory-mapped checkpoint (which the kernel can drop).
6. The bundled default model end to end (real-time factor), and the codec alone (10 s encode, decode).

Runs on a shared machine are noisy: read the ratios of one run, and the load average printed with them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import musicgen_lite  # noqa: E402  first: it sets OpenMP's wait policy, read once when torch loads
import torch  # noqa: E402

CACHE_DIR = Path.home() / ".cache" / "musicgen_lite" / "bench_small"
CAPTIONS = [
    "80s pop track with bassy drums and synth",
    "90s rock song with loud guitars and heavy drums",
    "a calm piano melody in a minor key",
    "lofi hip hop beat with vinyl crackle",
    "orchestral film score with soaring strings and brass",
    "jazz trio with walking bass and brushed drums",
]
PROMPT = "a calm piano melody in a minor key"
TOP_K, GUIDANCE = 250, 3.0
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}  # per Linear weight


def text_and_codec_configs(pad_token_id: int, eos_token_id: int):
    """The T5 encoder (t5-base) and EnCodec (facebook/encodec_32khz) configs of every MusicGen size."""
    from transformers import EncodecConfig, T5Config

    text = T5Config(  # t5-base
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
        feed_forward_proj="relu", pad_token_id=pad_token_id, eos_token_id=eos_token_id,
    )
    audio = EncodecConfig(  # facebook/encodec_32khz
        sampling_rate=32000, audio_channels=1, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2],
        codebook_size=2048, hidden_size=128, num_filters=64, num_residual_layers=1, num_lstm_layers=2,
        norm_type="weight_norm", use_causal_conv=False, use_conv_shortcut=False, pad_mode="reflect",
        chunk_length_s=None, overlap=None, normalize=False,
    )
    return text, audio


def build_checkpoint(path: Path) -> Path:
    """Random weights in the musicgen-small layout, saved as transformers writes them; skipped if present."""
    if (path / "model.safetensors").is_file() and (path / "tokenizer_config.json").is_file():
        return path
    from transformers import (
        GenerationConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
    )

    from conditioning.text import train_sentencepiece_tokenizer

    print(f"building the benchmark checkpoint in {path} (once) ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tokenizer = train_sentencepiece_tokenizer(CAPTIONS, tmp, vocab_size=256)
    text, audio = text_and_codec_configs(tokenizer.pad_token_id, tokenizer.eos_token_id)
    decoder = MusicgenDecoderConfig(  # musicgen-small
        vocab_size=2048, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
        num_codebooks=4, max_position_embeddings=2048, pad_token_id=2048, bos_token_id=2048,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MusicgenForConditionalGeneration(MusicgenConfig(text_encoder=text, audio_encoder=audio, decoder=decoder))
    model.generation_config = GenerationConfig(
        decoder_start_token_id=2048, pad_token_id=2048, bos_token_id=2048, do_sample=True, top_k=TOP_K,
        guidance_scale=GUIDANCE, max_length=1500,
    )
    model.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


# -- machine ------------------------------------------------------------------------------------
def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def bandwidth(threads: int, gigabytes: float = 1.0, repeats: int = 7) -> float:
    """Read bandwidth in GB/s on `threads` threads: the median time to sum a tensor much larger than any cache."""
    x = torch.ones(int(gigabytes * 1e9) // 4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    torch.set_num_threads(before)
    return x.numel() * 4 / statistics.median(times) / 1e9


def step_bytes(lm, precision: str, steps: int, text_length: int) -> float:
    """Bytes one decoding step of 2 rows (guidance) reads, averaged over `steps` steps: the Linear
    weights it uses (not the cross-attention key/value projections, used once), norms, the 4 embedding
    rows of each row, the cross keys/values of the conditional row and the KV cache of both rows."""
    cfg = lm.cfg
    d, layers = cfg.dim, cfg.num_layers
    per_layer = 3 * d * d + d * d + 2 * d * cfg.ffn_dim  # self qkv + out, fc1, fc2
    if cfg.conditioning == "cross":
        per_layer += 2 * d * d  # cross q + out
    weights = (layers * per_layer + cfg.num_codebooks * cfg.codebook_size * d) * BYTES[precision]
    act = 2 if precision == "bf16" else 4
    small = (layers * 3 + 1) * 2 * d * act + 2 * cfg.num_codebooks * d * act  # norms, embedding rows
    cross = layers * 2 * text_length * d * act
    cache = layers * 2 * 2 * d * (steps / 2) * act  # keys and values of 2 rows, half full on average
    return weights + small + cross + cache


# -- the two implementations ----------------------------------------------------------------------
class Timed:
    """Wraps a decode function and remembers how long its last call took."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds = time.perf_counter() - t
        return out


def load_hf(path: Path):
    from transformers import AutoTokenizer, MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def hf_generate(hf, tokenizer, seconds: float, seed: int, greedy: bool = False):
    """(codes [1, K, frames], seconds in EnCodec decode) from transformers' generate."""
    frames = round(seconds * 50)
    inputs = tokenizer([PROMPT], padding=True, return_tensors="pt")
    decode = Timed(hf.audio_encoder.decode)
    codes = []

    def recording(audio_codes, *args, **kwargs):
        codes.append(audio_codes.clone())
        return decode(audio_codes, *args, **kwargs)

    hf.audio_encoder.decode = recording
    try:
        torch.manual_seed(seed)
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=TOP_K)
        hf.generate(**inputs, guidance_scale=GUIDANCE, max_new_tokens=frames + 3, **sampling)
    finally:
        del hf.audio_encoder.decode
    return codes[0][0], decode.seconds


def ours_generate(model, seconds: float, seed: int, greedy: bool = False):
    decode = Timed(model.codec.decode)
    model.codec.decode = decode
    try:
        result = musicgen_lite.generate(PROMPT, duration=seconds, model=model, top_k=1 if greedy else TOP_K,
                                        cfg_coef=GUIDANCE, seed=seed)
    finally:
        del model.codec.decode
    return torch.from_numpy(result.tokens), decode.seconds


def ours_threads(contenders: dict) -> str:
    """The thread counts musicgen_lite's decoding loop runs this checkpoint on (several: timed, the fastest)."""
    model = next(m for m in contenders.values() if m is not None)
    return " or ".join(map(str, model.lm.decoding_threads(independent_rows=not model.batch_like_transformers)))


# -- peak memory, in a fresh process ------------------------------------------------------------
def vm(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM, VmRSS, RssAnon, RssFile) in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def memory_worker(name: str, path: Path, seconds: float, decode_threads: int | None) -> None:
    if name == "transformers":
        hf, tokenizer = load_hf(path)
        run = lambda: hf_generate(hf, tokenizer, seconds, 0)  # noqa: E731
    else:
        import musicgen_lite

        model = musicgen_lite.load_model(path, precision=name.split()[-1])
        model.lm.decode_threads = decode_threads or model.lm.decode_threads
        run = lambda: ours_generate(model, seconds, 0)  # noqa: E731
    gc.collect()
    loading_peak, loaded, loaded_file = vm("VmHWM"), vm("VmRSS"), vm("RssFile")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    run()
    print(json.dumps({"loading_peak": loading_peak, "loaded": loaded, "loaded_file": loaded_file,
                      "generation_peak": vm("VmHWM"), "generated": vm("VmRSS"), "generated_file": vm("RssFile"), "reset": reset}))


def peak_memory(name: str, path: Path, threads: int, decode_threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--memory-worker", name, "--threads", str(threads), "--checkpoint", str(path)]
    if decode_threads is not None:
        cmd += ["--decode-threads", str(decode_threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise RuntimeError(f"memory worker {name!r} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main ---------------------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="audio seconds per timed run (default 3)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per contender, alternating (default 3)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help=f"torch intra-op threads (default {torch.get_num_threads()}, torch's default: the physical cores)")
    ap.add_argument("--precision", nargs="*", default=["bf16", "fp16", "int8"], choices=["bf16", "fp16", "int8"],
                    help="also time musicgen_lite at these opt-in precisions (default: all three; none: --precision)")
    ap.add_argument("--decode-threads", type=int, default=None,
                    help="musicgen_lite's TransformerLM.decode_threads (default: the library's, all of --threads)")
    ap.add_argument("--skip-default", action="store_true", help="do not time the bundled default model")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--checkpoint", type=Path, default=CACHE_DIR, help=f"benchmark checkpoint (default {CACHE_DIR})")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = build_checkpoint(args.checkpoint)
    if args.memory_worker:
        return memory_worker(args.memory_worker, path, 1.0, args.decode_threads)

    import transformers

    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__} "
          f"({args.threads} threads), transformers {transformers.__version__}; load average {load()}")
    bandwidths = {n: bandwidth(n) for n in sorted({1, args.threads})}
    bw = max(bandwidths.values())
    print("memory read bandwidth (sum of a 1 GB tensor, median of 7): "
          + ", ".join(f"{v:.1f} GB/s on {n} thread{'s' * (n > 1)}" for n, v in bandwidths.items()))

    hf, tokenizer = load_hf(path)
    contenders = {"transformers": None, "musicgen_lite fp32": musicgen_lite.load_model(path)}
    for p in args.precision:
        contenders[f"musicgen_lite {p}"] = musicgen_lite.load_model(path, precision=p)
    for model in contenders.values():
        if model is not None and args.decode_threads is not None:
            model.lm.decode_threads = args.decode_threads
    print(f"musicgen_lite decodes on {ours_threads(contenders)} thread(s) (TransformerLM.decoding_threads)")
    ours = contenders["musicgen_lite fp32"]
    text_length = tokenizer([PROMPT], return_tensors="pt")["input_ids"].shape[1]

    # greedy tokens: transformers vs ours (and the opt-in precisions vs fp32)
    expected, _ = hf_generate(hf, tokenizer, 1.0, 0, greedy=True)
    for name, model in contenders.items():
        if model is None:
            continue
        tokens, _ = ours_generate(model, 1.0, 0, greedy=True)
        same = (tokens == expected).float().mean().item()
        verdict = "exactly equal" if same == 1.0 else f"{100 * same:.1f}% equal"
        print(f"greedy tokens, 1 s at guidance {GUIDANCE}: {name} vs transformers: {verdict} ({tokens.numel()} tokens)")

    # timed sampling, alternating
    lm_times = {name: [] for name in contenders}
    total_times = {name: [] for name in contenders}
    names = list(contenders)
    for run in range(args.runs):
        for name in names[run % len(names):] + names[: run % len(names)]:  # rotate who goes first
            gc.collect()
            t = time.perf_counter()
            if contenders[name] is None:
                _, decode = hf_generate(hf, tokenizer, args.seconds, run)
            else:
                _, decode = ours_generate(contenders[name], args.seconds, run)
            total = time.perf_counter() - t
            lm_times[name].append((total - decode) / args.seconds)
            total_times[name].append(total / args.seconds)
            print(f"  run {run + 1}/{args.runs} {name:20s} LM {lm_times[name][-1]:6.2f} s/s, "
                  f"end to end {total_times[name][-1]:6.2f} s/s (load {load()})", flush=True)

    steps = round(args.seconds * 50) + 3
    ref_lm, ref_total = median(lm_times["transformers"]), median(total_times["transformers"])
    print(f"\n{args.seconds:g} s of audio, top-k {TOP_K}, guidance {GUIDANCE}, {args.runs} runs, medians; "
          f"{args.threads} threads (musicgen_lite decodes on {ours_threads(contenders)}); load average {load()}")
    print(f"{'':22s} {'LM s/s':>8s} {'speedup':>8s} {'e2e s/s':>8s} {'speedup':>8s} {'bound s/s':>10s} {'LM/bound':>9s}")
    for name in names:
        precision = "fp32" if name == "transformers" else name.split()[-1]
        lm = ours.lm if name == "transformers" else contenders[name].lm
        bound = step_bytes(lm, precision, steps, text_length) / (bw * 1e9) * steps / args.seconds
        lm_s, total_s = median(lm_times[name]), median(total_times[name])
        print(f"{name:22s} {lm_s:8.2f} {ref_lm / lm_s:7.2f}x {total_s:8.2f} {ref_total / total_s:7.2f}x "
              f"{bound:10.2f} {lm_s / bound:8.1f}x")
    print(f"(bound: bytes a step reads / {bw:.1f} GB/s; fp32 step: {step_bytes(ours.lm, 'fp32', steps, text_length) / 1e9:.2f} GB)")

    if not args.no_memory:
        print("\nmemory in GB (fresh process: load the model, generate 1 s); RSS (of which clean pages of the "
              "memory-mapped checkpoint)")
        print(f"{'':22s} {'loading peak':>13s} {'after loading':>16s} {'generating peak':>16s} {'after generating':>17s}")
        for name in names:
            m = peak_memory(name, path, args.threads, args.decode_threads)
            peak = f"{m['generation_peak']:.2f}" + ("" if m["reset"] else " (overall)")
            print(f"{name:22s} {m['loading_peak']:13.2f} {m['loaded']:7.2f} ({m['loaded_file']:.2f} file) {peak:>16s} "
                  f"{m['generated']:7.2f} ({m['generated_file']:.2f} file)")

    if args.skip_default:
        print("\ndefault model: skipped (--skip-default)")
    else:
        try:
            musicgen_lite.generate(PROMPT, duration=1.0, model=None, seed=0)  # loads it once
            times = []
            for run in range(args.runs):
                t = time.perf_counter()
                musicgen_lite.generate(PROMPT, duration=args.seconds, model=None, seed=run)
                times.append((time.perf_counter() - t) / args.seconds)
            print(f"\ndefault model, end to end: {median(times):.2f} s per audio second (real-time factor {1 / median(times):.2f})")
        except FileNotFoundError:
            print("\ndefault model: no default model bundled")

    wav = 0.1 * torch.randn(1, 1, 10 * ours.sample_rate, generator=torch.Generator().manual_seed(0))
    encode, decode = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        codes = ours.codec.encode(wav)
        encode.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours.codec.decode(codes)
        decode.append(time.perf_counter() - t)
    print(f"codec, 10 s of audio: encode {median(encode):.2f} s, decode {median(decode):.2f} s "
          f"(real-time factors {10 / median(encode):.1f} and {10 / median(decode):.1f})")


if __name__ == "__main__":
    main()
