"""musicgen_lite: MusicGen-style music generation from text and hummed melodies."""

from .api import GenerationResult, generate, generate_continuation
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
    "load_model",
]
