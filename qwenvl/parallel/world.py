"""This process's place in the data-parallel world: process-group start under `msrun`, small collectives.

`msrun` starts every worker with `MS_ROLE=MS_WORKER` and `MS_WORKER_NUM` (plus `RANK_ID`/`RANK_SIZE`),
and one more copy of the script as the scheduler (`MS_ROLE=MS_SCHED`), whose `init()` serves the
cluster and exits the process when it ends; only under msrun is `mindspore.communication.init()`
called, so a plain `python` launch is a world of one and needs no process group (upstream's
`torch.distributed.get_rank()` fails there). The collectives are the
MindSpore ops, which run on CPU (MCCL) and Ascend (HCCL) alike; call `ms.set_device` before
`init_distributed` so the right backend is picked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import mindspore as ms
from mindspore import Tensor, ops

_STARTED: "DataParallel | None" = None


def launched_by_msrun() -> bool:
    """True inside a worker or the scheduler process that msrun started (both must call `init()`)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") and "MS_WORKER_NUM" in os.environ


def init_distributed() -> "DataParallel":
    """Start the process group once when launched by msrun; otherwise a single-process world."""
    global _STARTED
    if _STARTED is None:
        if launched_by_msrun():
            from mindspore.communication import get_group_size, get_rank, init

            init()
            _STARTED = DataParallel(rank=get_rank(), world_size=get_group_size())
        else:
            _STARTED = DataParallel()
    return _STARTED


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel world and the collectives the trainer needs.

    A `DataParallel(rank=r, world_size=w)` built by hand never touches the network unless a collective
    is called, which lets tests simulate ranks in one process.
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "DataParallel":
        return init_distributed()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Element-wise sums over ranks, fused into one float32 collective (one launch, not one per tensor)."""
        if self.world_size == 1:
            return list(tensors)
        flat = ops.cat([ops.cast(t, ms.float32).reshape(-1) for t in tensors])
        summed = ops.AllReduce()(flat)
        sizes = [int(t.size) for t in tensors]
        pieces = ops.split(summed, sizes)
        return [ops.cast(p.reshape(t.shape), t.dtype) for p, t in zip(pieces, tensors)]

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Concatenation along dim 0 of every rank's tensor (equal shapes), in rank order."""
        if self.world_size == 1:
            return tensor
        return ops.AllGather()(tensor)
