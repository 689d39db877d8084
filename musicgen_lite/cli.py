"""The generate command line (generate.py): prompts and options in, audio files (and pictures) out.

Mistakes in what the user typed end with one line on stderr and exit code 2 (see cli_errors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codebooks.audio import read_audio
from conditioning.chroma import load_melody

from .api import check_request, generate
from .checkpoints import load_default_model, load_model
from .lm import PRECISIONS
from .audio_io import check_output
from .cli_errors import ArgumentParser, UsageError, run_command


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


def _plotter():
    """plot_generation, or a usage error naming the extra when matplotlib is not installed."""
    try:
        from .plots import plot_generation
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'musicgen_lite[plot]'") from None
    return plot_generation


def _plot(plot_generation, audio_path: Path, melody_path: str | None) -> Path:
    """Plot what was written (after loudness normalisation) to <audio stem>.png beside it."""
    data, rate = read_audio(audio_path)  # [C, N]
    melody = load_melody(melody_path, target_sample_rate=rate).numpy() if melody_path else None
    return plot_generation(
        audio_path.with_suffix(".png"), data, rate, melody=melody, melody_sample_rate=rate if melody_path else None, title=audio_path.name
    )


def generate_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="generate.py", description="Generate music from text (and optionally a hummed melody).")
    p.add_argument("--text", help="what the music should be, e.g. 'mozart sonata allegro'")
    p.add_argument("--batch-file", help="a text file with one prompt per line (outputs are numbered)")
    p.add_argument("--melody", help="a WAV/FLAC/OGG/MP3 of a melody to follow (melody models)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of audio (default 10)")
    p.add_argument("--out", default="out.wav", help="output path, .wav or .flac (default out.wav)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--loudness", type=float, default=-14.0, metavar="LUFS", help="normalise each output to this loudness, peaks at most -1 dBTP (default -14)")
    level.add_argument("--no-loudness", action="store_true", help="keep the model's own level")
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of 16-bit PCM")
    p.add_argument("--plot", action="store_true", help="also write <out stem>.png: waveform, spectrogram, chromagrams (needs the [plot] extra)")
    p.add_argument("--model", help="model directory or cached hub id (default: the bundled model)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="LM weights: fp32 (exact, default); "
                   "bf16, fp16 or int8 trade exactness for speed")
    p.add_argument("--seed", type=int, help="random seed for reproducible output")
    p.add_argument("--top-k", type=int, default=250, help="sample among the k most likely codes (1 = greedy)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0 = off; wins over top-k)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--cfg", dest="cfg_coef", type=float, default=3.0,
                   help="classifier-free guidance coefficient (default 3; at most 1 = no guidance)")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # stderr carries our own lines only: a path per output, or one error
    hf_logging.disable_progress_bar()
    def body() -> int:
        prompts = _prompts(args)
        loudness = None if args.no_loudness else args.loudness
        subtype = "FLOAT" if args.float else "PCM_16"
        check_output(args.out, subtype=subtype, loudness=loudness)
        plot = _plotter() if args.plot else None
        check_request(prompts, args.duration, args.top_k, args.top_p, args.temperature, args.cfg_coef, args.melody)
        model = load_model(args.model, args.precision) if args.model else load_default_model(args.precision)
        result = generate(
            prompts,
            melody=args.melody,
            duration=args.duration,
            model=model,
            top_k=args.top_k,
            top_p=args.top_p,
            temperature=args.temperature,
            cfg_coef=args.cfg_coef,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
        outputs = []
        for path in result.save(args.out, loudness=loudness, subtype=subtype):
            outputs += [path] if plot is None else [path, _plot(plot, path, args.melody)]
        for path in outputs:
            print(path)
        return 0

    return run_command("generate.py", body, "interrupted; nothing written", (UsageError, ValueError, FileNotFoundError))
