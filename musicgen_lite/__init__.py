"""musicgen_lite: MusicGen-style music generation from text and hummed melodies."""

import os

# OpenMP threads that finish an operation wait for the next one. Sleeping at once (OMP_WAIT_POLICY=PASSIVE)
# costs each of a small model's short step operations a wake-up: on 2 idle cores two threads were then
# 2.4x slower than one. Long spins (GNU OpenMP's default of 300,000 iterations, or ACTIVE) make the steps
# of a busy machine wait for descheduled spinners (up to 20x slower). 10,000 iterations keep the threads
# awake between a step's operations and let them sleep between steps and when the cores are contended
# (measured in benchmarks/RESULTS.md). GNU OpenMP reads this once, when torch is first imported; a
# setting of the user's wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

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
