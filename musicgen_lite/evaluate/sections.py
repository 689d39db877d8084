"""The four measurements of a model: codec fidelity, LM cross-entropy, melody adherence and text adherence."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from codebooks.audio import audio_frames, read_audio

from ..api import generate
from ..audio_data import AudioFile
from ..hum import GLIDE_SECONDS, random_melody, synth_hum
from ..lm import LMConditions
from ..model import MusicGen
from .music import chroma_cosine, estimate_mode, onset_rate
from .signal import OPUS_KBPS, ffmpeg_available, log_mel_distance, opus_roundtrip, resample, si_sdr, to_mono

# goals printed beside the measurements
GOAL_BITRATE_KBPS = 2.2
GOAL_MELODY_COSINE = 0.5
GOAL_MELODY_GAIN = 0.25
GOAL_MODE_ACCURACY = 0.75
GOAL_TEMPO_RATIO = 1.2

MIN_PEAK = 1e-4  # an excerpt quieter than this is silence and is skipped
HUM_NOTE_SECONDS = 0.6  # about how long each hummed note lasts
PROMPT_KEYS = ("C", "G", "F", "D", "A", "Bb", "E", "Eb")
MELODY_PROMPTS = ("folk song, andante, piano", "piano sonata, moderato, 4/4, piano", "waltz, allegretto, 3/4, piano",
                  "chorale, adagio, piano")
MODE_PROMPT = "piano sonata, moderato, {key}, 4/4, piano"
TEMPO_PROMPT = "piano sonata, {tempo}, {key} major, 4/4, piano"


@dataclass
class Excerpt:
    file: AudioFile
    audio: np.ndarray  # mono float64 at the codec rate
    start: float  # seconds into the file


def load_excerpt(path: Path, seconds: float, sr: int) -> tuple[np.ndarray, float]:
    """The `seconds` (at most) around the middle of an audio file, mono float64 at `sr`, and its
    start time in seconds. The middle avoids fade-ins and the silence before the first note."""
    frames, rate = audio_frames(path)
    length = min(frames, round(seconds * rate))
    start = (frames - length) // 2
    data, _ = read_audio(path, start, length, dtype="float64")  # [C, length]
    return resample(data.mean(axis=0), rate, sr), start / rate


T = TypeVar("T")
R = TypeVar("R")


def spread_picks(items: list[T], count: int, pick: Callable[[T], R | None]) -> list[R]:
    """Up to `count` results of `pick` spread evenly over `items`: the list is cut into runs of
    len // count and each run gives the result of its first item that `pick` accepts (not None).

    A held-out split sorted by path holds each piece's renderings side by side, so its first files
    are often one piece; one pick per run samples them all."""
    stride = max(1, len(items) // count)
    picked: list[R] = []
    for start in range(0, len(items), stride):
        if len(picked) == count:
            break
        for item in items[start : start + stride]:
            result = pick(item)
            if result is not None:
                picked.append(result)
                break
    return picked


def split_excerpts(
    files: list[AudioFile], split: str, count: int, seconds: float, sr: int
) -> tuple[list[Excerpt], list[str]]:
    """Excerpts of up to `count` non-silent files of `split`, spread evenly over it (`spread_picks`),
    and the paths of the silent ones skipped on the way."""
    skipped: list[str] = []

    def excerpt(file: AudioFile) -> Excerpt | None:
        audio, start = load_excerpt(file.path, seconds, sr)
        if np.abs(audio).max() < MIN_PEAK:
            skipped.append(file.rel)
            return None
        return Excerpt(file, audio, start)

    return spread_picks([f for f in files if f.split == split], count, excerpt), skipped


# -----------------------------------------------------------------------------------------------
# sections


def codec_bitrate_kbps(model: MusicGen) -> float:
    """K * log2(codebook_size) * frame_rate / 1000: the bits the codes of one second take, in kbps."""
    codec = model.codec
    return codec.num_codebooks * math.log2(codec.codebook_size) * codec.frame_rate / 1000


def _lm_audio(model: MusicGen, ex: Excerpt) -> np.ndarray:
    """The excerpt cut to the LM's context (`max_duration`), the longest sequence it is trained on."""
    return ex.audio[: round(model.max_duration * model.sample_rate)]


def _codes(model: MusicGen, audio: np.ndarray) -> Tensor:
    """Codec codes [K, T] of a mono waveform at the codec rate."""
    return model.codec.encode(torch.from_numpy(audio).float()[None, None])[0]


