"""Audio files and safe writes: the reading, resampling and write-then-rename helpers every package shares.

The lowest module of the project: `codebooks`, `conditioning` and `musicgen_lite` import it, and it
imports none of them.

    read_audio(path, start, frames)   -> float [C, N] and the file's rate (one span, or the whole file)
    read_chunks(path, seconds)        -> consecutive float32 [C, N] chunks of a long file
    LazyAudio(path, rate)             -> a file seen as mono samples at `rate`, read a span at a time
    resample(wav, rate, target)       -> windowed-sinc resampling along the last axis (julius)
    replacing(path)                   -> a temporary name beside `path`, renamed onto it on success
    save_torch(obj, path)             -> torch.save through `replacing`
    move_entries(staged, dest)        -> a finished folder's files renamed into `dest`, config.json last
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import julius
import numpy as np
import soundfile as sf
import torch
from torch import Tensor

# What reading a damaged or unsupported file may raise.
READ_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, OSError, EOFError)


def read_audio(path: str | Path, start: int = 0, frames: int = -1, dtype: str = "float32") -> tuple[np.ndarray, int]:
    """Samples [start, start + frames) of an audio file (all from `start` when frames < 0) as
    [C, N] `dtype` and the file's sample rate."""
    data, rate = sf.read(str(path), start=start, frames=frames, dtype=dtype, always_2d=True)  # [N, C]
    return np.ascontiguousarray(data.T), rate


def audio_frames(path: str | Path) -> tuple[int, int]:
    """(samples per channel, sample rate) from an audio file's header."""
    info = sf.info(str(path))
    return info.frames, info.samplerate


def read_chunks(path: Path, chunk_seconds: float) -> Iterator[tuple[Tensor, int, int]]:
    """(wav [C, N] float32, sample rate, number of chunks) for consecutive chunks of at most
    `chunk_seconds`; raises one of READ_ERRORS for a file that cannot be read."""
    with sf.SoundFile(str(path)) as f:
        if f.frames <= 0:
            raise ValueError("no audio samples")
        size = max(1, int(chunk_seconds * f.samplerate))
        count = math.ceil(f.frames / size)
        for _ in range(count):
            data = f.read(size, dtype="float32", always_2d=True)  # [N, C]
            if data.shape[0] == 0:
                raise ValueError("file ends before its header says")
            yield torch.from_numpy(data.T.copy()), f.samplerate, count


def resample(wav: Tensor, rate: int, target: int) -> Tensor:
    """wav [..., N] at `rate` -> [..., N * target / rate] at `target` (julius' windowed sinc); unchanged
    when the rates agree."""
    return wav if rate == target else julius.resample_frac(wav, rate, target)


class LazyAudio:
    """One file on disk, read a span at a time (hours of audio need not fit in memory):
    len() and read() count samples at `sample_rate`, mono, whatever the file's own rate and channels."""

    def __init__(self, path: Path, sample_rate: int) -> None:
        frames, rate = audio_frames(path)
        if frames <= 0 or rate <= 0:
            raise ValueError("no samples")
        self.path, self.rate, self.sample_rate = path, rate, sample_rate
        self.frames = frames  # at the file's rate
        self.length = frames * sample_rate // rate

    def __len__(self) -> int:
        return self.length

    def read(self, start: int = 0, length: int | None = None) -> Tensor:
        """Samples [start, start + length) at `sample_rate` as a float32 tensor (shorter at the end)."""
        length = self.length - start if length is None else length
        first = start * self.rate // self.sample_rate
        count = -(-length * self.rate // self.sample_rate) + 1  # one spare frame for rounding
        data, _ = read_audio(self.path, first, count)  # [C, n]
        wav = torch.from_numpy(data).mean(dim=0).nan_to_num(0.0, 0.0, 0.0)
        return resample(wav, self.rate, self.sample_rate)[:length]


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A fresh temporary name beside `path`, renamed onto `path` when the block succeeds and removed
    when it fails, so readers see the old file or the whole new one, never a partial write.

    The file is created with the permissions a plain open() gives (mkstemp's are owner-only).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj: Any, path: Path) -> None:
    """torch.save(obj) to `path` through a temporary file and a rename."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def move_entries(staged: Path, dest: Path, last: str = "config.json") -> None:
    """Rename every entry of the folder `staged` into `dest` (what was there goes to a temporary folder
    that is then deleted), `last` at the end: a reader that finds `last` finds the rest complete."""
    trash = Path(tempfile.mkdtemp(prefix=".old-", dir=dest))
    names = sorted(p.name for p in staged.iterdir())
    for name in [n for n in names if n != last] + [n for n in names if n == last]:
        if (dest / name).exists():
            os.replace(dest / name, trash / name)
        os.replace(staged / name, dest / name)
    shutil.rmtree(trash)
