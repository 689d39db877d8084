"""A training run's log: lines on stdout, rows in RUN/log.csv and, optionally, TensorBoard events.

    log.line("...")                  stdout (above a progress bar)
    log.row(step=10, train_loss=..)  one CSV row; numeric fields also become TensorBoard scalars
                                     (train_loss -> train/loss, val_ppl_0 -> val/ppl_0, lr -> lr)
    log.audio("valid/0", wav, sr, step)   a listening sample (TensorBoard only)

Only the main process of a torchrun job logs. A resumed run first drops the rows (and hides the
events) that a killed run wrote after its last checkpoint.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from codebooks.audio import replacing

from ..cli_errors import UsageError

TENSORBOARD_DIR = "tensorboard"
SCALAR_GROUPS = ("train", "val", "valid")


def require_tensorboard() -> None:
    """A UsageError naming the extra when TensorBoard's writer cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'musicgen_lite[tensorboard]'") from None


class RunLog:
    def __init__(self, path: Path, columns: list[str], enabled: bool = True, tensorboard: bool = False):
        self.enabled, self.path, self.columns = enabled, path, list(columns)
        self.tensorboard = tensorboard and enabled
        self.writer = None

    def start(self, step: int) -> None:
        """Keep the rows logged up to `step` (a killed run may have got further than its last
        checkpoint), write the header, and open the TensorBoard writer from `step` on."""
        if not self.enabled:
            return
        rows = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
        with replacing(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR), purge_step=step or None)

    def line(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def row(self, **fields) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({k: fields.get(k, "") for k in self.columns})
        if self.writer is not None:
            for key, value in fields.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(scalar_tag(key), value, fields["step"])

    def event(self, step: int, text: str) -> None:
        self.line(f"step {step}: {text}")
        self.row(step=step, event=text)

    def audio(self, tag: str, wav: Tensor, sample_rate: int, step: int) -> None:
        """wav [N] in [-1, 1] as a TensorBoard audio sample (nothing without --tensorboard)."""
        if self.writer is not None:
            self.writer.add_audio(tag, wav.detach().float().cpu().clamp(-1, 1)[None], step, sample_rate=sample_rate)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def scalar_tag(column: str) -> str:
    """train_loss -> train/loss: TensorBoard groups the charts by what comes before the slash."""
    group, _, rest = column.partition("_")
    return f"{group}/{rest}" if group in SCALAR_GROUPS and rest else column
