"""The bundled default model on this machine: end to end speed on 1 and on all threads, time to first
streamed audio, and the cold command line.

    python benchmarks/bench_default_model.py [--seconds 10] [--runs 3] [--no-cli]

1. In one process, after a warm-up: `generate()` of `--seconds` of audio (text encoding, LM steps,
   codec decode) with threads=1, with all the threads torch may use, and with the library default
   (threads=None: the decoding loop times one against all, see musicgen_lite/threads.py), in turn; the
   real-time factor is audio seconds per wall-clock second. The LM steps' share is timed apart.
2. The same with the decoding step recorded (the default, one_step.py) and run from Python
   (`lm.record_steps = False`), interleaved: how much the recording gains, as a ratio in one run.
3. `generate_stream()`: seconds from the call to the first chunk, and to the last.
4. A fresh `python generate.py --text ... --duration 10` (cold: imports, model load, generation,
   loudness, writing), and the same with `--stream --out -` to a pipe (time to the WAV header, to the
   first audio bytes, to the end).

Every figure is printed with the 1-minute load average at the time: on a shared machine they move.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import musicgen_lite  # noqa: E402  first: it sets OpenMP's wait policy, read once when torch loads
import torch  # noqa: E402
from musicgen_lite.api import get_model  # noqa: E402

PROMPT = "mozart sonata allegro"


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def timed_generate(seconds: float, threads: int | None, seed: int) -> tuple[float, float]:
    """(wall seconds of generate(), of which in the LM's sampling loop)."""
    model = get_model(None)
    step = model.lm.step
    spent = [0.0]

    def counting(*args, **kwargs):
        t = time.perf_counter()
        out = step(*args, **kwargs)
        spent[0] += time.perf_counter() - t
        return out

    model.lm.step = counting
    try:
        t = time.perf_counter()
        musicgen_lite.generate(PROMPT, duration=seconds, seed=seed, threads=threads)
        return time.perf_counter() - t, spent[0]
    finally:
        del model.lm.step


def in_process(seconds: float, runs: int) -> None:
    musicgen_lite.generate(PROMPT, duration=1.0, seed=0)  # loads the model, warms up
    everything = torch.get_num_threads()
    names = {1: "1 thread", everything: f"all threads ({everything})", None: "library default"}
    totals = {k: [] for k in names}
    for run in range(runs):
        order = list(names)
        for threads in order[run % 3 :] + order[: run % 3]:
            total, lm = timed_generate(seconds, threads, run)
            totals[threads].append(total)
            print(f"  run {run + 1}/{runs} {names[threads]:18s} {seconds / total:5.1f}x real time "
                  f"({total:.2f} s, LM steps {lm:.2f} s) ({load()})", flush=True)
    for threads, name in names.items():
        print(f"default model, {seconds:g} s, {name}: median {seconds / statistics.median(totals[threads]):.1f}x real time ({load()})")


def recorded_vs_python(seconds: float, runs: int) -> None:
    """The recorded decoding step (one_step.py) against the same step run from Python, interleaved in
    one process with the library defaults: a ratio that the machine's moving speed does not blur."""
    model = get_model(None)
    walls = {True: [], False: []}
    for run in range(2 * runs):
        for recorded in (True, False) if run % 2 else (False, True):
            model.lm.record_steps = recorded
            t = time.perf_counter()
            musicgen_lite.generate(PROMPT, duration=seconds, seed=run)
            walls[recorded].append(time.perf_counter() - t)
    model.lm.record_steps = True
    rec, py = statistics.median(walls[True]), statistics.median(walls[False])
    print(f"recorded step vs Python step, {seconds:g} s, library defaults: {seconds / rec:.1f}x vs {seconds / py:.1f}x "
          f"real time, {py / rec:.2f}x faster (medians of {2 * runs}, interleaved) ({load()})")


def first_chunk(seconds: float, runs: int) -> None:
    firsts, lasts = [], []
    for run in range(runs):
        t = time.perf_counter()
        stream = musicgen_lite.generate_stream(PROMPT, duration=seconds, seed=run)
        next(stream)
        firsts.append(time.perf_counter() - t)
        for _ in stream:
            pass
        lasts.append(time.perf_counter() - t)
    print(f"generate_stream, {seconds:g} s: first chunk after {statistics.median(firsts):.2f} s "
          f"(runs: {', '.join(f'{x:.2f}' for x in firsts)}), last after {statistics.median(lasts):.2f} s ({load()})")


def cold_cli(seconds: float, runs: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, str(ROOT / "generate.py"), "--text", PROMPT, "--duration", f"{seconds:g}"]
    with tempfile.TemporaryDirectory() as tmp:
        walls = []
        for run in range(runs):
            t = time.perf_counter()
            subprocess.run([*base, "--seed", str(run), "--out", str(Path(tmp) / "out.wav")], check=True, env=env, capture_output=True)
            walls.append(time.perf_counter() - t)
            print(f"  cold CLI run {run + 1}: {walls[-1]:.2f} s ({load()})", flush=True)
        print(f"cold `generate.py --duration {seconds:g}`: median {statistics.median(walls):.2f} s ({load()})")
    for run in range(runs):
        t = time.perf_counter()
        proc = subprocess.Popen([*base, "--seed", str(run), "--stream", "--out", "-"], stdout=subprocess.PIPE, env=env, stderr=subprocess.DEVNULL)
        header = proc.stdout.read(44)
        at_header = time.perf_counter() - t
        proc.stdout.read(640)
        at_audio = time.perf_counter() - t
        rest = len(proc.stdout.read())
        proc.wait()
        total = time.perf_counter() - t
        print(f"  cold `--stream --out -`: header after {at_header:.2f} s, first audio after {at_audio:.2f} s, "
              f"end after {total:.2f} s ({44 + 640 + rest} bytes, header {header[:4]!r}) ({load()})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-cli", action="store_true", help="skip the cold command-line runs")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; {load()}")
    in_process(args.seconds, args.runs)
    recorded_vs_python(args.seconds, args.runs)
    first_chunk(args.seconds, args.runs)
    if not args.no_cli:
        cold_cli(args.seconds, args.runs)


if __name__ == "__main__":
    main()
