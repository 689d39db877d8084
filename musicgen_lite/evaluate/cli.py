"""`python -m musicgen_lite.evaluate`: measure a model and print (and optionally write) the report.

    python -m musicgen_lite.evaluate {codec,lm,melody,text,words,all} ...   the sections (report.py)
    python -m musicgen_lite.evaluate pairs ...                         controlled pairs (pairs.py)
    python -m musicgen_lite.evaluate hiss ...                          where the hiss comes from (hiss.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from codebooks.audio import replacing

from ..checkpoints import load_model
from ..cli_errors import ArgumentParser, UsageError, load_codec, run_command
from ..model import MusicGen
from ..quiet import silence_transformers
from . import hiss, pairs
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
                description="Measure codec fidelity, LM cross-entropy, melody and text adherence of a model, and "
                            "whether its LM reads key, mode and tempo words (words: teacher-forced, no sampling).",
                epilog="`python -m musicgen_lite.evaluate pairs --help`: controlled prompt pairs, unheard hums "
                       "and a noise measure, beside real renderings; `... hiss --help`: how much of that noise "
                       "the codec and each codebook's sampled codes make.")
    p.add_argument("section", choices=(*SECTIONS, "all"))
    p.add_argument("--model", required=True, help="model directory (ours or a transformers MusicGen checkpoint)")
    p.add_argument("--data", type=Path, help="data folder (audio + metadata.jsonl); needed by codec, lm and words")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"), help="held-out split (default test)")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    p.add_argument("--max-files", type=_positive(int), default=8, help="held-out files to score, spread evenly over the split (default 8)")
    p.add_argument("--seconds", type=_positive(float), default=10.0,
                   help="seconds per excerpt and per generation (default 10)")
    p.add_argument("--prompts", type=_positive(int), default=4,
                   help="prompts per condition for melody and text (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hums and of generation (default 0)")
    p.add_argument("--codec", type=Path, help="codec section only: score this codec directory in place of the "
                                              "model's (e.g. one with grown codebooks, before an LM is moved onto it)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pairs"]:
        return pairs_main(argv[1:])
    if argv[:1] == ["hiss"]:
        return hiss_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        if needs_data(args.section) and args.data is None:  # before the (slow) model load
            raise UsageError(f"--data is needed for {' and '.join(needs_data(args.section))}")
        if args.codec is not None and args.section != "codec":
            raise UsageError("--codec replaces the model's codec for the codec section only")
        model = _load(args.model)
        if args.codec is not None:
            model.codec = load_codec(args.codec)
        report = {"model": str(args.model)} | ({"codec_dir": str(args.codec)} if args.codec else {}) | run_sections(
            args.section, model, args.data, args.split, args.max_files, args.seconds, args.prompts, args.seed)
        return show(report, format_table(report), args.out)

    return run_command(parser.prog, body, "interrupted; nothing written")


def _load(model: str) -> MusicGen:
    """load_model, its one-line errors raised as usage errors."""
    try:
        return load_model(model)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


def show(report: dict, table: str, out: Path | None) -> int:
    """Print a report's table and, given `out`, write the report there as JSON (its folder made if need
    be), written aside and renamed into place."""
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with replacing(out) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def pairs_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m musicgen_lite.evaluate pairs",
                       description="Controlled prompt pairs, unheard hums and a noise measure, beside real renderings.")
    p.add_argument("--model", help="model directory (ours or a transformers MusicGen checkpoint)")
    p.add_argument("--data", type=Path, help="data folder with metadata.jsonl (the held-out renderings)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"), help="held-out split (default test)")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    p.add_argument("--seconds", type=_positive(float), default=8.0, help="seconds per clip and excerpt (default 8)")
    p.add_argument("--tonics", type=_positive(int), default=8, help="tonics of the key pairs (default 8, at most 12)")
    p.add_argument("--tempo-pairs", type=_positive(int), default=6, help="allegro/adagio pairs (default 6)")
    p.add_argument("--hums", type=_positive(int), default=6, help="hummed tunes (default 6)")
    p.add_argument("--max-files", type=_positive(int), default=24, help="held-out renderings for the ceilings (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tunes and of generation (default 0)")
    p.add_argument("--compare", type=Path, nargs="+", metavar="REPORT", help="print these JSON reports side by side (markdown)")
    p.add_argument("--names", nargs="+", help="column names for --compare (default: the file stems)")
    return p


def pairs_main(argv: list[str]) -> int:
    """`python -m musicgen_lite.evaluate pairs`: run the controlled pairs, or --compare saved reports."""
    parser = pairs_parser()
    args = parser.parse_args(argv)

    def compare() -> int:
        names = args.names or [path.stem for path in args.compare]
        if len(names) != len(args.compare):
            raise UsageError(f"--names gives {len(names)} names for {len(args.compare)} reports")
        reports = []
        for path in args.compare:
            try:
                reports.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise UsageError(f"cannot read report {path}: {e}") from None
        print(pairs.markdown_table(list(zip(names, reports))))
        return 0

    def body() -> int:
        if args.compare:
            return compare()
        if args.model is None or args.data is None:
            raise UsageError("--model and --data are needed (or --compare REPORT ...)")
        if args.tonics > len(pairs.PROMPT_TONICS):
            raise UsageError(f"--tonics is at most {len(pairs.PROMPT_TONICS)}")
        if not (args.data / "metadata.jsonl").is_file():
            raise UsageError(f"{args.data} has no metadata.jsonl")
        silence_transformers()  # no loading bars between the table and its errors
        report = {"model": str(args.model)} | pairs.run_pairs(_load(args.model), args.data, args.split, args.seconds,
                                                             args.tonics, args.tempo_pairs, args.hums, args.max_files,
                                                             args.seed)
        return show(report, pairs.format_table(report), args.out)

    return run_command(parser.prog, body, "interrupted; nothing written")


def hiss_main(argv: list[str]) -> int:
    """`python -m musicgen_lite.evaluate hiss`: the texture of held-out renderings decoded from the codec's
    codes, from swapped fine codes and from codes the LM draws (hiss.py)."""
    parser = ArgumentParser(prog="python -m musicgen_lite.evaluate hiss",
                            description="Where a model's hiss comes from: the texture distance to held-out renderings "
                                        "of their codec reconstruction, with fine codes swapped, and with each "
                                        "codebook's codes drawn by the LM (teacher-forced).")
    parser.add_argument("--model", required=True, help="model directory (ours or a transformers MusicGen checkpoint)")
    parser.add_argument("--data", required=True, type=Path, help="data folder with metadata.jsonl (the held-out renderings)")
    parser.add_argument("--split", default="valid", choices=("train", "valid", "test"), help="held-out split (default valid)")
    parser.add_argument("--max-files", type=_positive(int), default=24, help="renderings, spread evenly over the split (default 24)")
    parser.add_argument("--seconds", type=_positive(float), default=8.0, help="seconds per excerpt (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the swaps and draws (default 0)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)

    def body() -> int:
        if not (args.data / "metadata.jsonl").is_file():
            raise UsageError(f"{args.data} has no metadata.jsonl")
        silence_transformers()
        report = {"model": str(args.model)} | hiss.run_hiss(_load(args.model), args.data, args.split, args.max_files,
                                                           args.seconds, args.seed)
        return show(report, hiss.format_table(report), args.out)

    return run_command(parser.prog, body, "interrupted; nothing written")
