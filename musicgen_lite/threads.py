"""Intra-op threads: setting them for a block, checking a `threads` argument, and timing which count is fastest.

A small model's decoding step is a few dozen small operations. On two cores, a second thread can make
it 1.4x faster (an idle machine: it doubles the memory bandwidth that streams the weights) or several
times slower (a busy one: each operation waits for a thread that is not running), and which one holds
changes while a clip is generated. `FastestThreads` therefore times the candidates in turn, a few
steps each, and runs on the fastest until the next trial:

    step      0 | 1  2  3  4  5  6  7  8 | 9 ... 127 | 128 ... 135 | 136 ...
    threads   2 | 1  2  1  2  1  2  1  2 | fastest   | 1 2 1 2 ... | fastest
              prefill   trial (interleaved)            trial again

It is used only where the step's numbers do not depend on the thread count (see
`TransformerLM.decoding_threads`), so the tokens are the same whatever it picks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count for this thread set to n (None: left as it is), then restored."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_threads(threads) -> int | None:
    """None (torch's own count) or a positive integer; anything else is a one-line ValueError."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return threads


class FastestThreads:
    """Chooses the thread count of each decoding step among `choices`: the first step (the prefill, many
    positions at once) runs on the most threads; then every `period` steps the choices take turns for
    `trial` steps each, and the one with the lowest median step time runs until the next trial."""

    def __init__(self, choices: tuple[int, ...], trial: int = 4, period: int = 128):
        self.choices = tuple(dict.fromkeys(choices))
        self.trial, self.period = trial, period
        self.best = max(self.choices)
        self.times: dict[int, list[float]] = {n: [] for n in self.choices}
        self.steps = 0
        self._current: tuple[int, float] | None = None

    def _phase(self) -> int | None:
        """The position of the coming step in its trial, or None outside a trial."""
        if self.steps == 0 or len(self.choices) == 1:
            return None
        phase = (self.steps - 1) % self.period
        return phase if phase < self.trial * len(self.choices) else None

    def start(self) -> int:
        """Set torch's threads for the coming step; returns the count."""
        phase = self._phase()
        n = self.best if phase is None else self.choices[phase % len(self.choices)]
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self._current = (n, time.perf_counter())
        return n

    def stop(self) -> None:
        """The step started by `start` has finished."""
        n, began = self._current
        phase = self._phase()
        if phase is not None:
            self.times[n].append(time.perf_counter() - began)
            if phase == self.trial * len(self.choices) - 1:  # the trial's last step
                self.best = min(self.choices, key=lambda c: statistics.median(self.times[c]))
                self.times = {c: [] for c in self.choices}
        self.steps += 1
