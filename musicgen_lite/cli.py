"""The generate command line (generate.py): prompts and options in, audio files (and pictures) out.

Mistakes in what the user typed end with one line on stderr and exit code 2 (see cli_errors).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from codebooks.audio import read_audio
from conditioning.chroma import load_melody
from conditioning.midi_melody import is_midi

from .api import check_request, generate, generate_stream, output_paths
from .checkpoints import load_default_model, load_model
from .lm import PRECISIONS
from .audio_io import LoudnessWarning, check_output
from .cli_errors import ArgumentParser, UsageError, run_command
from .quiet import silence_transformers
from .threads import check_threads
from .wav_stream import stream_file, stream_wav

DEFAULT_LOUDNESS = -14.0  # LUFS


def _prompts(args) -> list[str]:
    if args.batch_file:
        path = Path(args.batch_file)
        if path.is_dir():
            raise UsageError(f"batch file {path} is a folder, not a text file")
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
    """Plot what was written (after loudness normalisation) to <audio stem>.png beside it; a hummed
    melody's chromagram is drawn beside it (a MIDI melody has no recording to draw)."""
    data, rate = read_audio(audio_path)  # [C, N]
    if is_midi(melody_path):
        melody_path = None
    melody = load_melody(melody_path, target_sample_rate=rate).numpy() if melody_path else None
    return plot_generation(
        audio_path.with_suffix(".png"), data, rate, melody=melody, melody_sample_rate=rate if melody_path else None, title=audio_path.name
    )


def generate_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="generate.py", description="Generate music from text (and optionally a hummed melody).")
    p.add_argument("--text", help="what the music should be, e.g. 'mozart sonata allegro'")
    p.add_argument("--batch-file", help="a text file with one prompt per line (outputs are numbered)")
    p.add_argument("--melody", help="a WAV/FLAC/OGG/MP3 of a melody to follow, or a MIDI file (.mid) "
                   "whose top line is the tune (melody models)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of audio (default 10)")
    p.add_argument("--out", default="out.wav", help="output path, .wav or .flac (default out.wav); with --stream, - writes a WAV to stdout")
    p.add_argument("--stream", action="store_true", help="write the audio while it is generated (one prompt; "
                   "no loudness normalisation, which needs the whole clip; --out - streams a WAV to stdout)")
    p.add_argument("--format", choices=("wav", "flac"), help="output format (default: from the --out suffix; WAV for -)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--loudness", type=float, metavar="LUFS", help=f"normalise each output to this loudness, peaks at most -1 dBTP (default {DEFAULT_LOUDNESS:g}; not with --stream)")
    level.add_argument("--no-loudness", action="store_true", help="keep the model's own level")
    p.add_argument("--float", action="store_true", help="write 32-bit float WAV instead of 16-bit PCM")
    p.add_argument("--plot", action="store_true", help="also write <out stem>.png: waveform, spectrogram, chromagrams (needs the [plot] extra)")
    p.add_argument("--model", help="model directory or cached hub id (default: the bundled model)")
    p.add_argument("--precision", choices=PRECISIONS, help="LM weights (default: the model's own, fp16 for the bundled "
                   "model and fp32 for others); fp32 is exact, bf16, fp16 or int8 trade exactness for speed")
    p.add_argument("--seed", type=int, help="random seed for reproducible output")
    p.add_argument("--no-prior", action="store_true", help="without --melody, let the LM read the text alone instead of "
                   "playing the line the model's melody prior writes for it (models with a prior, such as the bundled one)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all that torch may use; a small model's decoding "
                   "loop times one thread against all and runs on the faster)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely codes (1 = greedy; default: the model's, MusicGen's 250)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (0 = off; wins over top-k; default: the model's, MusicGen's 0)")
    p.add_argument("--temperature", type=float, help="softmax temperature (> 0; default: the model's, MusicGen's 1)")
    p.add_argument("--cfg", dest="cfg_coef", type=float,
                   help="classifier-free guidance coefficient (default: the model's, MusicGen's 3; at most 1 = no guidance)")
    return p


def _check_stream(args) -> None:
    """--stream makes one output without loudness normalisation; refuse what it cannot do."""
    if args.stream:
        refused = [
            (args.plot, "--plot needs the whole clip; it cannot be used with --stream"),
            (args.batch_file, "--stream makes one output; --batch-file cannot be used with it"),
            (args.loudness is not None, "loudness normalisation needs the whole clip; --loudness cannot be used with --stream"),
            (args.out == "-" and args.format == "flac", "FLAC cannot be streamed to stdout; use --format wav, or a .flac path"),
        ]
        for bad, message in refused:
            if bad:
                raise UsageError(message)
    elif args.out == "-":
        raise UsageError("--out - (stdout) needs --stream")
    suffix = Path(args.out).suffix.lower().lstrip(".")
    if args.format and args.out != "-" and suffix != args.format:
        raise UsageError(f"--format {args.format} does not match the output path {args.out}")


def _stream(args, model) -> list[Path]:
    """Generate one prompt with --stream: a WAV to stdout (--out -) or a file written as it comes."""
    subtype = "FLOAT" if args.float else "PCM_16"
    stream = generate_stream(
        args.text, melody=args.melody, duration=args.duration, model=model, top_k=args.top_k, top_p=args.top_p,
        temperature=args.temperature, cfg_coef=args.cfg_coef, seed=args.seed, threads=args.threads,
    )
    if args.out != "-":
        return [stream_file(args.out, stream, stream.samples, stream.sample_rate, stream.channels, subtype)]
    sink = sys.stdout.buffer
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the WAV's bytes and nothing else
        stream_wav(sink, stream, stream.samples, stream.sample_rate, stream.channels, subtype)
    return []


def generate_main(argv: list[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    silence_transformers()  # stderr carries our own lines only: a path per output, or one error

    def body() -> int:
        _check_stream(args)
        prompts = _prompts(args)
        loudness = None if args.no_loudness or args.stream else DEFAULT_LOUDNESS if args.loudness is None else args.loudness
        subtype = "FLOAT" if args.float else "PCM_16"
        texts = check_request(prompts, args.duration, args.top_k, args.top_p, args.temperature, args.cfg_coef, args.melody, args.seed)[0]
        check_threads(args.threads)
        for path in [] if args.out == "-" else output_paths(args.out, len(texts)):  # every output is checked before any work
            check_output(path, subtype=subtype, loudness=loudness)
        plot = _plotter() if args.plot else None
        model = load_model(args.model, args.precision) if args.model else load_default_model(args.precision)
        if args.no_prior:
            model.melody_prior = None
        if args.stream:
            try:
                outputs = _stream(args, model)
            except BrokenPipeError:  # --out -: the reader of stdout went away
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exiting flushes nowhere
                print("generate.py: stdout was closed; stopped", file=sys.stderr)
                return 1
        else:
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
                threads=args.threads,
            )
            outputs = []
            with warnings.catch_warnings(record=True) as short:  # a target the limiter could not reach
                warnings.simplefilter("always", LoudnessWarning)
                written = result.save(args.out, loudness=loudness, subtype=subtype)
            for warning in short:
                print(f"generate.py: warning: {warning.message}", file=sys.stderr)
            for path in written:
                outputs += [path] if plot is None else [path, _plot(plot, path, args.melody)]
        for path in outputs:
            print(path)  # none for --out -: stdout holds the WAV
        return 0

    # OSError: also a full disk (FileNotFoundError: a missing file)
    return run_command("generate.py", body, "interrupted; nothing written", (UsageError, ValueError, OSError))
