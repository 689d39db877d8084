"""Command-line front ends. Errors in what the user typed end with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .api import check_writable, generate


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors also exit 2, with one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _prompts(args) -> list[str]:
    if args.batch_file:
        path = Path(args.batch_file)
        if not path.is_file():
            raise UsageError(f"batch file {path} does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
        if not prompts:
            raise UsageError(f"batch file {path} holds no prompts")
        return prompts + ([args.text] if args.text else [])
    if args.text is None:
        raise UsageError("give --text or --batch-file")
    return [args.text]


def generate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="generate.py", description="Generate music from text (and optionally a hummed melody).")
    p.add_argument("--text", help="what the music should be, e.g. 'mozart sonata allegro'")
    p.add_argument("--batch-file", help="a text file with one prompt per line (outputs are numbered)")
    p.add_argument("--melody", help="a WAV/FLAC/OGG/MP3 of a melody to follow (melody models)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of audio (default 10)")
    p.add_argument("--out", default="out.wav", help="output WAV path (default out.wav)")
    p.add_argument("--model", help="model directory or cached hub id (default: the bundled model)")
    p.add_argument("--seed", type=int, help="random seed for reproducible output")
    p.add_argument("--top-k", type=int, default=250, help="sample among the k most likely codes (1 = greedy)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0 = off; wins over top-k)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance coefficient")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    try:
        prompts = _prompts(args)
        if Path(args.out).suffix.lower() != ".wav":
            raise UsageError(f"--out must end in .wav, got {args.out}")
        check_writable(args.out)
        result = generate(
            prompts,
            melody=args.melody,
            duration=args.duration,
            model=args.model,
            top_k=args.top_k,
            top_p=args.top_p,
            temperature=args.temperature,
            cfg_coef=args.cfg,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
        paths = result.save(args.out)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("generate.py: interrupted; nothing written", file=sys.stderr)
        return 130
    for path in paths:
        print(path)
    return 0
