"""One runtime for every trainer and the attack: device, precision, the torchrun process group,
seeding and the data-loader worker rule.

`auto` picks CUDA when present; on CUDA the runtime enables bf16 autocast (where the GPU supports
it) and channels_last, which is where they pay off; on CPU both stay off so results are exact.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from mishield.errors import UsageError
from mishield.launch import torchrun_launch


@dataclass
class Runtime:
    """Where this process trains: device, precision, and its place in a torchrun job."""

    device: torch.device
    rank: int = 0
    world: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present."""
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text} asks for CUDA, but no CUDA device is available; use --device cpu.")
    return dev


def make_runtime(device: str | torch.device = "auto") -> Runtime:
    """Join the torchrun job if there is one (gloo on CPU, NCCL on CUDA) and pick this rank's device.

    Whether there is one is `mishield.launch.torchrun_launch`'s to say: a partial torchrun
    environment (a stray RANK) is a usage error, never a silent "rank 1 that writes nothing"."""
    launch = torchrun_launch()
    dev = resolve_device(device)
    owns = False
    rank, world = 0, 1
    if launch.distributed:
        if dev.type == "cuda":
            dev = torch.device("cuda", launch.local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            owns = True
        rank, world = dist.get_rank(), dist.get_world_size()
    amp = None
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        amp = torch.bfloat16
    return Runtime(dev, rank, world, amp, channels_last=dev.type == "cuda", owns_process_group=owns)


def seed_epoch(seed: int, epoch: int, rank: int) -> int:
    s = (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**31 - 1)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)
    return s


def default_workers(runtime: Runtime) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = max(1, cpus // max(1, runtime.world if runtime.device.type == "cuda" else 1))
    if runtime.device.type == "cuda":
        return min(8, per_rank)
    # On CPU the training step needs the cores; decoding in the main process is the better trade
    # on small machines.
    return 0 if per_rank <= 4 else min(4, per_rank // 4)


def autocast(runtime: Runtime):
    """bf16 autocast where the runtime enables it (CUDA); a no-op context elsewhere."""
    if runtime.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=runtime.amp_dtype)
