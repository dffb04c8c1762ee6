"""The training input path: this process's rows of every step, read ahead of the step that uses them.

The batch plan is a pure function of (seed, step) (:class:`sourceflow.train.loop.BatchPlan`), so the rows
of step s+1, s+2, ... are known while step s trains. :func:`step_rows` yields, per step, this process's
share of every micro-batch as CPU tensors, either in the training process (``workers: 0``, what small
in-memory datasets need) or from a ``torch.utils.data.DataLoader`` whose worker processes read Zarr rows,
normalise them and hand over ``prefetch`` steps ahead, in pinned memory on a GPU (so the copy to the device
overlaps the step). What a step trains on is the same either way: the rows, not their timing, are fixed
by the plan (tests/unit/test_train_input.py compares the weights bitwise).

``workers: auto`` reads with workers only when the data do not fit in memory (``StoreRows`` streamed from
Zarr): min(8, usable cores of this process's share of the machine - 1), at least 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch

from sourceflow.flow.couplings import Batch

Rows = tuple[torch.Tensor, torch.Tensor, Any, Any]  # x1, idx, cond, cls of one micro-batch share, on CPU


def streamed(data: Any) -> bool:
    """Whether any array of a training dataset is read from its store batch by batch (not held in memory)."""
    return any(getattr(t, "in_memory", True) is False or streamed_text(t) for t in (data.x, data.cond, data.cls))


def streamed_text(t: Any) -> bool:
    return hasattr(t, "tokens") and not (t.tokens.in_memory and t.mask.in_memory)


def resolve_workers(workers: int | str, data: Any, local_world: int | None = None) -> int:
    """``train.loader.workers`` as a number: ``auto`` is 0 for in-memory data, else a share of the cores."""
    if workers != "auto":
        return int(workers)
    if not streamed(data):
        return 0
    local_world = local_world or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(1, local_world) - 1))


class StepRows(torch.utils.data.Dataset):
    """Item ``s``: this process's rows (``local`` of each micro-batch of ``micro_b`` rows) of step ``s``."""

    def __init__(self, data: Any, plan: Any, micro_b: int, local: slice, accum: int):
        self.data, self.plan, self.micro_b, self.local, self.accum = data, plan, micro_b, local, accum

    def __len__(self) -> int:  # steps are addressed directly; the sampler says which
        return 2**62

    def __getitem__(self, step: int) -> list[Rows]:
        idx = self.plan.indices(step)
        out = []
        for m in range(self.accum):
            b = self.data.rows(idx[m * self.micro_b:(m + 1) * self.micro_b][self.local])
            out.append((b.x1, b.idx, b.cond, b.cls))
        return out


def _identity(item: Any) -> Any:
    return item


def step_rows(data: Any, plan: Any, micro_b: int, local: slice, accum: int, start: int, stop: int,
              workers: int = 0, prefetch: int = 4, pin_memory: bool = False) -> Iterator[list[Rows]]:
    """This process's rows of steps [start, stop), in order (see the module docstring)."""
    ds = StepRows(data, plan, micro_b, local, accum)
    if workers == 0:
        for s in range(start, stop):
            item = ds[s]
            yield [tuple(t.pin_memory() if pin_memory and torch.is_tensor(t) else t for t in r) for r in item]
        return
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(start, stop), num_workers=workers,
                                         prefetch_factor=prefetch, pin_memory=pin_memory, collate_fn=_identity,
                                         persistent_workers=False)
    it = iter(loader)
    try:
        yield from it
    finally:
        it._shutdown_workers()  # a stop signal or an error ends the loop early: no worker left behind


def to_device(rows: Rows, device: torch.device) -> Batch:
    """A micro-batch share on the training device (asynchronous from pinned memory)."""
    x1, idx, cond, cls = rows

    def move(t: Any) -> Any:
        return None if t is None else t.to(device, non_blocking=True)

    return Batch(move(x1), move(idx), move(cond), move(cls))
