"""An evaluation report: which sections run on what, and the table printed from the report's numbers."""

from __future__ import annotations

from pathlib import Path

from ..audio_data import DataError, scan
from ..cli_errors import UsageError
from ..model import MusicGen
from .sections import (
    GOAL_BITRATE_KBPS,
    GOAL_MELODY_COSINE,
    GOAL_MELODY_GAIN,
    GOAL_MODE_ACCURACY,
    GOAL_TEMPO_RATIO,
    evaluate_codec,
    evaluate_lm,
    evaluate_melody,
    evaluate_text,
    split_excerpts,
)
from .words import evaluate_words

SECTIONS = ("codec", "lm", "melody", "text", "words")
DATA_SECTIONS = ("codec", "lm", "words")  # the sections that read --data


def run_sections(section: str, model: MusicGen, data: Path | None, split: str = "test", max_files: int = 8,
             seconds: float = 10.0, prompts: int = 4, seed: int = 0) -> dict:
    """Run one section ("codec", "lm", "melody", "text", "words") or "all" and return the report dict."""
    sections = SECTIONS if section == "all" else (section,)
    report: dict = {"sections": list(sections), "split": split, "seconds": seconds, "seed": seed}
    if needs_data(section):
        if data is None:
            raise UsageError(f"--data is needed for {' and '.join(needs_data(section))}")
        try:
            files = scan(data)
        except DataError as e:
            raise UsageError(str(e)) from None
        excerpts, skipped = split_excerpts(files, split, max_files, seconds, model.sample_rate)
        if not excerpts:
            present = sorted({f.split for f in files})
            raise UsageError(f"no non-silent {split} files in {data} (splits present: {', '.join(present)})")
        report |= {"data": str(data), "max_files": max_files, "skipped_silent": skipped}
        if "codec" in sections:
            report["codec"] = evaluate_codec(model, excerpts)
        if "lm" in sections:
            train = [] if split == "train" else split_excerpts(files, "train", max_files, seconds, model.sample_rate)[0]
            report["lm"] = evaluate_lm(model, excerpts, train)
        if "words" in sections:
            report["words"] = evaluate_words(model, excerpts)
    if "melody" in sections:
        report["melody"] = evaluate_melody(model, prompts, seconds, seed)
    if "text" in sections:
        report["text"] = evaluate_text(model, prompts, seconds, seed)
    return report


def needs_data(section: str) -> list[str]:
    """The sections among `section` ("all" is every one) that read the data folder."""
    return [s for s in DATA_SECTIONS if section in (s, "all")]


def _status(met: bool | None) -> str:
    return "" if met is None else ("ok" if met else "below goal")


def table_rows(report: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(section, metric, value, reference, goal, status) rows of the printed table."""
    rows = []
    if "codec" in report:
        c, opus = report["codec"], report["codec"]["opus"]

        def opus_value(key: str, spec: str) -> str:
            return f"opus {opus[key]:{spec}}" if opus else "opus: no ffmpeg"

        rows += [
            ("codec", "bitrate (kbps)", f"{c['bitrate_kbps']:.2f}", opus_value("kbps", ".2f"),
             f"<= {GOAL_BITRATE_KBPS}", _status(c["goal_met"]["bitrate"])),
            ("codec", "SI-SDR (dB)", f"{c['si_sdr_db']:.2f}", opus_value("si_sdr_db", ".2f"), "", ""),
            ("codec", "log-mel distance", f"{c['log_mel_distance']:.3f}", opus_value("log_mel_distance", ".3f"), "", ""),
        ]
    if "lm" in report:
        lm = report["lm"]
        for k, cb in enumerate(lm["codebooks"]):
            rows.append(("lm", f"codebook {k} CE nats (ppl)", f"{cb['ce_nats']:.3f} ({cb['perplexity']:.1f})",
                         f"unigram {cb['unigram_ce_nats']:.3f} ({cb['unigram_perplexity']:.1f})", "", ""))
        rows.append(("lm", "mean CE nats", f"{lm['mean_ce_nats']:.3f}", f"unigram {lm['mean_unigram_ce_nats']:.3f}",
                     "", ""))
    if "melody" in report:
        m = report["melody"]
        if "skipped" in m:
            rows.append(("melody", "chroma cosine", "skipped", m["skipped"], "", ""))
        else:
            rows += [
                ("melody", "chroma cosine with melody", f"{m['chroma_cosine_with_melody']:.3f}",
                 f"without {m['chroma_cosine_without_melody']:.3f}", f">= {GOAL_MELODY_COSINE}",
                 _status(m["goal_met"]["with_melody"])),
                ("melody", "gain over no melody", f"{m['gain']:+.3f}", "", f">= {GOAL_MELODY_GAIN}",
                 _status(m["goal_met"]["gain"])),
            ]
    if "text" in report:
        t = report["text"]
        ratio = "n/a" if t["tempo_ratio"] is None else f"{t['tempo_ratio']:.2f}"
        rows += [
            ("text", "major/minor mode accuracy", f"{100 * t['mode_accuracy']:.0f} %",
             f"key {100 * t['key_accuracy']:.0f} %", f">= {100 * GOAL_MODE_ACCURACY:.0f} %",
             _status(t["goal_met"]["mode_accuracy"])),
            ("text", "allegro/adagio onset-rate ratio", ratio,
             f"{t['allegro_onsets_per_second']:.2f} / {t['adagio_onsets_per_second']:.2f} per s",
             f">= {GOAL_TEMPO_RATIO}",
             _status(t["goal_met"]["tempo_ratio"])),
        ]
    if "words" in report:
        w = report["words"]
        for group, what in (("tonic", "tonic moved a tritone"), ("mode", "mode swapped"), ("tempo", "tempo moved"),
                            ("pitch", "own chroma as melody")):
            r = w[group]
            if r is None and group == "pitch":
                continue  # not a melody model
            value = "no caption names it" if r is None else f"{r['mean_dce_nats']:+.4f}"
            ref = "" if r is None else f"truth preferred {r['truth_preferred']} of {r['excerpts']}"
            rows.append(("words", f"dCE nats, first {w['seconds']:g} s: {what}", value, ref, "> 0", ""))
    return rows


def format_table(report: dict) -> str:
    header = ("section", "metric", "value", "reference", "goal", "status")
    rows = [header, *table_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)