def evaluate_codec(model: MusicGen, excerpts: list[Excerpt]) -> dict:
    """SI-SDR and log-mel distance of the codec's reconstruction of each excerpt, beside Opus."""
    sr = model.sample_rate
    opus = ffmpeg_available()
    rows = []
    for ex in excerpts:
        decoded = to_mono(model.codec.decode(_codes(model, ex.audio)[None])[0])[: ex.audio.shape[0]]
        row = {"path": ex.file.rel, "start_seconds": ex.start, "si_sdr_db": float(si_sdr(ex.audio, decoded)),
               "log_mel_distance": log_mel_distance(ex.audio, decoded, sr)}
        if opus:
            coded = opus_roundtrip(ex.audio, sr, OPUS_KBPS)
            row |= {"opus_si_sdr_db": float(si_sdr(ex.audio, coded)),
                    "opus_log_mel_distance": log_mel_distance(ex.audio, coded, sr)}
        rows.append(row)
    report = {
        "bitrate_kbps": codec_bitrate_kbps(model),
        "beam_width": model.codec.beam_width,
        "goal_bitrate_kbps": GOAL_BITRATE_KBPS,
        "si_sdr_db": np.mean([r["si_sdr_db"] for r in rows]),
        "log_mel_distance": np.mean([r["log_mel_distance"] for r in rows]),
        "goal_met": {"bitrate": codec_bitrate_kbps(model) <= GOAL_BITRATE_KBPS},
        "opus": None,
        "files": rows,
    }
    if opus:
        report["opus"] = {"kbps": OPUS_KBPS, "si_sdr_db": np.mean([r["opus_si_sdr_db"] for r in rows]),
                          "log_mel_distance": np.mean([r["opus_log_mel_distance"] for r in rows])}
    else:
        report["opus_missing"] = "ffmpeg not found: no Opus comparison (Debian: apt-get install ffmpeg)"
    return report


def lm_conditions(model: MusicGen, caption: str | None, audio: np.ndarray) -> LMConditions:
    """The conditions the LM is trained with for one excerpt: its caption (the null text when it
    has none) and, for melody models, the argmax chroma of the excerpt itself."""
    melody = None
    if model.chroma is not None:
        wav = resample(audio, model.sample_rate, model.chroma.extractor.sample_rate)
        melody = model.melody_features([torch.from_numpy(wav).float()])  # [1, frames, 12]
    return model.conditions([caption], melody, guided=False)


@torch.no_grad()
def codebook_cross_entropy(model: MusicGen, codes: Tensor, conditions: LMConditions) -> Tensor:
    """Teacher-forced cross-entropy (nats) of every code: codes [B, K, T] -> [B, K, T].

    tokens = pattern.build(codes, special) [B, K, S]; the LM reads steps 0..S-2 and its output at
    step s is the distribution of step s + 1. Shifted so that entry s predicts step s and gathered
    back to frame order with pattern.revert, code (k, t) is scored by -log p(codes[k, t]) under the
    prediction for the slot that holds it; empty pattern slots are never scored.
    """
    frames = codes.shape[-1]
    tokens = model.pattern.build(codes, model.lm.cfg.special_token)  # [B, K, S]
    logits = model.lm(tokens[:, :, :-1], conditions).float()  # [B, K, S-1, codebook_size]
    per_step = F.pad(logits, (0, 0, 1, 0))  # [B, K, S, codebook_size]: entry s predicts step s (step 0 holds no code)
    predicted = model.pattern.revert(per_step, frames)  # [B, K, T, codebook_size]
    return F.cross_entropy(predicted.flatten(0, 2), codes.flatten(), reduction="none").view_as(codes)


def unigram_cross_entropy(train_codes: list[Tensor], test_codes: list[Tensor], codebook_size: int) -> Tensor:
    """Cross-entropy (nats) per codebook [K] of held-out codes under each codebook's code frequencies.

    p_k(c) = (n_k(c) + 1) / (N_k + codebook_size), n_k(c) the count of code c in codebook k over `train_codes`
    (each [K, T]) and N_k their total (add-one smoothing keeps unseen codes finite);
    CE_k = -mean over the test codes of codebook k of log p_k(code).
    """
    counts = sum(F.one_hot(c.long(), codebook_size).sum(dim=1) for c in train_codes).double()  # [K, codebook_size]
    log_p = torch.log((counts + 1) / (counts.sum(dim=1, keepdim=True) + codebook_size))  # [K, codebook_size]
    test = torch.cat([c.long() for c in test_codes], dim=1)  # [K, sum T]
    return -log_p.gather(1, test).mean(dim=1)


def evaluate_lm(model: MusicGen, excerpts: list[Excerpt], train: list[Excerpt]) -> dict:
    """Per-codebook validation cross-entropy and perplexity beside the unigram baseline."""
    audios = [_lm_audio(model, ex) for ex in excerpts]
    codes = [_codes(model, audio) for audio in audios]
    ce = torch.cat([codebook_cross_entropy(model, c[None], lm_conditions(model, ex.file.caption, audio))[0]
                    for c, ex, audio in zip(codes, excerpts, audios)], dim=1).double().mean(dim=1)  # [K]
    baseline_codes = [_codes(model, _lm_audio(model, ex)) for ex in train] if train else codes
    unigram = unigram_cross_entropy(baseline_codes, codes, model.codec.codebook_size)
    return {
        "codebooks": [{"ce_nats": float(a), "perplexity": math.exp(a), "unigram_ce_nats": float(b),
                       "unigram_perplexity": math.exp(b)} for a, b in zip(ce.tolist(), unigram.tolist())],
        "mean_ce_nats": float(ce.mean()),
        "mean_unigram_ce_nats": float(unigram.mean()),
        "scored_frames": sum(c.shape[-1] for c in codes),
        "longest_excerpt_seconds": max(c.shape[-1] for c in codes) / model.frame_rate,
        "baseline_source": "train split" if train else "the scored codes themselves (no other train split)",
        "files": [ex.file.rel for ex in excerpts],
    }


