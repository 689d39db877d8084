"""Controlled-pair evaluation: does a model do what its words and its hummed tune say, and how readable is that?

    python -m musicgen_lite.evaluate pairs --model MODEL --data DATA [--split test] [--seconds 8]
        [--tonics 8] [--tempo-pairs 6] [--hums 6] [--max-files 24] [--seed 0] [--out pairs.json]
    python -m musicgen_lite.evaluate pairs --compare v1.json v2.json [--names v1 v2]   # markdown, side by side

Every clip lasts `--seconds` (8), comes from one prompt with one seed and is scored on its own:

key      `--tonics` tonics x {major, minor}: KEY_PROMPT with only the key words changed, one seed per
         tonic (the same for both modes). From the audio alone (`key_scores`: the mean chroma's Pearson
         correlation with the 24 rotated Krumhansl-Kessler profiles):
           parallel mode  the prompt's tonic fits the major profile better than the minor one, or the
                          reverse, as the prompt says (chance 50 %);
           tonic          the best of the 24 keys has the prompt's tonic (chance 1/12, 8 %).
tempo    `--tempo-pairs` pairs of TEMPO_PROMPT, "allegro, 144 bpm" vs "adagio, 66 bpm", each pair in its
         own key and seed: the ratio of the mean `onset_rate`s (allegro / adagio) and the pairs in
         which the allegro clip has more onsets.
melody   `--hums` hums of `voice.new_tune` tunes (in no training data and no test fixture),
         sung by `voice.sing` (a source-filter voice, not training's additive hum) at HUM_TEMPI
         and HUM_SHIFTS semitones, two settings per tune: `chroma_cosine` between the hum and the clip
         generated with it, and with no melody (same prompt and seed).
noise    How far the clips' texture is from real music: per clip, spectral flatness (dB) between onsets,
         silent fraction, onset rate and chroma entropy (`texture_stats`); the distance is the RMS over
         the four of (model mean - real mean) / real standard deviation (`texture_distance`) against
         the held-out renderings. Scored on the clips without a melody (key, tempo, melody's no-hum).

Ceilings: the same estimators on `--max-files` excerpts of `--seconds` from the middle of held-out
renderings (DATA/metadata.jsonl rows of `--split`, spread evenly over them by path): parallel mode and
tonic with the rendering's key as truth (its "key" field, else the key named in its caption); the
melody metric between the full mix and its own melody track ("melody" field; absent from data without
melody tracks); the noise distance of one half of the renderings (odd rows) from the other (even rows).

The JSON report holds "settings", "key", "tempo", "melody", "noise" and "ceilings"; `--compare` lays
several reports side by side with each goal and the ceilings (the model card's table). The command
line is `cli.pairs_main`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from ..api import generate
from ..audio_data import DataError, read_metadata
from ..cli_errors import UsageError
from ..data.scores.captions import tonic_pitch_class
from ..model import MusicGen
from .music import ONSET_HOP, ONSET_N_FFT, PITCH_CLASSES, chroma, chroma_cosine, key_scores, onset_times
from .sections import MIN_PEAK, load_excerpt, spread_picks
from .signal import SAMPLE_RATE, resample, stft_magnitude, to_mono
from .voice import new_tune, note_times, sing, transpose

KEY_PROMPT = "mozart sonata, allegro, {key}, 4/4, piano"
TEMPO_PROMPT = "mozart sonata, {tempo}, {bpm} bpm, {key} major, 4/4, piano"
TEMPO_WORDS = (("allegro", 144), ("adagio", 66))  # (word, quarter notes per minute): fast first
MELODY_PROMPT = "folk song, moderato, 4/4, piano"
PROMPT_TONICS = ("C", "G", "F", "D", "A", "Bb", "E", "Eb", "Ab", "B", "Db", "F#")
HUM_TEMPI = (84, 120, 100, 132, 72, 108)  # quarter notes per minute, hum i at HUM_TEMPI[i % 6]
HUM_SHIFTS = (0, 3, -2, 5, -4, 2)  # semitones, hum i transposed by HUM_SHIFTS[i % 6]

# noise measure
SILENCE_DB = -50.0  # a frame whose RMS is below this (dBFS) is silent
ONSET_GUARD = 0.05  # seconds either side of an onset that are not "between onsets"
TEXTURE_KEYS = ("flatness_db_between_onsets", "silent_fraction", "onset_rate", "chroma_entropy_bits")

# goals of issue 10's table
GOALS = {"mode_accuracy": 0.85, "tonic_accuracy": 0.5, "onset_ratio": 1.5, "faster_share": 5 / 6,
         "melody_with": 0.6, "melody_gain": 0.3}
KEY_NAME = re.compile(r"\b([A-G])([#b]?)\s+(major|minor)\b")


# -----------------------------------------------------------------------------------------------
# metrics


def parse_key(text: str) -> tuple[int, str] | None:
    """The first key named in a text, as (tonic pitch class, mode): "..., Bb major, 3/4" -> (10, "major")."""
    found = KEY_NAME.search(text or "")
    if found is None:
        return None
    letter, accidental, mode = found.groups()
    return tonic_pitch_class(letter + accidental), mode


def read_key(scores: np.ndarray | None, tonic: int) -> dict:
    """What the audio says about a key whose tonic is `tonic`, from `key_scores` [2, 12] (None: silence).

    "parallel_mode": "major" when the major profile at `tonic` correlates at least as well as the minor
    one, else "minor"; "best_key": the best of the 24 keys, e.g. "Eb major"; "best_tonic": its pitch class.
    """
    if scores is None:
        return {"parallel_mode": None, "best_key": None, "best_tonic": None}
    mode, best = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return {"parallel_mode": "major" if scores[0, tonic] >= scores[1, tonic] else "minor",
            "best_key": f"{PITCH_CLASSES[best]} {('major', 'minor')[mode]}", "best_tonic": int(best)}


def key_accuracy(rows: list[dict]) -> dict:
    """Parallel-mode and tonic accuracy of rows holding "tonic", "mode" (the truth) and `read_key`'s fields."""
    mode = [r["parallel_mode"] == r["mode"] for r in rows]
    tonic = [r["best_tonic"] == r["tonic"] for r in rows]
    return {"mode_accuracy": float(np.mean(mode)) if rows else None,
            "tonic_accuracy": float(np.mean(tonic)) if rows else None, "clips": len(rows)}


