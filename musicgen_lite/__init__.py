"""musicgen_lite: MusicGen-style music generation from text and hummed melodies."""

import os

# Decoding runs on every core torch may use. OpenMP's default, spinning threads that wait for work,
# turns each of a step's hundred small operations into a wait for a descheduled thread once other
# processes compete for the cores (measured 10-20x slower on a busy 2-core machine); sleeping threads
# cost little when the machine is idle. OpenMP reads this once, when torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import GenerationResult, generate, generate_continuation, generate_stream
from .checkpoints import load_model
from .export import export
from .lm import LMConfig, TransformerLM
from .model import MusicGen

__all__ = [
    "GenerationResult",
    "LMConfig",
    "MusicGen",
    "TransformerLM",
    "export",
    "generate",
    "generate_continuation",
    "generate_stream",
    "load_model",
]
