"""Codebook interleaving patterns: how K parallel token streams become one LM sequence.

EnCodec gives K codebooks per frame, codes [B, K, T]. The LM predicts one step at a
time, and each step holds at most one token per codebook, so the codes are laid out
on a grid of S steps, [B, K, S]. Slots that hold no code carry a `special_token`;
step 0 is always all-special and is the LM's first input (the start step). The grids
below show K=3 codebooks over T=4 frames; a digit t is the code of frame t, `.` is
the special token.

DelayPattern (MusicGen's default, delays 0..K-1): code (k, t) at step t + delays[k] + 1,
S = T + max(delays) + 1. Codebook k trails codebook k-1 by one step, so the fine
codebooks of a frame are predicted after the coarse ones yet all K streams advance
together:

    step  0 1 2 3 4 5 6
    k=0   . 0 1 2 3 . .
    k=1   . . 0 1 2 3 .
    k=2   . . . 0 1 2 3

ParallelPattern: all codebooks of frame t at step t + 1, S = T + 1:

    step  0 1 2 3 4
    k=0   . 0 1 2 3
    k=1   . 0 1 2 3
    k=2   . 0 1 2 3

FlatteningPattern: one token per step, code (k, t) at step t*K + k + 1, S = T*K + 1:

    step  0 1 2 3 4 5 6 7 8 9 10 11 12
    k=0   . 0 . . 1 . . 2 . . 3  .  .
    k=1   . . 0 . . 1 . . 2 . .  3  .
    k=2   . . . 0 . . 1 . . 2 .  .  3

CoarseFirstPattern: codebook 0 of every frame first (steps 1..T), then codebooks
1..K-1 of frame t together at step T + 1 + t, S = 2T + 1:

    step  0 1 2 3 4 5 6 7 8
    k=0   . 0 1 2 3 . . . .
    k=1   . . . . . 0 1 2 3
    k=2   . . . . . 0 1 2 3

Every pattern is fully described by one index tensor, step_index [K, T] (the step of
code (k, t)); build scatters codes along it and revert gathers along it, so neither
loops over batch or time.
"""
from __future__ import annotations

import torch

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class CodebookPattern:
    """Base class: a subclass defines `_num_steps` and `_code_steps`; the rest is derived."""

    def __init__(self, num_codebooks: int) -> None:
        if not isinstance(num_codebooks, int) or num_codebooks < 1:
            raise ValueError(f"num_codebooks must be a positive int, got {num_codebooks!r}")
        self.num_codebooks = num_codebooks
        self._index_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def num_steps(self, frames: int) -> int:
        """Sequence length S for `frames` frames, start step included."""
        self._check_frames(frames)
        return self._num_steps(frames)

    def _num_steps(self, frames: int) -> int:
        raise NotImplementedError

    def _code_steps(self, frames: int) -> torch.Tensor:
        """LongTensor [K, T]: the step holding code (k, t)."""
        raise NotImplementedError

    def _check_frames(self, frames: int) -> None:
        if not isinstance(frames, int) or frames < 0:
            raise ValueError(f"frames must be a non-negative int, got {frames!r}")

    def _index(self, frames: int, device: torch.device) -> torch.Tensor:
        key = (frames, torch.device(device))
        if key not in self._index_cache:
            self._check_frames(frames)
            self._index_cache[key] = self._code_steps(frames).to(device)
        return self._index_cache[key]

    def step_index(self, frames: int) -> torch.Tensor:
        """LongTensor [K, T]: the step at which code (k, t) sits (cached; do not modify)."""
        return self._index(frames, torch.device("cpu"))

    def slot_mask(self, frames: int) -> torch.Tensor:
        """BoolTensor [K, S]: True where a slot holds a code, False where it holds the special token."""
        mask = torch.zeros(self.num_codebooks, self.num_steps(frames), dtype=torch.bool)
        return mask.scatter_(1, self.step_index(frames), True)

    def layout(self, frames: int) -> list[list[tuple[int, int]]]:
        """For each step s, the (t, k) coordinates it holds, ordered by k; layout[0] == []."""
        steps: list[list[tuple[int, int]]] = [[] for _ in range(self.num_steps(frames))]
        for k, row in enumerate(self.step_index(frames).tolist()):
            for t, s in enumerate(row):
                steps[s].append((t, k))
        return steps

    def build(self, codes: torch.Tensor, special_token: int) -> torch.Tensor:
        """Lay codes [B, K, T] out as a sequence [B, K, S], special_token in empty slots."""
        if codes.ndim != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must be [B, {self.num_codebooks}, T], got shape {tuple(codes.shape)}")
        if codes.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        batch, _, frames = codes.shape
        index = self._index(frames, codes.device)  # [K, T]
        out = codes.new_full((batch, self.num_codebooks, self.num_steps(frames)), special_token)
        return out.scatter_(2, index.expand(batch, -1, -1), codes)  # [B, K, S]

    def revert(self, values: torch.Tensor, frames: int) -> torch.Tensor:
        """Gather per-code values [B, K, S, *rest] back to frame order [B, K, T, *rest].

        Works for token sequences ([B, K, S]) and for per-step scores such as logits
        ([B, K, S, V]); whatever sits in empty slots is ignored.
        """
        steps = self.num_steps(frames)
        if values.ndim < 3 or values.shape[1] != self.num_codebooks or values.shape[2] != steps:
            raise ValueError(
                f"values must be [B, {self.num_codebooks}, {steps}, ...] for {frames} frames, "
                f"got shape {tuple(values.shape)}"
            )
        batch, rest = values.shape[0], values.shape[3:]
        index = self._index(frames, values.device)  # [K, T]
        index = index.view(1, self.num_codebooks, frames, *([1] * len(rest)))
        index = index.expand(batch, self.num_codebooks, frames, *rest)  # [B, K, T, *rest]
        return values.gather(2, index)


