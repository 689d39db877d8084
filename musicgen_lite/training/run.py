"""How a training command ends: its exit codes, the interruption message, and the checks shared by both trainers' options.

    0    done
    1    TrainingDiverged: the loss stayed non-finite after every rollback
    2    UsageError: one line on stderr, nothing trained
    130  Ctrl-C: the run resumes from its latest checkpoint when the same command runs again
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..cli_errors import UsageError, run_command
from .processes import end_processes

INTERRUPTED = "interrupted; run the same command again to resume from the latest checkpoint"


class TrainingDiverged(Exception):
    pass


def run_training(prog: str, body: Callable[[], int]) -> int:
    """body()'s exit code, with every trainer's error handling (see the table above)."""

    def guarded() -> int:
        try:
            return body()
        except TrainingDiverged as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1

    try:
        return run_command(prog, guarded, INTERRUPTED)
    finally:
        end_processes()


def flag(name: str) -> str:
    """The command-line spelling of a config field: segment_seconds -> --segment-seconds."""
    return "--" + name.replace("_", "-")


def check_all(values: dict[str, float | None], ok: Callable[[float], bool], requirement: str) -> None:
    """UsageError "FLAG <requirement>, got VALUE" for the first value that is set (not None) and not ok."""
    for name, value in values.items():
        if value is not None and not ok(value):
            raise UsageError(f"{name} {requirement}, got {value}")
