"""Sharding an audit across the processes `torchrun` starts (docs/architecture.md §7: no home-made launcher).

The process group and device come from `mishield.runtime.make_runtime`, the project's one
device policy. Each rank attacks its own share of the target classes; rank 0 gathers the
per-class outcomes and writes the one report. Nothing else crosses processes: the
initial-selection pool comes from the seed and the crops from hashed counters (`augment`), so a
class's reconstructions are the same whichever rank computes them.
"""

from __future__ import annotations

import torch.distributed as dist

from mishield.runtime import Runtime


def shard_classes(classes: list[int], runtime: Runtime) -> list[int]:
    """Round-robin, so every rank gets a similar mix of classes."""
    return classes[runtime.rank :: runtime.world]


def gather(obj: object, runtime: Runtime) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order); None on the other ranks."""
    if not runtime.distributed:
        return [obj]
    out = [None] * runtime.world if runtime.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: object, runtime: Runtime) -> object:
    """Rank 0's `obj` on every rank."""
    if not runtime.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
