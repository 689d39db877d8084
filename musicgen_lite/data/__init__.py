"""Offline builders for training data.

Kept apart from the model code: these modules need optional packages
(music21, mido, tinysoundfont and a SoundFont) that generation never uses,
and they import them lazily so the pure helpers stay usable without them.
"""
