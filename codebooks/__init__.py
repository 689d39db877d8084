"""Audio <-> discrete tokens: the EnCodec tokenizer and codebook interleaving patterns."""
from codebooks.codec import EncodecCodec
from codebooks.patterns import (
    CodebookPattern,
    CoarseFirstPattern,
    DelayPattern,
    FlatteningPattern,
    ParallelPattern,
    make_pattern,
)

__all__ = [
    "CodebookPattern",
    "CoarseFirstPattern",
    "DelayPattern",
    "EncodecCodec",
    "FlatteningPattern",
    "ParallelPattern",
    "make_pattern",
]
