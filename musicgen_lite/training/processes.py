"""Where training runs: the device, torchrun's processes (data parallel) and the autocast precision.

    one process:          Dist(rank 0, world 1, device)
    torchrun -nproc N:    RANK / WORLD_SIZE / LOCAL_RANK from the environment, gloo on CPU, nccl on CUDA;
                          every process holds the whole model and 1/N of each batch
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..cli_errors import UsageError


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def resolve_device(name: str | None) -> torch.device:
    """--device: cpu, cuda, cuda:1, ...; None or "auto" = cuda when available, else cpu."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r} (try cpu, cuda, cuda:1 or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def setup_processes(device_name: str | None, batch_size: int) -> Dist:
    """One process, or one of torchrun's (RANK / WORLD_SIZE / LOCAL_RANK): gloo on CPU, nccl on CUDA."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    if batch_size % world:
        raise UsageError(f"--batch-size {batch_size} is not divisible by the {world} processes")
    return Dist(rank, world, device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def end_processes() -> None:
    """Leave torchrun's process group (nothing to do in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
