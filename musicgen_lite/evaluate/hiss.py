"""Where a model's hiss comes from: its codec, or the codes its LM picks, and in which codebooks.

    python -m musicgen_lite.evaluate hiss --model MODEL --data DATA [--split valid] [--max-files 24]
        [--seconds 8] [--seed 0] [--out hiss.json]

Every row decodes codes of the same held-out renderings (`pairs.held_out`) and scores the texture of
the audio (`pairs.texture_stats`) against the renderings themselves (`pairs.texture_distance`: 0 =
theirs), so the rows differ only in where the codes come from:

    codec                the codec's own codes (encode, decode): where any LM on this codec starts
    swapped 2..K         every code of codebooks 2..K replaced by one drawn at random from the same
                         clip's codes of that codebook (its unigram; `swap_fine_codes`): what the
                         decoder makes of fine codes that do not fit the coarse one
    resampled 1          the codes of codebook 1, drawn from the LM's guided distributions ...
    resampled 2..K       ... of codebooks 2..K ...
    resampled all        ... of every codebook

"Resampled" rows are teacher-forced: the LM reads the true codes (every earlier code real) with the
rendering's caption and its melody track (the mix where it has none or it is silent) and the null
condition for guidance, and each named code is drawn from its guided distribution with the model's
sampling defaults (`MusicGen.draw_teacher_forced`). So they show the LM's choices one step at a time,
without its errors piling up as they do in generation; `pairs` measures generated clips on the same
scale.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from codebooks.rvq import swap_fine_codes
from conditioning.chroma import MIN_PEAK, load_melody

from ..audio_data import DataError
from ..cli_errors import UsageError
from ..model import MusicGen
from .pairs import held_out, texture_distance, texture_stats
from .signal import SAMPLE_RATE, resample, to_mono


def run_hiss(model: MusicGen, data: Path, split: str = "valid", max_files: int = 24, seconds: float = 8.0,
             seed: int = 0) -> dict:
    """The texture distance of each row of the module docstring, as one report dict."""
    try:
        renderings = held_out(data, split, max_files, seconds)
    except DataError as e:
        raise UsageError(str(e)) from None
    if len(renderings) < 2:
        raise UsageError(f"need at least 2 non-silent {split} renderings in {data / 'metadata.jsonl'}, found {len(renderings)}")
    books = model.codec.num_codebooks
    fine = list(range(1, books))
    rows = {"codec": [], f"swapped 2..{books}": [], "resampled 1": [], f"resampled 2..{books}": [], "resampled all": []}
    generator = torch.Generator().manual_seed(seed)
    for r in renderings:
        wav = torch.from_numpy(r["audio"]).float()[None, None]  # [1, 1, N] at SAMPLE_RATE
        codes = model.codec.encode(wav, SAMPLE_RATE)  # [1, K, T]
        hummed = r["melody"] is not None and abs(r["melody"]).max() >= MIN_PEAK
        line = r["melody"] if hummed else r["audio"]
        melody = load_melody(line, SAMPLE_RATE, model.chroma.extractor.sample_rate) if model.has_melody else None
        drawn = model.draw_teacher_forced(codes, [r["text"]], None if melody is None else [melody],
                                          model.generation_defaults, generator)
        variants = {"codec": codes, f"swapped 2..{books}": swap_fine_codes(codes, 1.0, generator),
                    "resampled 1": _mixed(codes, drawn, [0]), f"resampled 2..{books}": _mixed(codes, drawn, fine),
                    "resampled all": drawn}
        for name, variant in variants.items():
            audio = model.codec.decode(variant)[0].float().cpu().numpy()  # [C, N']
            rows[name].append(texture_stats(resample(to_mono(audio), model.sample_rate), SAMPLE_RATE))
    reference = [texture_stats(r["audio"], SAMPLE_RATE) for r in renderings]
    report = {"settings": {"data": str(data), "split": split, "max_files": max_files, "seconds": seconds, "seed": seed},
              "renderings": len(renderings),
              "sampling": asdict(model.generation_defaults),
              "rows": {name: texture_distance(stats, reference) for name, stats in rows.items()}}
    report["rows"]["real (split halves)"] = texture_distance(reference[1::2], reference[0::2])
    return report


def _mixed(codes: Tensor, drawn: Tensor, books: list[int]) -> Tensor:
    out = codes.clone()
    out[:, books] = drawn[:, books]
    return out


def format_table(report: dict) -> str:
    """One line per row: the distance and the z-score of each texture statistic."""
    names = ("flatness_db_between_onsets", "silent_fraction", "onset_rate", "chroma_entropy_bits")
    lines = [f"{'codes':22s} {'distance':>8s}  z: flatness  silence  onsets  chroma entropy"]
    for name, row in report["rows"].items():
        z = [row["z"].get(k) for k in names]
        cells = "  ".join("   n/a" if v is None else f"{v:+6.2f}" for v in z)
        distance = "n/a" if row["distance"] is None else f"{row['distance']:.2f}"
        lines.append(f"{name:22s} {distance:>8s}      {cells}")
    return "\n".join(lines)
