"""Conditioners for the LM: T5 text embeddings and chroma melody features (from a recording or a MIDI
file), plus their null versions."""

from conditioning.chroma import ChromaConditioner, ChromaExtractor, argmax_bottleneck, load_melody
from conditioning.midi_melody import midi_chroma
from conditioning.null import drop_conditions, null_chroma_features, null_text
from conditioning.text import T5Conditioner, train_sentencepiece_tokenizer

__all__ = [
    "ChromaConditioner",
    "ChromaExtractor",
    "T5Conditioner",
    "argmax_bottleneck",
    "drop_conditions",
    "load_melody",
    "midi_chroma",
    "null_chroma_features",
    "null_text",
    "train_sentencepiece_tokenizer",
]
