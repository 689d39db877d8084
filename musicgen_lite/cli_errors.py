"""Command-line errors shared by every entry point: a mistake ends with one line on stderr and exit code 2.

    generate.py, train.py lm, train.py codec, python -m musicgen_lite.evaluate,
    python -m musicgen_lite.data.scores

all parse with `ArgumentParser` (argparse's own errors: one line, exit 2), raise `UsageError` for
input that parses but cannot be used, and run their body through `run_command`.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codebooks.codec import EncodecCodec


class UsageError(Exception):
    """Bad input on the command line or in the files it names: one line, exit code 2, nothing written."""


def load_codec(path: str | Path) -> EncodecCodec:
    """`--codec DIR` (train.py lm, python -m musicgen_lite.evaluate): the codec there, or a UsageError."""
    from codebooks.codec import EncodecCodec  # here, so that entry points without --codec do not import it

    try:
        return EncodecCodec.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load --codec {path}: {str(e).splitlines()[0]}") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its own errors also reported as one line and exit code 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_command(
    prog: str | None,
    body: Callable[[], int],
    interrupted: str,
    errors: tuple[type[BaseException], ...] = (UsageError,),
) -> int:
    """body()'s exit code; one of `errors` prints "PROG: error: ..." and gives 2, Ctrl-C prints
    "PROG: <interrupted>" and gives 130 (without the "PROG: " when prog is None)."""
    lead = "" if prog is None else f"{prog}: "
    try:
        return body()
    except errors as e:
        print(f"{lead}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{lead}{interrupted}", file=sys.stderr)
        return 130
    finally:
        # The interpreter's last garbage collection walks every object torch and transformers made at
        # import: about a second of a 5 s command. Frozen objects are skipped; nothing of ours relies
        # on a collection at exit (files are closed and renamed before this, atexit handlers still run).
        gc.freeze()
