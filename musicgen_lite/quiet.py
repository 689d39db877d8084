"""transformers' loading bars and notices kept off the user's terminal: stderr carries our own lines.

Loading a model draws a "Loading weights" bar per sub-model and logs notices meant for transformers'
developers; a command line sets transformers to errors only for the whole process, the Python API
does it only while it loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transformers.utils import logging as hf_logging


def silence_transformers() -> None:
    """For a command line: transformers logs errors only and draws no progress bars, from now on."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextmanager
def transformers_silenced() -> Iterator[None]:
    """silence_transformers() inside the block; the caller's settings are restored after it."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    silence_transformers()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