class DelayPattern(CodebookPattern):
    """Code (k, t) at step t + delays[k] + 1; default delays 0..K-1 (MusicGen)."""

    def __init__(self, num_codebooks: int, delays: list[int] | None = None) -> None:
        super().__init__(num_codebooks)
        delays = list(range(num_codebooks)) if delays is None else list(delays)
        if len(delays) != num_codebooks:
            raise ValueError(f"need one delay per codebook ({num_codebooks}), got {len(delays)}")
        if any(not isinstance(d, int) or d < 0 for d in delays):
            raise ValueError(f"delays must be non-negative ints, got {delays}")
        self.delays = delays

    def _num_steps(self, frames: int) -> int:
        return frames + max(self.delays) + 1

    def _code_steps(self, frames: int) -> torch.Tensor:
        delays = torch.tensor(self.delays, dtype=torch.long)
        return torch.arange(frames)[None, :] + delays[:, None] + 1  # [K, T]


class ParallelPattern(CodebookPattern):
    """All codebooks of frame t at step t + 1."""

    def _num_steps(self, frames: int) -> int:
        return frames + 1

    def _code_steps(self, frames: int) -> torch.Tensor:
        return (torch.arange(frames) + 1).expand(self.num_codebooks, -1).contiguous()  # [K, T]


class FlatteningPattern(CodebookPattern):
    """One code per step: (k, t) at step t*K + k + 1."""

    def _num_steps(self, frames: int) -> int:
        return frames * self.num_codebooks + 1

    def _code_steps(self, frames: int) -> torch.Tensor:
        t = torch.arange(frames)[None, :]
        k = torch.arange(self.num_codebooks)[:, None]
        return t * self.num_codebooks + k + 1  # [K, T]


class CoarseFirstPattern(CodebookPattern):
    """Codebook 0 of frame t at step t + 1; codebooks 1..K-1 of frame t at step T + 1 + t.

    S = 2T + 1 for every K, so with K = 1 the last T steps are empty.
    """

    def _num_steps(self, frames: int) -> int:
        return 2 * frames + 1

    def _code_steps(self, frames: int) -> torch.Tensor:
        steps = (torch.arange(frames) + frames + 1).repeat(self.num_codebooks, 1)  # [K, T]
        steps[0] = torch.arange(frames) + 1
        return steps


_PATTERNS: dict[str, type[CodebookPattern]] = {
    "delay": DelayPattern,
    "parallel": ParallelPattern,
    "flattening": FlatteningPattern,
    "coarse_first": CoarseFirstPattern,
}


def make_pattern(name: str, num_codebooks: int) -> CodebookPattern:
    """Pattern by name: "delay", "parallel", "flattening" or "coarse_first"."""
    if name not in _PATTERNS:
        raise ValueError(f"unknown codebook pattern {name!r}; choose from {sorted(_PATTERNS)}")
    return _PATTERNS[name](num_codebooks)
