"""Does the LM read its caption's key, mode and tempo words? A teacher-forced probe, no sampling.

Each held-out excerpt is scored twice under the text-only condition (melody nulled, the condition a
prompt without a hum gives): with its caption as rendered, and with one word group changed:

    tonic   "in Eb major"  -> "in A major"      (a tritone away: the farthest key of the same mode)
    mode    "in Eb major"  -> "in Eb minor"
    tempo   "adagio, 66 bpm" -> "presto, 184 bpm" (slow words to the fast end, fast words to the slow end)

over the opening `seconds` of the excerpt, where the codes so far say least and a caption's words
matter most. dCE = CE(changed) - CE(as rendered), nats per code, averaged over codebooks: a model
that reads the words scores the truth lower (dCE > 0, truth preferred in most excerpts); one that
ignores them scores dCE ~ 0 and prefers the truth about half the time. For melody models, "pitch"
scores the same opening with the excerpt's own chromagram as the melody: what the whole pitch
content is worth to the LM there, the most a key word could be. Chance-level pairs generation
(`evaluate pairs`) says *that* words are not followed; this says whether the LM learnt them at all,
in seconds instead of minutes.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..data.scores.augment import TEMPO_WORDS
from ..data.scores.captions import tonic_pitch_class
from ..model import MusicGen
from .music import PITCH_CLASSES
from .pairs import KEY_NAME
from .sections import Excerpt, _codes, codebook_cross_entropy, lm_conditions

WORDS = tuple(word for word, _ in TEMPO_WORDS)  # the data builder's tempo words, slowest first
SLOW_WORDS = WORDS[: len(WORDS) // 2]
SLOW_END, FAST_END = (WORDS[0], 50), (WORDS[-1], 184)  # (word, quarter notes per minute) a tempo moves to
TEMPO_WORD = re.compile(r"\b(" + "|".join(WORDS) + r")\b")
BPM = re.compile(r"\b\d+(?:\.\d+)? bpm\b")
PROBE_SECONDS = 2.0


def changed_captions(caption: str) -> dict[str, str]:
    """The caption with one word group changed, for each group it has: {"tonic", "mode", "tempo"}."""
    out = {}
    key = KEY_NAME.search(caption)
    if key is not None:
        letter, accidental, mode = key.groups()
        moved = PITCH_CLASSES[(tonic_pitch_class(letter + accidental) + 6) % 12]
        out["tonic"] = caption[: key.start()] + f"{moved} {mode}" + caption[key.end() :]
        other = "minor" if mode == "major" else "major"
        out["mode"] = caption[: key.start()] + f"{letter}{accidental} {other}" + caption[key.end() :]
    word = TEMPO_WORD.search(caption)
    if word is not None:
        new_word, new_bpm = FAST_END if word.group(1) in SLOW_WORDS else SLOW_END
        out["tempo"] = BPM.sub(f"{new_bpm} bpm", TEMPO_WORD.sub(new_word, caption))
    return out


@torch.no_grad()
def evaluate_words(model: MusicGen, excerpts: list[Excerpt], seconds: float = PROBE_SECONDS) -> dict:
    """dCE of each changed word group over the first `seconds` of each captioned excerpt (see the module)."""
    frames = max(1, round(seconds * model.frame_rate))
    deltas: dict[str, list[float]] = {"tonic": [], "mode": [], "tempo": [], "pitch": []}
    scored, longest = 0, 0
    for ex in excerpts:
        changes = changed_captions(ex.file.caption or "")
        if not changes:
            continue
        opening = ex.audio[: round(frames / model.frame_rate * model.sample_rate)]
        codes = _codes(model, opening)[None, :, :frames]  # [1, K, T]
        longest = max(longest, codes.shape[-1])
        texts = [ex.file.caption, *changes.values()]
        ce = [float(codebook_cross_entropy(model, codes, model.conditions([t], None, guided=False)).double().mean())
              for t in texts]
        for group, value in zip(changes, ce[1:]):
            deltas[group].append(value - ce[0])
        if model.chroma is not None:  # CE without a melody minus CE with the excerpt's own chroma
            own = lm_conditions(model, ex.file.caption, opening)
            deltas["pitch"].append(ce[0] - float(codebook_cross_entropy(model, codes, own).double().mean()))
        scored += 1
    report: dict = {"seconds": longest / model.frame_rate, "excerpts": scored}  # the longest opening scored
    for group, values in deltas.items():
        v = np.array(values)
        report[group] = None if not len(v) else {
            "excerpts": len(v), "mean_dce_nats": float(v.mean()), "truth_preferred": int((v > 0).sum()),
        }
    return report
