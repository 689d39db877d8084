"""One trainer per run folder: an exclusive lock on RUN/.lock, held while a run writes there.

Two runs on one folder would each resume from the other's checkpoints and interleave their logs, so a
trainer takes the lock before it reads or writes anything in the folder, and a second one refuses
with one line naming the folder and the process that holds it. The lock is an advisory `flock` on
the file: the kernel drops it when its process ends in any way, so the lock of a killed run is free
and the next run takes it over (and says whose it was). Under torchrun only rank 0 takes it, for all
ranks. The file holds a description of its holder, for the message, and is removed on release.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunInUse(Exception):
    """Another live process holds the run folder."""


class RunLock:
    """The lock of one run folder (which must exist): `acquire()` takes it or raises RunInUse;
    `release()`, the end of the process or the object's collection gives it back."""

    def __init__(self, run: str | Path, holder: str):
        self.run = Path(run)
        self.path = self.run / LOCK_NAME
        self.holder = holder  # what the program is, e.g. "train.py lm"
        self.previous: str | None = None  # the holder of a lock taken over from a process that ended
        self._file = None

    def acquire(self) -> RunLock:
        while True:
            file = open(self.path, "a+")  # noqa: SIM115 (held open for as long as the lock is held)
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _read(file) or "another process"
                file.close()
                raise RunInUse(f"{self.run} is in use by another training run ({other}); "
                               "wait for it to end, or choose another --out") from None
            if _is_current(file, self.path):
                break
            file.close()  # the holder removed the file between our open and our lock: lock the new one
        self.previous = _read(file) or None
        file.seek(0)
        file.truncate()
        file.write(f"{self.holder}, pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        file.flush()
        self._file = file
        return self

    def __del__(self) -> None:  # a trainer that ends in an exception drops its lock with it
        self.release()

    def release(self) -> None:
        if self._file is None:
            return
        if _is_current(self._file, self.path):
            self.path.unlink()  # while still locked, so that no one locks a file that is about to go
        self._file.close()
        self._file = None


def _read(file) -> str:
    file.seek(0)
    return file.read().strip()


def _is_current(file, path: Path) -> bool:
    """Whether the open `file` is still the file at `path`."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False
