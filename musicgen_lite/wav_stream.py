"""Writing audio while it is generated: to a pipe as WAV, or to a file through a temporary name.

A pipe cannot be rewound, so a WAV sent to one carries its final size in the header, written first:

    "RIFF" <36 + data bytes> "WAVE"
    "fmt " <16> <format: 1 PCM / 3 float> <channels> <rate> <bytes/s> <bytes/frame> <bits>
    "data" <data bytes> <interleaved little-endian samples ...>

The size is known before the first sample from the requested duration (frames x hop samples), and the
chunks must add up to it exactly. A file path is written with soundfile (WAV or FLAC) under a temporary
name and renamed when the last chunk is in, as every output of this project is.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf

from codebooks.audio import replacing

from .audio_io import FORMATS

SAMPLE_FORMATS = {"PCM_16": (1, 16, "<i2"), "FLOAT": (3, 32, "<f4")}  # subtype -> (format tag, bits, dtype)


def wav_header(samples: int, channels: int, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """The 44-byte header of a WAV holding `samples` frames of `channels` channels."""
    tag, bits, _ = SAMPLE_FORMATS[subtype]
    block = channels * bits // 8
    data = samples * block
    return (
        b"RIFF" + struct.pack("<I", 36 + data) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, tag, channels, sample_rate, sample_rate * block, block, bits)
        + b"data" + struct.pack("<I", data)
    )


def wav_bytes(chunk: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """A whole WAV file, in memory, of one [C, n] float32 chunk (what a streaming web player takes)."""
    return wav_header(chunk.shape[1], chunk.shape[0], sample_rate, subtype) + _sample_bytes(chunk, subtype)


def _sample_bytes(chunk: np.ndarray, subtype: str) -> bytes:
    """[C, n] float32 -> interleaved little-endian samples (16-bit: clipped to [-1, 1], rounded)."""
    _, _, dtype = SAMPLE_FORMATS[subtype]
    frames = chunk.T
    if subtype == "PCM_16":
        frames = np.round(np.clip(frames, -1.0, 1.0) * 32767.0)
    return np.ascontiguousarray(frames, dtype=dtype).tobytes()


def _counted(chunks: Iterable[np.ndarray], samples: int, channels: int) -> Iterable[np.ndarray]:
    """The chunks, checked to be [channels, n] and to add up to exactly `samples`."""
    total = 0
    for chunk in chunks:
        if chunk.ndim != 2 or chunk.shape[0] != channels:
            raise ValueError(f"chunks must be [{channels}, samples], got shape {chunk.shape}")
        total += chunk.shape[1]
        if total > samples:
            raise ValueError(f"the chunks hold more than the {samples} samples announced")
        yield chunk
    if total != samples:
        raise ValueError(f"the chunks hold {total} samples, not the {samples} announced")


def stream_wav(out: BinaryIO, chunks: Iterable[np.ndarray], samples: int, sample_rate: int, channels: int, subtype: str = "PCM_16") -> None:
    """Write a WAV of exactly `samples` frames to `out` (e.g. stdout): the header at once, then each
    chunk as soon as it comes."""
    out.write(wav_header(samples, channels, sample_rate, subtype))
    out.flush()
    for chunk in _counted(chunks, samples, channels):
        out.write(_sample_bytes(chunk, subtype))
        out.flush()


def stream_file(path: str | Path, chunks: Iterable[np.ndarray], samples: int, sample_rate: int, channels: int, subtype: str = "PCM_16") -> Path:
    """Write the chunks to `path` (.wav or .flac) under a temporary name, renamed once all `samples` are in."""
    path = Path(path)
    with replacing(path) as tmp:
        with sf.SoundFile(tmp, "w", sample_rate, channels, subtype=subtype, format=FORMATS[path.suffix.lower()]) as f:
            for chunk in _counted(chunks, samples, channels):
                f.write(np.clip(chunk, -1.0, 1.0).T if subtype == "PCM_16" else chunk.T)
    return path
