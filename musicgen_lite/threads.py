"""Intra-op threads: setting them for a block, checking a `threads` argument, and timing which count is fastest.

A small model's decoding step is a few dozen small operations. On two cores, a second thread can make
it 1.4x faster (an idle machine: it doubles the memory bandwidth that streams the weights) or several
times slower (a busy one: each operation waits for a thread that is not running), and which one holds
changes while a clip is generated. `FastestThreads` therefore times the candidates in turn, a few
steps each, and runs on the fastest until the next trial:

    step      0 | 1  2  3  4  5  6  7  8 | 9 ... 128 | 129 ... 136 | 137 ...
    threads   2 | 1  2  1  2  1  2  1  2 | fastest   | 1 2 1 2 ... | fastest
              prefill   trial (interleaved)            trial again: 128 steps after the last one,
                                                       twice that if the last one kept the count

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
    `trial` steps each, and the one with the lowest median step time runs until the next trial. A
    choice whose step takes over SLOWER times the fastest step of the trial leaves the trial at once (on
    a busy machine a second thread can make a step ten times slower), and each trial that keeps the
    running choice doubles the period, up to `max_period`, so that a steady machine pays for few trials."""

    SLOWER = 4.0

    def __init__(self, choices: tuple[int, ...], trial: int = 4, period: int = 128, max_period: int = 1024):
        self.choices = tuple(dict.fromkeys(choices))
        self.trial, self.base_period, self.max_period = trial, period, max_period
        self.period = period
        self.best = max(self.choices)
        self.steps = 0
        self.next_trial = 1 if len(self.choices) > 1 else -1  # the step that starts the next trial
        self.trial_start = 0
        self.queue: list[int] = []  # the thread counts of the trial's remaining steps
        self.times: dict[int, list[float]] = {}
        self._current: tuple[int, float] | None = None

    def start(self) -> int:
        """Set torch's threads for the coming step; returns the count."""
        if self.steps == self.next_trial:
            self.trial_start, self.queue = self.steps, [c for _ in range(self.trial) for c in self.choices]
            self.times = {c: [] for c in self.choices}
        n = self.queue[0] if self.queue else self.best
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self._current = (n, time.perf_counter())
        return n

    def stop(self) -> None:
        """The step started by `start` has finished."""
        n, began = self._current
        self.steps += 1
        if not self.queue:
            return
        took = time.perf_counter() - began
        self.queue.pop(0)
        self.times[n].append(took)
        others = [t for c, ts in self.times.items() if c != n for t in ts]
        if others and took > self.SLOWER * min(others):  # out of this trial
            self.queue = [c for c in self.queue if c != n]
            if len(set(self.queue)) <= 1:  # no other pair left to compare
                self.queue = []
        if not self.queue:
            self._decide()

    def _decide(self) -> None:
        medians = {c: statistics.median(ts) for c, ts in self.times.items() if ts}
        best = min(medians, key=medians.get)
        self.period = min(2 * self.period, self.max_period) if best == self.best else self.base_period
        self.best = best
        self.next_trial = self.trial_start + self.period
