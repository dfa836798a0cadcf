"""ZeRO stages 0-3: which part of every trainable parameter this rank updates, and how gradients and
updated values travel between ranks.

- stage 0: every rank keeps the whole optimizer state; gradients are all-reduced (bucketed).
- stage 1: the optimizer state (float32 master and moments) is partitioned: each rank updates its chunk
  of every parameter (`layout.ShardSpec`) from the reduce-scattered gradients of the step, then the
  updated chunks are all-gathered into the (replicated) parameters.
- stage 2: as stage 1, but gradients are reduce-scattered after every micro-batch and accumulated as
  chunks, so no rank holds a whole gradient across micro-batches.
- stage 3: large weights are themselves partitioned (`zero3.shard_weights`): gathered inside the
  compiled step, their gradients arrive already reduce-scattered; the rest follows stage 2.

One layout for every stage keeps optimizer files interchangeable between stages (and world sizes).
Collectives are bucketed (`collectives.Collectives`); MindSpore's CPU backend runs the same code with
its ReduceScatter twin, which is what the tests run under msrun.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mindspore as ms
from mindspore import Parameter, Tensor, ops

from qwenvl.errors import FlagError
from qwenvl.model.device import on_cpu
from qwenvl.model.host_memory import HostMemory
from qwenvl.parallel.collectives import Collectives
from qwenvl.parallel.layout import ShardSpec
from qwenvl.parallel.world import DataParallel

DEFAULT_BUCKET_ELEMENTS = 1 << 25  # 32 Mi values: 128 MiB of float32 gradients per collective
DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default


@dataclass(frozen=True)
class ZeroConfig:
    stage: int = 0
    bucket_elements: int = DEFAULT_BUCKET_ELEMENTS
    persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise FlagError(f"ZeRO stage must be 0, 1, 2 or 3, not {self.stage}")


def _setting(section: dict, key: str, default: int) -> int:
    value = section.get(key, default)
    return default if value in (None, "auto") else int(float(value))


def read_deepspeed_config(path: str | Path) -> ZeroConfig:
    """The ZeRO settings of a DeepSpeed JSON config (upstream's zero2.json / zero3.json): the stage, the
    reduce bucket size and the stage-3 persistence threshold; "auto" means our default."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FlagError(f"--deepspeed {path}: cannot read it as JSON ({exc})") from exc
    section = raw.get("zero_optimization") or {}
    return ZeroConfig(
        stage=_setting(section, "stage", 0),
        bucket_elements=_setting(section, "reduce_bucket_size", DEFAULT_BUCKET_ELEMENTS),
        persistence_threshold=_setting(section, "stage3_param_persistence_threshold", DEFAULT_PERSISTENCE_THRESHOLD),
    )


def zero_config(args) -> tuple[ZeroConfig, str | None]:
    """The ZeRO settings from `--zero_stage`, `--deepspeed` and the legacy `--optim adamw_zero1_mindspore`,
    and a message saying where the stage came from (None when nothing was asked for)."""
    stage = getattr(args, "zero_stage", None)
    deepspeed = getattr(args, "deepspeed", None)
    legacy = getattr(args, "optim", "") == "adamw_zero1_mindspore"
    config = read_deepspeed_config(deepspeed) if deepspeed else ZeroConfig()
    if stage is not None:
        if deepspeed and config.stage != stage:
            raise FlagError(f"--zero_stage {stage} contradicts --deepspeed {deepspeed} (stage {config.stage})")
        config = ZeroConfig(stage, config.bucket_elements, config.persistence_threshold)
    elif legacy:
        config = ZeroConfig(1, config.bucket_elements, config.persistence_threshold)
    if deepspeed:
        return config, (f"--deepspeed {deepspeed}: ZeRO stage {config.stage} (qwenvl.parallel, bucket "
                        f"{config.bucket_elements} values, persistence threshold {config.persistence_threshold})")
    if stage is not None or legacy:
        return config, f"ZeRO stage {config.stage}"
    return config, None


@dataclass
class Slot:
    """One trainable parameter as the optimizer sees it on this rank."""

    name: str
    param: Parameter
    spec: ShardSpec  # the part of the parameter's values this rank updates
    sharded: bool  # the Parameter itself holds only this rank's chunk (ZeRO-3)
    lr: float
    weight_decay: float

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape) if self.sharded else self.spec.local_shape


