"""A dataset run: sources rendered in worker processes, a ledger for resuming, and the command line."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_module
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from ...cli_errors import ArgumentParser, UsageError, run_command
from .corpus import (
    GENRE_DEFAULT_BEAT_BPM,
    Source,
    _iter_scores,
    corpus_collections,
    corpus_sources,
    midi_info,
    midi_sources,
    score_info,
    score_to_midi,
)
from .performance import force_piano, performance_from_midi
from .augment import render_variants
from .render import Job, default_soundfont, export_midi, render_piece, write_text

PROG = "python -m musicgen_lite.data.scores"


class PieceBudget:
    """Shared count of pieces a run may still start (``--max-pieces``)."""

    def __init__(self, value: Any):
        self.value = value  # a multiprocessing Value, or None for no limit

    def exhausted(self) -> bool:
        return self.value is not None and self.value.value <= 0

    def take(self) -> bool:
        if self.value is None:
            return True
        with self.value.get_lock():
            if self.value.value <= 0:
                return False
            self.value.value -= 1
            return True


Emit = Callable[[tuple], None]


def render_source(source: Source, job: Job, done: frozenset[str], budget: PieceBudget, emit: Emit) -> None:
    """Render every piece of one source not in ``done``, reporting through ``emit``.

    Messages: ("rows", rows), ("fail", label, reason), and finally
    ("source", key, failures, complete).
    """
    import mido

    failures, complete = 0, not budget.exhausted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # music21 warns about every odd measure
        try:
            if not complete:
                pieces: Iterator[tuple[str, Any]] = iter(())  # out of budget: do not even parse
            elif source.key.startswith("midi/"):
                pieces = iter([(source.piece_id, None)])
            else:
                pieces = _iter_scores(source)
            for piece_id, score in pieces:
                if piece_id in done:
                    continue
                if not budget.take():
                    complete = False
                    break
                try:
                    if score is None:
                        perf = performance_from_midi(force_piano(mido.MidiFile(source.path)))
                        info = midi_info(source, perf)
                    else:
                        info = score_info(source, piece_id, score)
                        midi_file = score_to_midi(score, GENRE_DEFAULT_BEAT_BPM.get(info.genre))
                        if job.export_midi:
                            emit(("rows", export_midi(midi_file, info, job)))
                            continue
                        perf = performance_from_midi(midi_file)
                    emit(("rows", (render_variants if job.variants else render_piece)(perf, info, job)))
                except Exception as exc:  # one bad score must not stop the run
                    failures += 1
                    label = source.key if piece_id == source.piece_id else f"{source.key}#{piece_id}"
                    emit(("fail", label, _reason(exc)))
        except Exception as exc:
            failures += 1
            emit(("fail", source.key, _reason(exc)))
    emit(("source", source.key, failures, complete))


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


_WORKER: dict[str, Any] = {}


def _init_worker(messages: Any, budget_value: Any) -> None:
    _WORKER.update(queue=messages, budget=PieceBudget(budget_value))


def _worker_task(args: tuple[Source, Job, frozenset[str]]) -> None:
    source, job, done = args
    render_source(source, job, done, _WORKER["budget"], _WORKER["queue"].put)


class Ledger:
    """The run's bookkeeping in the main process: metadata, resume state, counts."""

    def __init__(self, out: Path):
        self.out = out
        self.metadata = out / "metadata.jsonl"
        self.sources_file = out / ".rendered_sources"
        self.rows: list[dict[str, Any]] = []
        self.pieces_by_source: dict[str, set[str]] = {}
        self.done_sources: set[str] = set()
        self.new_pieces = 0
        self.new_files = 0
        self.new_seconds = 0.0
        self.failures = 0
        self.skipped = 0
        self._load()

    def _load(self) -> None:
        """Keep rows whose wavs are all present; forget sources that lost files."""
        lines = self.metadata.read_text(encoding="utf-8").splitlines() if self.metadata.exists() else []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
                named = all(isinstance(row[k], str) for k in ("source", "piece"))
                present = named and (self.out / row["path"]).is_file()
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run
            rows.append((row, present))
        lost = {(row["source"], row["piece"]) for row, present in rows if not present}
        self.rows = [row for row, _ in rows if (row["source"], row["piece"]) not in lost]
        if len(self.rows) != len(lines):
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)
            write_text(self.metadata, text)
        for row in self.rows:
            self.pieces_by_source.setdefault(row["source"], set()).add(row["piece"])
        lines = self.sources_file.read_text(encoding="utf-8").splitlines() if self.sources_file.exists() else []
        finished = [line for line in lines if line]  # keys may hold spaces, never newlines
        self.done_sources = set(finished) - {source for source, _ in lost}
        if len(self.done_sources) != len(finished):  # forget lost sources for good, and duplicates
            text = "".join(f"{key}\n" for key in sorted(self.done_sources))
            write_text(self.sources_file, text)

    def done_pieces(self, source: str) -> frozenset[str]:
        return frozenset(self.pieces_by_source.get(source, ()))

    def handle(self, message: tuple) -> None:
        """Record one message from ``render_source``."""
        kind = message[0]
        if kind == "rows":
            rows = message[1]
            with open(self.metadata, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self.rows += rows
            self.new_pieces += 1
            self.new_files += len(rows)
            seconds = sum(r["seconds"] for r in rows)
            self.new_seconds += seconds
            print(f"rendered {rows[0]['piece']} ({len(rows)} file(s), {seconds / 60:.1f} min): {rows[0]['text']}",
                  flush=True)
        elif kind == "fail":
            self.failures += 1
            print(f"warning: skipped {message[1]}: {message[2]}", file=sys.stderr, flush=True)
        elif kind == "source":
            _, key, failures, complete = message
            if complete and not failures:
                with open(self.sources_file, "a", encoding="utf-8") as fh:
                    fh.write(key + "\n")
                self.done_sources.add(key)

    def summary(self) -> str:
        pieces = len({(r["source"], r["piece"]) for r in self.rows})
        hours = sum(r["seconds"] for r in self.rows) / 3600
        return (
            f"{self.new_pieces} pieces rendered ({self.new_files} files, {self.new_seconds / 3600:.2f} h), "
            f"{self.skipped} sources already done, {self.failures} failures; "
            f"{self.out} holds {pieces} pieces, {hours:.2f} h"
        )


def build(sources: list[Source], job: Job, workers: int = 1, max_pieces: int | None = None) -> Ledger:
    """Render ``sources`` into ``job.out``, skipping what is already there."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out)
    todo = [s for s in sources if s.key not in ledger.done_sources]
    ledger.skipped = len(sources) - len(todo)
    tasks = [(s, job, ledger.done_pieces(s.key)) for s in todo]
    if workers <= 1:
        budget = PieceBudget(mp.Value("i", max_pieces) if max_pieces is not None else None)
        for source, _, done in tasks:
            render_source(source, job, done, budget, ledger.handle)
        return ledger
    ctx = mp.get_context("spawn")  # workers start clean, whatever threads this process holds
    messages = ctx.Queue()
    budget_value = ctx.Value("i", max_pieces) if max_pieces is not None else None
    with ctx.Pool(workers, initializer=_init_worker, initargs=(messages, budget_value)) as pool:
        result = pool.map_async(_worker_task, tasks, chunksize=1)
        finished = 0
        while finished < len(tasks):
            try:
                message = messages.get(timeout=1.0)
            except queue_module.Empty:
                if result.ready():
                    result.get()  # re-raise a worker crash
                    break
                continue
            ledger.handle(message)
            finished += message[0] == "source"
    return ledger


# --------------------------------------------------------------------------
# Command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog=PROG,
        description="Render music21's corpus (or a MIDI folder) to captioned 32 kHz piano audio.",
    )
    parser.add_argument("--out", required=True, type=Path, help="dataset folder (created; re-runs resume)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--composers", nargs="+", metavar="NAME",
                        help="corpus folders to render, e.g. mozart haydn beethoven bach, or folk/early "
                             "(default: the whole corpus)")
    source.add_argument("--midi", type=Path, metavar="DIR", help="render the .mid/.midi files under DIR instead")
    parser.add_argument("--soundfont", type=Path, help="SF2/SF3 file (default: an installed General MIDI font)")
    parser.add_argument("--seed", type=int, default=0, help="humanisation seed (default 0)")
    parser.add_argument("--max-pieces", type=int, metavar="N", help="stop after N new pieces (rendered or failed)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--variants", type=int, default=0, metavar="N",
                        help="cut pieces into excerpts and render each N times, transposed and tempo-scaled, with "
                             "a hummed melody track and captions of what was played (default 0: whole pieces)")
    parser.add_argument("--excerpt-seconds", type=float, default=12.0, help="rendered length of an excerpt (12)")
    parser.add_argument("--export-midi", action="store_true",
                        help="write the corpus as piano MIDI files with caption sidecars instead of audio: "
                             "render them later, on any machine, with --midi (no music21 needed there)")
    return parser.parse_args(argv)


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"missing packages {', '.join(missing)}: pip install music21 mido && "
                       "pip install --no-deps tinysoundfont")


def run(argv: list[str] | None = None) -> str:
    """Run the command line; return the summary line. Raises UsageError."""
    args = _parse_args(argv)
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.variants < 0 or not args.excerpt_seconds > 0:
        raise UsageError("--variants must be >= 0 and --excerpt-seconds > 0")
    if args.export_midi and args.midi is not None:
        raise UsageError("--export-midi reads the music21 corpus; --midi files are MIDI already")
    if args.max_pieces is not None and args.max_pieces < 1:
        raise UsageError("--max-pieces must be at least 1")
    if args.midi is not None and not args.midi.is_dir():
        raise UsageError(f"--midi directory not found: {args.midi}")
    if args.soundfont is not None and not args.soundfont.is_file():
        raise UsageError(f"soundfont not found: {args.soundfont}")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out is not a directory: {args.out}")
    soundfont = str(args.soundfont) if args.soundfont else default_soundfont()
    if soundfont is None:
        raise UsageError("no SoundFont found: pass --soundfont, or apt-get install fluid-soundfont-gm")
    with open(soundfont, "rb") as fh:
        header = fh.read(12)
    if header[:4] != b"RIFF" or header[8:12] != b"sfbk":
        raise UsageError(f"not a SoundFont (.sf2/.sf3): {soundfont}")
    _require("mido", "tinysoundfont", "soundfile")
    if args.midi is not None:
        sources = midi_sources(args.midi)
        if not sources:
            raise UsageError(f"no .mid or .midi files under {args.midi}")
    else:
        _require("music21")
        if args.composers:
            unknown = sorted(set(args.composers) - set(corpus_collections()))
            if unknown:
                raise UsageError(f"unknown composers {', '.join(unknown)}; choose from {' '.join(corpus_collections())}")
        sources = corpus_sources(args.composers)
    job = Job(str(args.out), soundfont, args.seed, args.variants, args.excerpt_seconds, args.export_midi)
    return build(sources, job, args.workers, args.max_pieces).summary()


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        print(run(argv), flush=True)
        return 0

    return run_command(None, body, "interrupted; run the same command again to resume")