def hum_for(seed: int, seconds: float, sr: int) -> tuple[list[int], np.ndarray]:
    """A `random_melody` tune hummed for exactly `seconds`: about one note per 0.6 s, note lengths
    chosen so that notes and glides fill the time."""
    n_notes = max(2, round(seconds / (HUM_NOTE_SECONDS + GLIDE_SECONDS)))
    note_seconds = (seconds - (n_notes - 1) * GLIDE_SECONDS) / n_notes
    notes = random_melody(seed, n_notes)
    wav = synth_hum(notes, sr, note_seconds, seed).astype(np.float64)
    length = round(seconds * sr)
    return notes, np.pad(wav[:length], (0, max(0, length - wav.shape[0])))


def evaluate_melody(model: MusicGen, prompts: int, seconds: float, seed: int) -> dict:
    """Chroma cosine between each hum and the output generated with it, and without any melody."""
    if not model.has_melody:
        return {"skipped": "the model has no melody conditioning"}
    sr = model.chroma.extractor.sample_rate
    texts = [MELODY_PROMPTS[i % len(MELODY_PROMPTS)] for i in range(prompts)]
    hums = [hum_for(seed + i, seconds, sr) for i in range(prompts)]
    wavs = [torch.from_numpy(wav).float() for _, wav in hums]
    with_melody = generate(texts, melody=wavs, melody_sample_rate=sr, duration=seconds, model=model, seed=seed).audio
    without = generate(texts, duration=seconds, model=model, seed=seed).audio  # same seeds, row by row
    rows = []
    for text, (notes, hum), heard, unheard in zip(texts, hums, with_melody, without):
        rows.append({"text": text, "notes": notes,
                     "with_melody": chroma_cosine(hum, resample(to_mono(heard), model.sample_rate, sr), sr),
                     "without_melody": chroma_cosine(hum, resample(to_mono(unheard), model.sample_rate, sr), sr)})
    cos_with = float(np.mean([r["with_melody"] for r in rows]))
    cos_without = float(np.mean([r["without_melody"] for r in rows]))
    return {
        "chroma_cosine_with_melody": cos_with,
        "chroma_cosine_without_melody": cos_without,
        "gain": cos_with - cos_without,
        "goal_with_melody": GOAL_MELODY_COSINE,
        "goal_gain": GOAL_MELODY_GAIN,
        "goal_met": {"with_melody": cos_with >= GOAL_MELODY_COSINE, "gain": cos_with - cos_without >= GOAL_MELODY_GAIN},
        "prompts": rows,
    }


def evaluate_text(model: MusicGen, prompts: int, seconds: float, seed: int) -> dict:
    """Mode accuracy on parallel major/minor prompts and the allegro/adagio onset-rate ratio."""
    keys = [PROMPT_KEYS[i % len(PROMPT_KEYS)] for i in range(prompts)]
    sr = model.sample_rate
    mode_rows = []
    for mode in ("major", "minor"):
        texts = [MODE_PROMPT.format(key=f"{key} {mode}") for key in keys]
        out = generate(texts, duration=seconds, model=model, seed=seed)
        for key, text, audio in zip(keys, texts, out.audio):
            found = estimate_mode(audio, sr)
            mode_rows.append({"text": text, "mode": mode, "estimated_key": None if found is None else " ".join(found),
                              "correct": found is not None and found[1] == mode, "key_correct": found == (key, mode)})
    tempo_rows = []
    for tempo in ("allegro", "adagio"):
        texts = [TEMPO_PROMPT.format(tempo=tempo, key=key) for key in keys]
        out = generate(texts, duration=seconds, model=model, seed=seed)
        tempo_rows += [{"text": text, "tempo": tempo, "onsets_per_second": onset_rate(audio, sr)}
                       for text, audio in zip(texts, out.audio)]
    fast = float(np.mean([r["onsets_per_second"] for r in tempo_rows if r["tempo"] == "allegro"]))
    slow = float(np.mean([r["onsets_per_second"] for r in tempo_rows if r["tempo"] == "adagio"]))
    accuracy = float(np.mean([r["correct"] for r in mode_rows]))
    ratio = fast / slow if slow > 0 else None  # undefined when the adagio outputs have no onsets
    return {
        "mode_accuracy": accuracy,
        "goal_mode_accuracy": GOAL_MODE_ACCURACY,
        "key_accuracy": float(np.mean([r["key_correct"] for r in mode_rows])),  # tonic too; no goal
        "allegro_onsets_per_second": fast,
        "adagio_onsets_per_second": slow,
        "tempo_ratio": ratio,
        "goal_tempo_ratio": GOAL_TEMPO_RATIO,
        "goal_met": {"mode_accuracy": accuracy >= GOAL_MODE_ACCURACY,
                     "tempo_ratio": None if ratio is None else ratio >= GOAL_TEMPO_RATIO},
        "mode_prompts": mode_rows,
        "tempo_prompts": tempo_rows,
    }


