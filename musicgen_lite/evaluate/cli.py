"""`python -m musicgen_lite.evaluate`: measure a model and print (and optionally write) the report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from codebooks.audio import replacing

from ..checkpoints import load_model
from ..cli_errors import ArgumentParser, UsageError, run_command
from .report import SECTIONS, format_table, needs_data, run_sections

def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m musicgen_lite.evaluate",
                description="Measure codec fidelity, LM cross-entropy, melody and text adherence of a model.")
    p.add_argument("section", choices=(*SECTIONS, "all"))
    p.add_argument("--model", required=True, help="model directory (ours or a transformers MusicGen checkpoint)")
    p.add_argument("--data", type=Path, help="data folder (audio + metadata.jsonl); needed by codec and lm")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"), help="held-out split (default test)")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    p.add_argument("--max-files", type=_positive(int), default=8, help="held-out files to score (default 8)")
    p.add_argument("--seconds", type=_positive(float), default=10.0,
                   help="seconds per excerpt and per generation (default 10)")
    p.add_argument("--prompts", type=_positive(int), default=4,
                   help="prompts per condition for melody and text (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hums and of generation (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        if needs_data(args.section) and args.data is None:  # before the (slow) model load
            raise UsageError(f"--data is needed for {' and '.join(needs_data(args.section))}")
        try:
            model = load_model(args.model)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
        report = {"model": str(args.model)} | run_sections(args.section, model, args.data, args.split, args.max_files,
                                                        args.seconds, args.prompts, args.seed)
        print(format_table(report))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with replacing(args.out) as tmp:
                tmp.write_text(json.dumps(report, indent=2) + "\n")
        return 0

    return run_command(parser.prog, body, "interrupted; nothing written")
