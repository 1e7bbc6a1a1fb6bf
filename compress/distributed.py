"""Several processes sharing one verb's independent work with torch.distributed: started by `torchrun
--nproc-per-node N cli.py ...` (gloo on CPU; NCCL when every rank has a GPU). Every rank runs the same verb on the
same inputs; work that splits (distortion-table cells) is split by index and gathered, so every rank holds the same
result and rank 0 alone writes and prints. Without torchrun's environment this is one process and nothing changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def launched() -> bool:
    """True when torchrun (or anything setting WORLD_SIZE > 1) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun describes (once); nothing when not launched."""
    if not launched():
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)


def rank() -> int:
    """This process's rank (0 alone)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world() -> int:
    """How many processes share the work (1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def is_writer() -> bool:
    """Rank 0: the one process that writes outputs and prints."""
    return rank() == 0


def mine(n: int) -> list[int]:
    """The indices of n items this rank computes: those ≡ its rank (mod world); all of them alone."""
    return [i for i in range(n) if i % world() == rank()]


def gather(n: int, values: dict[int, R]) -> list[R]:
    """Every rank's {index: value} for the indices `mine(n)` gave it, merged into one list in index order, on every
    rank."""
    if world() == 1:
        return [values[i] for i in range(n)]
    import torch.distributed as dist

    init()
    parts: list[dict[int, R] | None] = [None] * world()
    dist.all_gather_object(parts, values)
    merged: dict[int, R] = {}
    for part in parts:
        merged.update(part or {})
    return [merged[i] for i in range(n)]


def map_split(items: Sequence[T], fn: Callable[[T], R]) -> list[R]:
    """`[fn(x) for x in items]`, each rank computing the items whose index ≡ its rank (mod world) and every rank
    receiving all results in order. Each item's result is computed exactly as one process would compute it, so the
    outcome does not depend on the number of ranks."""
    return gather(len(items), {i: fn(items[i]) for i in mine(len(items))})


def barrier() -> None:
    """Wait for every rank (nothing alone)."""
    if world() > 1:
        import torch.distributed as dist

        init()
        dist.barrier()


def finish() -> None:
    """Leave the process group (at the end of a verb)."""
    if world() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
