"""ZeRO-3: each large weight lives on every rank as one chunk, gathered layer by layer inside the compiled step.

`shard_weights` replaces every weight a layer reads through a `WeightSource` (Linear, PatchProjection,
Embedding, the LoRA-wrapped Linear, the fused MoE expert tensors) with this rank's chunk (`ShardSpec`),
and gives the layer a `ShardedWeight`: the forward pass all-gathers the full weight right before the
matmul or lookup that uses it, the backward pass gathers it again instead of keeping it, and the weight
gradient is reduce-scattered straight back to the chunk (`weight_ops` explains why). Peak weight memory
is therefore one layer's full weights on top of the chunks.

A trainable chunk is stored in float32 and is itself the optimizer's master copy (no second copy); it
is cast to the compute dtype before the gather, so half-precision runs move half the bytes. Frozen
chunks are stored in the compute dtype. Weights smaller than the persistence threshold (DeepSpeed's
`stage3_param_persistence_threshold`), norms and biases stay whole on every rank and follow ZeRO-2.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from qwenvl.model.layers import with_idle_image
from qwenvl.model.weight_ops import WeightSource, sourced_weights
from qwenvl.parallel.collectives import reduce_scatter_in_graph
from qwenvl.parallel.layout import ShardSpec
from qwenvl.parallel.world import DataParallel


class ShardedWeight(WeightSource):
    """A weight held as one chunk per rank: `full` all-gathers it, `grad` reduce-scatters its gradient."""

    def __init__(self, shape: tuple[int, ...], spec: ShardSpec, compute_dtype: ms.Type) -> None:
        super().__init__(shape, compute_dtype)
        self.spec = spec
        self.numel = spec.numel
        self.padding = spec.padded - spec.numel
        self.world = spec.world
        self.gather = ops.AllGather()
        self.rank_index = Tensor(spec.rank, ms.int32)

    def full(self, stored, anchor, dtype):
        flat = self.gather(ops.cast(ops.depend(stored, anchor), self.compute_dtype))
        if self.padding:
            flat = flat[: self.numel]
        return ops.cast(flat.reshape(self.shape), dtype)

    def grad(self, dw, stored):
        flat = ops.cast(dw, self.compute_dtype).reshape(-1)
        if self.padding:
            flat = ops.cat((flat, ops.zeros(self.padding, flat.dtype)))
        return reduce_scatter_in_graph(flat, self.world, self.rank_index)

    def config(self) -> tuple:
        return super().config() + (self.spec,)

    def twin(self) -> "ShardedWeight":
        return ShardedWeight(self.shape, self.spec, self.compute_dtype)


@dataclass(frozen=True)
class ShardedWeights:
    """The weights `shard_weights` cut into chunks (`model.zero3`), and how to read one whole again."""

    specs: dict[str, ShardSpec]
    dtype: ms.Type  # the model's compute dtype: whole weights are gathered (and saved) in it

    def gather(self, name: str, chunk: Parameter) -> np.ndarray:
        """The whole tensor from every rank's chunk: a collective every rank calls, in the same order."""
        spec = self.specs[name]
        rows = ops.AllGather()(ops.cast(chunk, self.dtype)).asnumpy().reshape(spec.world, spec.chunk)
        return spec.join(list(rows))


def shard_weights(model: nn.Cell, world: int, rank: int, threshold: int, from_values: bool) -> ShardedWeights:
    """Replace large layer weights by this rank's chunks; records and returns what was sharded as `model.zero3`.

    `from_values` takes each chunk from the weight's current values (a loaded model); otherwise chunks
    are left to be filled by `qwenvl.model.load_weights`, which reads `model.zero3` (a model built empty,
    so no rank ever holds a whole copy).
    """
    done: dict[int, tuple[Parameter, ShardSpec]] = {}
    for cell, name in sourced_weights(model):
        param = getattr(cell, name)
        if int(param.size) < threshold:
            continue
        if id(param) not in done:
            spec = ShardSpec(tuple(param.shape), world, rank)
            dtype = ms.float32 if param.requires_grad else param.dtype
            chunk = Parameter(initializer("zeros", (spec.chunk,), dtype), name=param.name,
                              requires_grad=param.requires_grad)  # fmt: skip
            if from_values:
                chunk.set_data(Tensor(spec.take(param.asnumpy().astype(np.float32)), dtype))
            done[id(param)] = (chunk, spec)
        chunk, spec = done[id(param)]
        setattr(cell, name, chunk)
        cell.use_source(ShardedWeight(cell.source_shape(name), spec, model.compute_dtype), name)
    for name, param in model.parameters_and_names():
        param.name = name
    model.zero3 = ShardedWeights({chunk.name: spec for chunk, spec in done.values()}, model.compute_dtype)
    return model.zero3


def _has_vision(batch: dict) -> bool:
    return batch.get("pixel_values") is not None or batch.get("pixel_values_videos") is not None


def align_vision(dp: DataParallel, model: nn.Cell, batches: list[dict], reduces_vision: bool = False) -> list[dict]:
    """The micro-batches (collated, numpy) a rank feeds its steps, each text-only one given an idle image when
    another rank's micro-batch at that position has vision input and the ranks' collectives depend on it: the
    vision weights are ZeRO-3 chunks, or `reduces_vision` (`TrainStep.reduces_vision_per_micro_batch`: a
    layer-by-layer step reduce-scatters vision gradients only where the vision tower ran).

    A compiled step gathers each sharded weight where it is used and reduce-scatters its gradient: ranks must
    issue the same collectives in the same order, so a rank whose micro-batch skips the vision tower while
    another runs it would pair its text layers' gathers with the other's vision ones (MindSpore's CPU
    AllGather fails on the size mismatch). One all-reduce of a flag per micro-batch, per step, settles it; the
    idle image adds zero to every gradient (`qwenvl.model.layers.with_idle_image`).
    """
    zero3 = getattr(model, "zero3", None)
    sharded = zero3 is not None and any(n.startswith("model.visual.") for n in zero3.specs)
    if dp.world_size == 1 or not (sharded or reduces_vision):
        return batches
    mine = np.asarray([_has_vision(b) for b in batches], np.float32)
    (anywhere,) = dp.all_reduce_sum([Tensor(mine)])
    return [with_idle_image(b, model.merge, model.patch_values) if n > 0 and not has else b
            for b, n, has in zip(batches, anywhere.asnumpy(), mine)]  # fmt: skip
