"""What the LM trainer reads: segments of cached token clips, batches with their captions and melody, caption augmentation."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from conditioning.chroma import ChromaExtractor

from ..audio_data import Clip, chroma_span


def chroma_frames(seconds: float, extractor: ChromaExtractor) -> int:
    """Chroma frames the extractor gives for `seconds` of audio (1 + samples // hop, centred frames)."""
    return 1 + int(seconds * extractor.sample_rate) // extractor.hop_length


@dataclass
class Batch:
    codes: Tensor  # [B, K, T] long; the special token after a clip's end
    valid: Tensor  # [B, T] bool; False after a clip's end
    captions: list[str | None]
    chroma: Tensor | None  # [B, C] pitch class per chroma frame (melody models)
    mix_chroma: Tensor | None  # [B, C] the same of the mix itself, whichever the row is conditioned on (pitch loss)


class Segments:
    """An endless stream of training segments (clip, start frame, use the melody track) of `frames`
    token frames. Epoch e cuts every clip into max(1, T // frames) segments from a random offset,
    shuffles them all and picks the rows conditioned on a melody track (all from seed and e), so
    position p is segment p % n of epoch p // n and the order needs no saved state."""

    def __init__(self, clips: list[Clip], frames: int, seed: int, track_prob: float = 0.0):
        self.clips, self.frames, self.seed = clips, frames, seed
        self.track_prob = track_prob if any(c.melody is not None for c in clips) else 0.0
        self.counts = [max(1, c.frames // frames) for c in clips]
        self.n = sum(self.counts)
        self._epoch: tuple[int, list[tuple[int, int, bool]]] = (-1, [])

    def epoch(self, e: int) -> list[tuple[int, int, bool]]:
        if self._epoch[0] != e:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            segs = []
            for i, (clip, count) in enumerate(zip(self.clips, self.counts)):
                slack = clip.frames - count * self.frames
                offset = int(torch.randint(slack + 1, (1,), generator=g)) if slack > 0 else 0
                segs += [(i, offset + j * self.frames) for j in range(count)]
            segs = [segs[j] for j in torch.randperm(len(segs), generator=g).tolist()]
            tracks = (torch.rand(len(segs), generator=g) < self.track_prob).tolist() if self.track_prob else [False] * len(segs)
            self._epoch = (e, [(i, start, track) for (i, start), track in zip(segs, tracks)])
        return self._epoch[1]

    def __getitem__(self, position: int) -> tuple[int, int, bool]:
        e, i = divmod(position, self.n)
        return self.epoch(e)[i]


def validation_segments(clips: list[Clip], frames: int, limit: int) -> list[tuple[int, int, bool]]:
    """Non-overlapping segments of every validation clip, conditioned on melody tracks where there
    are any (the way the model is used); at most `limit`, evenly spread."""
    segs = [(i, j * frames, True) for i, c in enumerate(clips) for j in range(max(1, c.frames // frames))]
    if len(segs) > limit:
        segs = [segs[int(i)] for i in np.linspace(0, len(segs) - 1, limit).round()]
    return segs


def make_batch(clips: list[Clip], segs: list[tuple[int, int, bool]], frames: int, special: int,
               chroma_rate: float | None, chroma_length: int, frame_rate: float, with_mix: bool = False) -> Batch:
    """The rows `segs` of `clips`; `with_mix`: also the mix's chroma of every row (the pitch loss's target)."""
    k = clips[0].codes.shape[0]
    codes = torch.full((len(segs), k, frames), special, dtype=torch.long)
    valid = torch.zeros(len(segs), frames, dtype=torch.bool)
    for row, (i, start, _) in enumerate(segs):
        part = clips[i].codes[:, start : start + frames]
        codes[row, :, : part.shape[1]] = part
        valid[row, : part.shape[1]] = True
    chroma = mix = None
    if chroma_rate is not None:
        chroma = torch.stack([chroma_span(clips[i], s, frame_rate, chroma_rate, chroma_length, track)
                              for i, s, track in segs]).long()
        if with_mix:
            mix = torch.stack([chroma_span(clips[i], s, frame_rate, chroma_rate, chroma_length) for i, s, _ in segs]).long()
    return Batch(codes, valid, [clips[i].file.caption for i, _, _ in segs], chroma, mix)


# How people say the data builder's tempo words (augment.TEMPO_WORDS) in plain English. The captions
# name tempi in Italian only; without this a model never learns what "slow" or "fast" means. Opt-in
# (`--plain-tempo-words`): measured on the bundled model's recipe in docs/MODEL_CARD.md.
PLAIN_TEMPO = {
    "largo": ("very slow", "slow", "broad"),
    "adagio": ("slow", "slowly", "leisurely"),
    "andante": ("walking pace", "moderately slow", "flowing"),
    "moderato": ("moderate tempo", "medium tempo", "moderate"),
    "allegro": ("fast", "quick", "lively"),
    "presto": ("very fast", "rapid", "very quick"),
}
PLAIN_TEMPO_SHARE = 0.5  # of the captions that name one of these words
_TEMPO_WORD = re.compile(r"\b(" + "|".join(PLAIN_TEMPO) + r")\b")


def augment_caption(caption: str, generator: torch.Generator, plain_tempo: bool = False) -> str:
    """A random non-empty subset of the caption's comma-separated fields, in random order; with
    `plain_tempo`, in PLAIN_TEMPO_SHARE of the captions that name a tempo word, the word is said in
    plain English (one of its PLAIN_TEMPO phrases: "allegro, 144 bpm" -> "fast, 144 bpm")."""
    fields = [f.strip() for f in caption.split(",") if f.strip()]
    if len(fields) >= 2:
        keep = int(torch.randint(1, len(fields) + 1, (1,), generator=generator))
        caption = ", ".join(fields[i] for i in torch.randperm(len(fields), generator=generator)[:keep].tolist())
    word = _TEMPO_WORD.search(caption) if plain_tempo else None
    if word is not None and float(torch.rand((), generator=generator)) < PLAIN_TEMPO_SHARE:
        phrases = PLAIN_TEMPO[word.group(1)]
        phrase = phrases[int(torch.randint(len(phrases), (1,), generator=generator))]
        caption = caption[: word.start()] + phrase + caption[word.end():]
    return caption

