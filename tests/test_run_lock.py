"""One trainer per run folder: a second `train.py lm` / `train.py codec` on a folder in use refuses with
one line naming the folder and the other process; the lock of a killed run is taken over, and the rerun
resumes. The runs are real processes: forked children that train while the test process runs the
second command."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from musicgen_lite.training import lm as train_lm
from musicgen_lite.run_lock import LOCK_NAME, RunInUse, RunLock
from test_train_lm import FAST, data_dir  # noqa: F401, F811 (data_dir: a fixture)


def _run_single_threaded(main, argv: list[str]) -> int:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    return main(argv)


def _start_and_wait(main, argv: list[str], ready: Path) -> multiprocessing.Process:
    """A forked trainer, returned once `ready` exists (it has taken the lock and is training)."""
    child = multiprocessing.get_context("fork").Process(target=_run_single_threaded, args=(main, argv))
    child.start()
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert child.is_alive() and time.monotonic() < deadline, "the first run ended before it was under way"
        time.sleep(0.005)
    return child


def _kill(child: multiprocessing.Process) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL


@pytest.mark.slow
def test_a_second_lm_run_is_refused_and_a_killed_runs_lock_is_taken_over(tiny_musicgen_dir, data_dir, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    argv = [str(a) for a in ["--data", data_dir, "--out", run, "--model", tiny_musicgen_dir, "--max-steps", 30,
                             "--save-every", 4, "--eval-every", 1000, *FAST]]
    child = _start_and_wait(train_lm.main, argv, run / "checkpoints" / "step-00000004.pt")
    try:
        rows_before = (run / "log.csv").read_text()
        assert train_lm.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(run) in err and f"pid {child.pid}" in err and "train.py lm" in err, err
        assert child.is_alive() and (run / "log.csv").read_text().startswith(rows_before)  # the first run goes on
    finally:
        _kill(child)
    assert (run / LOCK_NAME).exists()  # a killed run cannot remove its lock file, but the kernel freed the lock
    assert train_lm.main(argv) == 0
    out = capsys.readouterr().out
    assert f"taking over the lock of a run that ended without releasing it (train.py lm, pid {child.pid}" in out
    assert any(line.startswith("resuming from step") for line in out.splitlines()), out
    assert not (run / LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
def test_a_second_codec_run_is_refused(tmp_path, capsys):
    from test_train_codec import TINY, write_dataset

    from musicgen_lite.training.codec import main

    data = write_dataset(tmp_path / "data", corrupt=False)
    run = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(run), *TINY, "--max-steps", "100000", "--log-every", "1", "--eval-every", "1000"]
    child = _start_and_wait(main, argv, run / "log.csv")
    try:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(run) in err and f"pid {child.pid}" in err and "train.py codec" in err, err
    finally:
        _kill(child)
    assert main([*argv[:-6], "--max-steps", "2", "--save-every", "1"]) == 0  # the killed run's lock is free
    assert "taking over the lock" in capsys.readouterr().out


def test_a_held_lock_refuses_a_second_holder_and_release_removes_it(tmp_path):
    first = RunLock(tmp_path, "train.py lm").acquire()
    try:
        RunLock(tmp_path, "train.py lm").acquire()
        raise AssertionError("a second lock on a held folder was granted")
    except RunInUse as e:
        assert f"pid {os.getpid()}" in str(e)
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path, "train.py lm").acquire().release()
