"""Training checkpoints, one format for every trainer: checksummed, atomic, named RUN/checkpoints/step-N.pt.

    file = torch.save(state) payload + sha256(payload) (32 bytes) + b"MGLCKPT1"

written to a temporary name, fsynced and renamed, so a crash leaves the previous checkpoint intact
and a torn or corrupted file is recognised on reading (`CorruptCheckpoint`). `restore_latest` walks
back from the newest step to the newest checkpoint that reads and loads. A state also carries the
random streams of the process that wrote it (`rng_state`), so a resumed run draws what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from codebooks.audio import replacing

CHECKSUM_MAGIC = b"MGLCKPT1"


class CorruptCheckpoint(Exception):
    pass


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)


def write_checkpoint(state: dict, path: Path) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)
        f.write(writer.sha.digest() + CHECKSUM_MAGIC)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path) -> dict:
    data = path.read_bytes()
    if len(data) < 40 or data[-8:] != CHECKSUM_MAGIC:
        raise CorruptCheckpoint("truncated (no checksum trailer)")
    payload, digest = data[:-40], data[-40:-8]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpoint("checksum mismatch")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # a checksummed file that still does not load is just as unusable
        raise CorruptCheckpoint(f"unreadable ({type(e).__name__})") from None


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.pt"


def step_checkpoints(folder: Path) -> list[Path]:
    """step-*.pt, newest first."""
    return sorted(folder.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]), reverse=True)


def save_step(state: dict, folder: Path, step: int, keep: int) -> Path:
    """Write step-N.pt and delete all but the newest `keep` step checkpoints."""
    path = checkpoint_path(folder, step)
    write_checkpoint(state, path)
    for old in step_checkpoints(folder)[keep:]:
        old.unlink()
    return path


def link_best(folder: Path, step: int) -> None:
    """best.pt: the same bytes as step-N.pt (a hard link where the file system allows), renamed into place."""
    tmp = folder / ".best.pt.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(checkpoint_path(folder, step), tmp)
    except OSError:
        shutil.copyfile(checkpoint_path(folder, step), tmp)
    os.replace(tmp, folder / "best.pt")


def restore_latest(folder: Path, load: Callable[[dict], None], say: Callable[[str], None]) -> Path | None:
    """load() the newest checkpoint that reads and fits (load raises CorruptCheckpoint when it does not
    fit), saying why each newer one was passed over; None when there is none."""
    for path in step_checkpoints(folder):
        try:
            load(read_checkpoint(path))
            return path
        except CorruptCheckpoint as e:
            say(f"checkpoint {path.name} is corrupt ({e}); trying the previous one")
    return None


def all_finite(tensors: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
        "data": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    generator.set_state(state["data"])


def seed_everything(seed: int, generator: torch.Generator) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    generator.manual_seed(seed + 1)
