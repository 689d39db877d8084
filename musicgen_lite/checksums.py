"""A model directory's checksum manifest: the sha256 of every file, written on save and checked on load.

A flipped byte in the middle of a weights file leaves a valid file that loads and plays noise; only a
checksum notices it. `MusicGen.save_pretrained` writes `checksums.sha256` in `sha256sum`'s format
(`<hex>  <relative path>` per line, so `sha256sum -c checksums.sha256` run inside the directory checks
it too), and loading verifies every file it lists before reading any. Directories without a manifest
(transformers' checkpoints, older saves) load unverified.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "checksums.sha256"
CHUNK = 1 << 22


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """List every file under `directory` (the manifest itself excepted) with its sha256."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{sha256(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    (directory / MANIFEST).write_text("".join(lines))


def verify_manifest(directory: str | Path) -> None:
    """Check every file the manifest lists, if there is one; one line naming the first file that differs."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return
    for number, line in enumerate(manifest.read_text(errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{manifest} is corrupt: line {number} is not '<sha256>  <file>'")
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{directory} is not a complete model directory: {name} is missing")
        if sha256(path) != digest.lower():
            raise ValueError(
                f"{path} is corrupt: its sha256 differs from the one in {MANIFEST} "
                f"(if you changed it on purpose, delete {MANIFEST} to load it unverified)"
            )