@dataclass
class ZeroPartition:
    """The slots of every trainable parameter and the stage's gradient and parameter traffic."""

    slots: list[Slot]
    dp: DataParallel
    config: ZeroConfig
    comm: Collectives = field(init=False)
    _host_memory: tuple = field(init=False, default=(), repr=False)  # (masters' ids, their and the weights' memory)

    def __post_init__(self) -> None:
        self.comm = Collectives(self.dp.world_size, self.dp.rank, self.config.bucket_elements)

    @classmethod
    def build(cls, groups, dp: DataParallel, config: ZeroConfig, sharded: dict[str, ShardSpec] | None = None):
        """Slots in parameter-group order; `sharded` is what `zero3.shard_weights` returned."""
        sharded = sharded or {}
        partitioned = config.stage >= 1 and dp.world_size > 1
        slots = []
        for group in groups:
            for param in group.params:
                if param.name in sharded:
                    spec, is_sharded = sharded[param.name], True
                elif partitioned:
                    spec, is_sharded = ShardSpec(tuple(param.shape), dp.world_size, dp.rank), False
                else:
                    spec, is_sharded = ShardSpec(tuple(param.shape)), False
                slots.append(Slot(param.name, param, spec, is_sharded, group.lr, group.weight_decay))
        return cls(slots, dp, config)

    @property
    def partitioned(self) -> bool:
        """Each rank holds different gradient and optimizer-state chunks (so norms sum over ranks)."""
        return self.config.stage >= 1 and self.dp.world_size > 1

    def _to_scatter(self) -> list[int]:
        return [i for i, slot in enumerate(self.slots) if not slot.sharded]

    def _reduce_scatter(self, grads: Sequence[Tensor], indices: Sequence[int] | None = None) -> list[Tensor]:
        """Replicated parameters' gradients reduce-scattered to chunks; ZeRO-3 chunks are already reduced.
        `grads[k]` is slot `indices[k]`'s (every slot by default)."""
        indices = range(len(self.slots)) if indices is None else indices
        picked = [k for k, i in enumerate(indices) if not self.slots[i].sharded]
        chunks = self.comm.reduce_scatter([grads[k] for k in picked], [self.slots[indices[k]].spec for k in picked])
        out = list(grads)
        for k, chunk in zip(picked, chunks):
            out[k] = chunk
        return out

    def reduce_part(self, indices: Sequence[int], grads: Sequence[Tensor]) -> list[Tensor]:
        """Some slots' gradients as `micro_batch` would pass them on: at stages 2-3 reduce-scattered now (a
        layer-by-layer backward pass hands over each layer's, so no rank holds every whole gradient at once)."""
        if not (self.partitioned and self.config.stage >= 2):
            return list(grads)
        return self._reduce_scatter(grads, indices)

    def zero_part(self, indices: Sequence[int]) -> list[Tensor]:
        """What `reduce_part` returns for those slots' gradients when they are zero on every rank, made here with
        no collective: a layer-by-layer backward pass on a micro-batch no rank ran the vision tower on."""
        reduced = self.partitioned and self.config.stage >= 2
        return [ops.zeros(self.slots[i].local_shape if reduced else tuple(self.slots[i].param.shape),
                          self.slots[i].param.dtype) for i in indices]  # fmt: skip

    def micro_batch(self, accumulated: list[Tensor] | None, grads: Sequence[Tensor],
                    reduced: bool = False) -> list[Tensor]:  # fmt: skip
        """Add one micro-batch's gradients (as the backward pass returned them, or already through
        `reduce_part` when `reduced`) to the accumulation."""
        grads = list(grads)
        if self.partitioned and self.config.stage >= 2 and not reduced:
            grads = self._reduce_scatter(grads)
        if accumulated is None:
            return grads
        return [a + g for a, g in zip(accumulated, grads)]

    def step_gradients(self, accumulated: list[Tensor]) -> list[Tensor]:
        """The summed gradients of the step, shaped like each slot's state (whole, or this rank's chunk)."""
        if self.dp.world_size == 1:
            return accumulated
        if not self.partitioned:
            return self.comm.all_reduce(accumulated)
        if self.config.stage == 1:
            return self._reduce_scatter(accumulated)
        return accumulated

    def gather_parameters(self, masters: Sequence[Parameter]) -> None:
        """Write every rank's updated chunks back into the replicated parameters (stages 1-3)."""
        picked = [i for i in self._to_scatter() if self.slots[i].spec.world > 1]
        if not picked:
            return
        specs = [self.slots[i].spec for i in picked]
        if on_cpu():  # numpy into the weights' own memory: no PyNative temporaries for the memory pool to keep
            key = tuple(id(masters[i]) for i in picked)
            if not self._host_memory or self._host_memory[0] != key:
                self._host_memory = (key, HostMemory([masters[i] for i in picked]),
                                     HostMemory([self.slots[i].param for i in picked]))  # fmt: skip
            sources, targets = (memory.views() for memory in self._host_memory[1:])
            self.comm.all_gather_on_host(sources, targets, specs)
            return
        gathered = self.comm.all_gather([masters[i] for i in picked], specs, [self.slots[i].param.dtype for i in picked])
        for k, full in gathered:  # each written before the next is gathered: no full copy of the model
            ops.assign(self.slots[picked[k]].param, full)

    def sum_over_ranks(self, value: float) -> float:
        """A per-rank partial sum (e.g. squared gradient norm) totalled over ranks when state is partitioned."""
        if not self.partitioned:
            return value
        (total,) = self.dp.all_reduce_sum([Tensor(value, ms.float32)])
        return float(total)
