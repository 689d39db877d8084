"""Measure a MusicGen model: codec fidelity, LM cross-entropy, melody adherence and text adherence.

    python -m musicgen_lite.evaluate {codec,lm,melody,text,words,all} --model MODEL_DIR --data DATA_DIR \\
        [--split test] [--out report.json] [--max-files N] [--seconds S] [--prompts P] [--seed SEED]

prints one table and writes the same numbers (with per-file / per-prompt detail) as JSON. `--data`
is a folder laid out like `python -m musicgen_lite.data.scores` writes it (audio files and a
metadata.jsonl with "path", "text", "split"); only the codec, LM and words sections read it. Every number
is reproducible: excerpts are fixed, hums and generations are seeded from `--seed`.

What each section measures (the metric functions in `signal` and `music` define every quantity precisely):

codec   `--seconds` around the middle of each of up to `--max-files` held-out files (spread evenly
        over the split: its first files are often one piece) go through the codec (encode, decode)
        and through Opus at 6 kbps, about the lowest bitrate at which Opus still codes music; both
        are scored against the original with `si_sdr` and `log_mel_distance`.
        The codec's bitrate is K * log2(codebook_size) * frame_rate / 1000 kbps (goal: at most 2.2).
lm      Teacher-forced cross-entropy of the LM on the same excerpts' codes (cut to the LM's
        `max_duration`), given their captions (and, for melody models, their own chroma, as in
        training), per codebook, in nats
        and as perplexity exp(CE), beside a unigram model of each codebook's code frequencies
        (estimated on as many train-split excerpts, or on the held-out codes when there is no
        train split).
melody  Hums of `random_melody` tunes (`musicgen_lite.hum`) condition generations; `chroma_cosine`
        between each hum and its output, against the same prompts and seeds without a melody
        (goals: at least 0.5 with the melody, at least 0.25 above the figure without).
text    Prompts that differ only in "<tonic> major" / "<tonic> minor": the output's mode by
        `estimate_mode` must match the prompt's (goal: 75 %); prompts that differ only in "allegro"
        / "adagio": the ratio of mean `onset_rate`s (goal: at least 1.2).
words   Teacher-forced, no sampling: on the first 2 s of each excerpt, with the melody nulled, the
        LM's cross-entropy with the caption as rendered against the caption with its tonic moved a
        tritone, its mode swapped, or its tempo word and BPM moved to the other end (dCE > 0: the
        model reads those words); and the drop that the excerpt's own chroma as the melody gives
        (what pitch is worth there). See `musicgen_lite.evaluate.words`.

pairs   Controlled prompt pairs (key, tempo), hums of new tunes by an unheard voice and a noise
        measure, each beside its ceiling on real held-out renderings: see `musicgen_lite.evaluate.pairs`
        (`python -m musicgen_lite.evaluate pairs --help`).

The JSON report holds the run's settings ("sections", "split", "seconds", "seed", and "model", "data",
"max_files", "skipped_silent" where they apply) and one object per section run: "codec", "lm",
"melody", "text", "words", each with its means, its goals and "goal_met", and the per-file or per-prompt rows.

    signal     waveform metrics: SI-SDR, log-mel distance, Opus round trips
    music      chroma cosine, key and mode, onset rate
    sections   the four measurements on a model
    words      the teacher-forced probe of key, mode and tempo words
    report     running sections, the printed table
    pairs      the controlled-pair evaluation, its ceilings and tables
    voice      the unheard singer of pairs' hums
    cli        the command line

Opus needs the ffmpeg program with libopus (Debian: apt-get install ffmpeg); without it the report
says so ("opus": null, "opus_missing") and leaves the Opus column out.
"""

from __future__ import annotations

from .cli import build_parser, main
from .music import (
    PITCH_CLASSES,
    chroma,
    chroma_cosine,
    estimate_mode,
    key_scores,
    onset_envelope,
    onset_rate,
    onset_times,
)
from .report import format_table, needs_data, run_sections, table_rows
from .sections import (
    Excerpt,
    codebook_cross_entropy,
    codec_bitrate_kbps,
    evaluate_codec,
    evaluate_lm,
    evaluate_melody,
    evaluate_text,
    hum_for,
    lm_conditions,
    load_excerpt,
    split_excerpts,
    unigram_cross_entropy,
)
from .signal import (
    SAMPLE_RATE,
    align,
    best_lag,
    ffmpeg_available,
    log_mel,
    log_mel_distance,
    opus_roundtrip,
    resample,
    si_sdr,
    stft_magnitude,
    to_mono,
)

__all__ = [
    "PITCH_CLASSES", "SAMPLE_RATE", "Excerpt",
    "align", "best_lag", "build_parser", "chroma", "chroma_cosine", "codebook_cross_entropy", "codec_bitrate_kbps",
    "estimate_mode", "evaluate_codec", "evaluate_lm", "evaluate_melody", "evaluate_text", "ffmpeg_available",
    "format_table", "hum_for", "key_scores", "lm_conditions", "load_excerpt", "log_mel", "log_mel_distance", "main",
    "needs_data", "onset_envelope", "onset_rate", "onset_times", "opus_roundtrip", "resample", "run_sections",
    "si_sdr", "split_excerpts", "stft_magnitude", "table_rows", "to_mono", "unigram_cross_entropy",
]