def texture_stats(wav: np.ndarray | torch.Tensor, sr: int) -> dict[str, float | None]:
    """Four numbers that tell music from noise and silence, on 32 ms frames every 8 ms at 32 kHz:

    flatness_db_between_onsets  mean over the non-silent frames more than 50 ms from every
                                `onset_times` onset of the spectral flatness in dB, 10 log10 of
                                exp(mean log P) / mean P of the power spectrum P (DC left out): about
                                -2.5 dB for white noise, far lower for tones (None: no frame qualifies)
    silent_fraction             share of frames whose RMS is below -50 dBFS
    onset_rate                  onsets per second (`onset_times`)
    chroma_entropy_bits         mean over non-silent chroma frames of the entropy of the chroma vector
                                normalised to sum 1: 0 for one pitch class, log2 12 = 3.58 for all alike
    """
    wav = resample(to_mono(wav), sr)
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(wav, (0, max(0, ONSET_N_FFT - wav.shape[0]))),
                                                      ONSET_N_FFT)[::ONSET_HOP]  # [T, n_fft]
    rms_db = 10 * np.log10(np.maximum((frames**2).mean(axis=1), 1e-20))  # [T]
    power = stft_magnitude(wav, ONSET_N_FFT, ONSET_HOP, center=False)[1:] ** 2 + 1e-20  # [F-1, T]
    flatness_db = 10 * (np.log(power).mean(axis=0) - np.log(power.mean(axis=0))) / np.log(10)  # [T]
    centres = (np.arange(power.shape[1]) * ONSET_HOP + ONSET_N_FFT // 2) / SAMPLE_RATE
    onsets = onset_times(wav, SAMPLE_RATE)
    far = np.all(np.abs(centres[:, None] - onsets[None]) > ONSET_GUARD, axis=1) if onsets.size else np.ones_like(centres, bool)
    keep = far & (rms_db >= SILENCE_DB)
    chroma_frames = chroma(wav, SAMPLE_RATE)  # [T', 12] max-normalised
    sums = chroma_frames.sum(axis=1)
    p = chroma_frames[sums > 0] / sums[sums > 0, None]
    entropy = -(p * np.log2(np.where(p > 0, p, 1.0))).sum(axis=1)
    return {"flatness_db_between_onsets": float(flatness_db[keep].mean()) if keep.any() else None,
            "silent_fraction": float((rms_db < SILENCE_DB).mean()),
            "onset_rate": len(onsets) / (wav.shape[0] / SAMPLE_RATE),
            "chroma_entropy_bits": float(entropy.mean()) if entropy.size else None}


def _means(stats: list[dict]) -> dict[str, float | None]:
    values = {k: [s[k] for s in stats if s[k] is not None] for k in TEXTURE_KEYS}
    return {k: float(np.mean(v)) if v else None for k, v in values.items()}


def texture_distance(clips: list[dict], reference: list[dict]) -> dict:
    """How far clips' `texture_stats` lie from a reference set's: per statistic k,

        z_k = (mean of the clips - mean of the reference) / standard deviation of the reference (ddof 1)

    and distance = sqrt(mean over k of z_k^2); a statistic missing on either side (or constant in
    the reference) is left out. 0 = the reference's averages; 1 = one reference clip's spread away.
    """
    ours, theirs = _means(clips), _means(reference)
    z = {}
    for k in TEXTURE_KEYS:
        values = [s[k] for s in reference if s[k] is not None]
        spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        if ours[k] is not None and theirs[k] is not None and spread > 0:
            z[k] = (ours[k] - theirs[k]) / spread
    distance = math.sqrt(np.mean([v**2 for v in z.values()])) if z else None
    return {"distance": distance, "z": z, "means": ours, "reference_means": theirs}


# -----------------------------------------------------------------------------------------------
# held-out renderings


def held_out(data: Path, split: str, count: int, seconds: float) -> list[dict]:
    """`count` non-silent renderings of `split` in metadata.jsonl, spread evenly over it by path
    (`spread_picks`), as dicts: "path", "text" (its caption), "audio" (mono float64 excerpt of `seconds`
    from the middle, at 32 kHz), "key" ((tonic pitch class, mode) from the "key" field, else the caption; None when
    neither names one) and "melody" (the same stretch of its melody track, or None)."""
    rows = [row for rel, row in sorted(read_metadata(data).items()) if row.get("split") == split]

    def rendering(row: dict) -> dict | None:
        path = data / row["path"]
        if not path.is_file():
            return None
        audio, _ = load_excerpt(path, seconds, SAMPLE_RATE)
        if np.abs(audio).max() < MIN_PEAK:
            return None
        key = parse_key(row["key"]) if isinstance(row.get("key"), str) and row["key"] else parse_key(row.get("text", ""))
        melody_path = data / row["melody"] if isinstance(row.get("melody"), str) else None
        melody = load_excerpt(melody_path, seconds, SAMPLE_RATE)[0] if melody_path and melody_path.is_file() else None
        return {"path": row["path"], "text": row.get("text") or "", "audio": audio, "key": key, "melody": melody}

    return spread_picks(rows, count, rendering)


def ceilings(renderings: list[dict]) -> dict:
    """The metrics' values on real renderings: key (metadata truth), melody (mix vs own melody track),
    noise (split halves)."""
    key_rows = []
    for r in renderings:
        if r["key"] is not None:
            tonic, mode = r["key"]
            key_rows.append({"path": r["path"], "tonic": tonic, "mode": mode,
                             **read_key(key_scores(r["audio"], SAMPLE_RATE), tonic)})
    melody = [chroma_cosine(r["audio"], r["melody"], SAMPLE_RATE) for r in renderings
              if r["melody"] is not None and np.abs(r["melody"]).max() >= MIN_PEAK]
    stats = [texture_stats(r["audio"], SAMPLE_RATE) for r in renderings]
    return {
        "renderings": len(renderings),
        "key": key_accuracy(key_rows) | {"rows": key_rows},
        "melody": {"chroma_cosine": float(np.mean(melody)) if melody else None, "excerpts": len(melody)},
        "noise": texture_distance(stats[1::2], stats[0::2]) if len(stats) >= 4 else {"distance": None},
        "texture": stats,
    }


# -----------------------------------------------------------------------------------------------
# generated clips


def _mono(audio: np.ndarray, sr: int) -> np.ndarray:
    return resample(to_mono(audio), sr)


def key_pairs(model: MusicGen, tonics: int, seconds: float, seed: int) -> dict:
    """KEY_PROMPT in `tonics` tonics x {major, minor}; tonic i uses seed + i for both modes."""
    names = [PROMPT_TONICS[i % len(PROMPT_TONICS)] for i in range(tonics)]
    cases = [(name, i, mode) for i, name in enumerate(names) for mode in ("major", "minor")]
    texts = [KEY_PROMPT.format(key=f"{name} {mode}") for name, _, mode in cases]
    out = generate(texts, duration=seconds, model=model, seed=[seed + i for _, i, _ in cases])
    rows = []
    for (name, _, mode), text, audio in zip(cases, texts, out.audio):
        tonic = parse_key(f"{name} {mode}")[0]
        wav = _mono(audio, out.sample_rate)
        rows.append({"text": text, "tonic": tonic, "mode": mode, **read_key(key_scores(wav, SAMPLE_RATE), tonic),
                     "texture": texture_stats(wav, SAMPLE_RATE)})
    return key_accuracy(rows) | {"rows": rows}


def tempo_pairs(model: MusicGen, pairs: int, seconds: float, seed: int) -> dict:
    """TEMPO_PROMPT with each of TEMPO_WORDS, `pairs` keys; pair i uses seed + i for both tempi."""
    cases = [(i, word, bpm) for i in range(pairs) for word, bpm in TEMPO_WORDS]
    texts = [TEMPO_PROMPT.format(tempo=word, bpm=bpm, key=PROMPT_TONICS[i % len(PROMPT_TONICS)]) for i, word, bpm in cases]
    out = generate(texts, duration=seconds, model=model, seed=[seed + i for i, _, _ in cases])
    rows = []
    for (i, word, bpm), text, audio in zip(cases, texts, out.audio):
        wav = _mono(audio, out.sample_rate)
        stats = texture_stats(wav, SAMPLE_RATE)
        rows.append({"pair": i, "text": text, "tempo": word, "bpm": bpm, "onsets_per_second": stats["onset_rate"],
                     "texture": stats})
    fast_word, slow_word = TEMPO_WORDS[0][0], TEMPO_WORDS[1][0]
    fast = [r["onsets_per_second"] for r in rows if r["tempo"] == fast_word]
    slow = [r["onsets_per_second"] for r in rows if r["tempo"] == slow_word]
    return {"onset_ratio": float(np.mean(fast) / np.mean(slow)) if np.mean(slow) > 0 else None,
            f"{fast_word}_onsets_per_second": float(np.mean(fast)), f"{slow_word}_onsets_per_second": float(np.mean(slow)),
            "faster_pairs": int(sum(f > s for f, s in zip(fast, slow))), "pairs": pairs, "rows": rows}


def hum(index: int, seed: int, seconds: float, sr: int = SAMPLE_RATE) -> tuple[dict, np.ndarray]:
    """Hum `index`: tune seed + index // 2 at HUM_TEMPI[index % 6] bpm, shifted HUM_SHIFTS[index % 6]
    semitones, sung for exactly `seconds` (cut, or padded with silence); its description and samples."""
    tune = transpose(new_tune(seed + index // 2), HUM_SHIFTS[index % len(HUM_SHIFTS)])
    bpm = HUM_TEMPI[index % len(HUM_TEMPI)]
    wav = sing(note_times(tune, bpm), seconds, sr, seed + index)
    return {"tune_seed": seed + index // 2, "bpm": bpm, "shift": HUM_SHIFTS[index % len(HUM_SHIFTS)],
            "key": f"{PITCH_CLASSES[tune.tonic]} {tune.mode}", "notes": [n.pitch for n in tune.notes]}, wav


def melody_hums(model: MusicGen, hums: int, seconds: float, seed: int) -> dict:
    """Chroma cosine of each hum with the clip generated with it and with the clip generated without it."""
    if not model.has_melody:
        return {"skipped": "the model has no melody conditioning"}
    sung = [hum(i, seed, seconds) for i in range(hums)]
    seeds = [seed + i for i in range(hums)]
    texts = [MELODY_PROMPT] * hums
    heard = generate(texts, melody=[torch.from_numpy(w).float() for _, w in sung], melody_sample_rate=SAMPLE_RATE,
                     duration=seconds, model=model, seed=seeds)
    unheard = generate(texts, duration=seconds, model=model, seed=seeds)
    rows = []
    for (info, wav), a, b in zip(sung, heard.audio, unheard.audio):
        without = _mono(b, unheard.sample_rate)
        rows.append(info | {"with_melody": chroma_cosine(wav, _mono(a, heard.sample_rate), SAMPLE_RATE),
                            "without_melody": chroma_cosine(wav, without, SAMPLE_RATE),
                            "texture": texture_stats(without, SAMPLE_RATE)})
    with_melody = float(np.mean([r["with_melody"] for r in rows]))
    without_melody = float(np.mean([r["without_melody"] for r in rows]))
    return {"with_melody": with_melody, "without_melody": without_melody, "gain": with_melody - without_melody,
            "rows": rows}


def run_pairs(model: MusicGen, data: Path, split: str = "test", seconds: float = 8.0, tonics: int = 8,
              tempo: int = 6, hums: int = 6, max_files: int = 24, seed: int = 0) -> dict:
    """Every section, the noise measure and the ceilings, as one report dict."""
    try:
        renderings = held_out(data, split, max_files, seconds)
    except DataError as e:
        raise UsageError(str(e)) from None
    if not renderings:
        raise UsageError(f"no non-silent {split} renderings listed in {data / 'metadata.jsonl'}")
    report = {"settings": {"data": str(data), "split": split, "seconds": seconds, "tonics": tonics,
                           "tempo_pairs": tempo, "hums": hums, "max_files": max_files, "seed": seed},
              "ceilings": ceilings(renderings)}
    report["key"] = key_pairs(model, tonics, seconds, seed)
    report["tempo"] = tempo_pairs(model, tempo, seconds, seed)
    report["melody"] = melody_hums(model, hums, seconds, seed)
    clips = [r["texture"] for section in ("key", "tempo", "melody") for r in report[section].get("rows", [])]
    report["noise"] = texture_distance(clips, report["ceilings"]["texture"]) | {"clips": len(clips)}
    report["goals"] = GOALS
    return report


# -----------------------------------------------------------------------------------------------
# tables


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def _num(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else f"{x:{spec}}"


def summary(report: dict) -> list[tuple[str, str, str, str, bool | None]]:
    """(metric, value, ceiling on real renderings, goal, goal met) rows of one report."""
    key, tempo, melody, noise, ceil = (report[k] for k in ("key", "tempo", "melody", "noise", "ceilings"))
    rows = [
        ("parallel mode accuracy (chance 50 %)", _pct(key["mode_accuracy"]), _pct(ceil["key"]["mode_accuracy"]),
         f">= {_pct(GOALS['mode_accuracy'])}", key["mode_accuracy"] >= GOALS["mode_accuracy"]),
        ("tonic accuracy (chance 8 %)", _pct(key["tonic_accuracy"]), _pct(ceil["key"]["tonic_accuracy"]),
         f">= {_pct(GOALS['tonic_accuracy'])}", key["tonic_accuracy"] >= GOALS["tonic_accuracy"]),
        ("allegro/adagio onset-rate ratio", _num(tempo["onset_ratio"]), "", f">= {GOALS['onset_ratio']}",
         None if tempo["onset_ratio"] is None else tempo["onset_ratio"] >= GOALS["onset_ratio"]),
        ("pairs with allegro faster", f"{tempo['faster_pairs']} of {tempo['pairs']}", "",
         f">= {GOALS['faster_share'] * tempo['pairs']:.0f} of {tempo['pairs']}",
         tempo["faster_pairs"] >= GOALS["faster_share"] * tempo["pairs"] - 1e-9),
    ]
    heard = "skipped" not in melody  # (a model without melody conditioning has the same rows, skipped)
    rows += [
        ("melody chroma cosine with the hum", _num(melody["with_melody"], ".3f") if heard else "skipped",
         _num(ceil["melody"]["chroma_cosine"], ".3f"), f">= {GOALS['melody_with']}",
         melody["with_melody"] >= GOALS["melody_with"] if heard else None),
        ("... without it (same prompt, seed)", _num(melody["without_melody"], ".3f") if heard else "skipped", "", "", None),
        ("... gain", f"{melody['gain']:+.3f}" if heard else "skipped", "", f">= {GOALS['melody_gain']}",
         melody["gain"] >= GOALS["melody_gain"] if heard else None),
    ]
    rows.append(("noise distance to real renderings", _num(noise["distance"]), _num(ceil["noise"]["distance"]), "", None))
    return rows


def _mark(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "not met")


def format_table(report: dict) -> str:
    """The printed table of one report."""
    header = ("metric", "value", "real renderings", "goal", "status")
    rows = [header, *[(m, v, c, g, _mark(ok)) for m, v, c, g, ok in summary(report)]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def markdown_table(reports: list[tuple[str, dict]]) -> str:
    """Reports side by side as a markdown table: one column per model (value, and whether the goal is
    met), the goal, and the ceilings on real renderings, one column per data folder the reports used."""
    names = [name for name, _ in reports]
    folders = list(dict.fromkeys(report["settings"]["data"] for _, report in reports))
    ceiling_of = {report["settings"]["data"]: summary(report) for _, report in reports}  # per folder
    real = ["real renderings"] if len(folders) == 1 else [f"real renderings ({Path(f).name})" for f in folders]
    lines = ["| metric | " + " | ".join(names + ["goal"] + real) + " |", "|---|" + "---|" * (len(names) + 1 + len(real))]
    tables = [summary(report) for _, report in reports]
    for i, (metric, _, _, goal, _) in enumerate(tables[0]):
        cells = [t[i][1] + (f" ({_mark(t[i][4])})" if t[i][4] is not None else "") for t in tables]
        cells += [goal] + [ceiling_of[f][i][2] for f in folders]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
