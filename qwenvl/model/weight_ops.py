"""Weight-consuming operations with hand-written backward passes, for weights that are not used as stored.

Why these exist: MindSpore's autodiff keeps every tensor a forward op consumed until the backward pass
needs it. When a matmul consumes a *copy* of its weight rather than the Parameter itself (a float32 copy
on CPU, whose backend has no half-precision MatMul; a ZeRO-3 shard all-gathered to full size), autodiff
keeps one full-size copy per layer alive from the forward to the backward pass: 2-4 extra bytes per
parameter. These ops rebuild the weight in their backward pass instead, so at most one layer's copy
exists at a time. Every rebuild is also tied to the activation it serves with `ops.depend`: the graph
scheduler otherwise hoists all weight copies (they depend on no activation) to the start of the step.

A `WeightSource` says how a stored tensor becomes the full weight (`full`) and how the gradient of the
full weight becomes the gradient of the stored tensor (`grad`). `HalfOnCPU` is the CPU twin of Ascend's
native half-precision matmul; `qwenvl.parallel.zero3.ShardedWeight` gathers ZeRO-3 shards.
Weights used as stored (float32 anywhere, half precision on Ascend) take the plain ops and autodiff.
"""

from __future__ import annotations

from typing import Sequence

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from qwenvl.model.shared_cells import shared_cell

MATMUL_NT = ops.MatMul(transpose_b=True)
_MM_NN = ops.MatMul()
_MM_TN = ops.MatMul(transpose_a=True)


class WeightSource(nn.Cell):
    """How a stored tensor is read as a full weight of `shape` and how its gradient flows back; activations
    and gradients of the weight are in `compute_dtype` (the model's).

    `trainable` is read when the step compiles: a frozen weight gets no gradient computation at all
    (`sync_trainable` sets it from the Parameter's `requires_grad` before the training step compiles).
    """

    def __init__(self, shape: Sequence[int], compute_dtype: ms.Type) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.compute_dtype = compute_dtype
        self.trainable = True

    def full(self, stored, anchor, dtype):
        raise NotImplementedError

    def grad(self, dw, stored):
        raise NotImplementedError

    def config(self) -> tuple:
        """What decides `full` and `grad`: sources with equal configs compute the same things."""
        return (type(self), self.shape, self.compute_dtype, self.trainable)

    def twin(self) -> "WeightSource":
        """A new source of the same config (`shared_op`'s own, which no later `sync_trainable` changes)."""
        raise NotImplementedError


class HalfOnCPU(WeightSource):
    """A half-precision weight multiplied in float32 on CPU. MindSpore 2.7's CPU MatMul does take float16, but
    its kernels keep float32 working copies: measured, a float16 decoder layer's training step then holds
    3x the memory of a float32 one; this twin holds about 2x (the copy per matmul is transient)."""

    def full(self, stored, anchor, dtype):
        return ops.cast(ops.depend(stored, anchor), dtype).reshape(self.shape)

    def grad(self, dw, stored):
        return ops.cast(dw, stored.dtype).reshape(stored.shape)

    def twin(self) -> "HalfOnCPU":
        return HalfOnCPU(self.shape, self.compute_dtype)


@constexpr
def matmul_dtype(dtype: ms.Type) -> ms.Type:
    """The dtype a matmul runs in: the input's, except half precision on CPU, which runs in float32
    (a compile-time constant inside graphs)."""
    if dtype != ms.float32 and ms.get_context("device_target") == "CPU":
        return ms.float32
    return dtype


class SourcedMatmul(nn.Cell):
    """A product of x and W = source.full(stored), W rebuilt in the backward pass; subclasses say which
    product (`product`) and its two gradients (`input_grad`, `weight_grad`)."""

    def __init__(self, source: WeightSource) -> None:
        super().__init__()
        self.source = source

    def construct(self, x, stored):
        w = self.source.full(stored, x, matmul_dtype(x.dtype))
        return ops.cast(self.product(ops.cast(x, w.dtype), w), x.dtype)

    def bprop(self, x, stored, out, dout):
        w = self.source.full(stored, dout, matmul_dtype(x.dtype))
        g = ops.cast(dout, w.dtype)
        dx = ops.cast(self.input_grad(g, w), x.dtype)
        if not self.source.trainable:
            return dx, ops.zeros((), stored.dtype)
        dw = self.source.grad(self.weight_grad(g, ops.cast(x, w.dtype)), stored)
        # the input gradient waits for the weight gradient's final form, so its float32 / full-size version is
        # freed here rather than kept, for every layer, until the graph returns its outputs
        return ops.depend(dx, dw), dw


class MatmulNT(SourcedMatmul):
    """y = x W^T for 2-D x (W stored (out, in), as torch's Linear)."""

    def product(self, x, w):
        return MATMUL_NT(x, w)

    def input_grad(self, g, w):
        return _MM_NN(g, w)

    def weight_grad(self, g, x):
        return _MM_TN(g, x)


class Lookup(nn.Cell):
    """Rows `ids` of a (vocab, dim) table read through `source`, in the source's compute dtype; the backward
    pass scatters the row gradients into a table-sized gradient (accumulated in float32 on CPU)."""

    def __init__(self, source: WeightSource) -> None:
        super().__init__()
        self.source = source
        self.rows = int(source.shape[0])
        self.dim = int(source.shape[1])

    def construct(self, ids, stored):
        return ops.gather(self.source.full(stored, ids, self.source.compute_dtype), ids, 0)

    def bprop(self, ids, stored, out, dout):
        if not self.source.trainable:
            return ops.zeros_like(ids), ops.zeros((), stored.dtype)
        flat = ops.cast(dout, matmul_dtype(dout.dtype)).reshape(-1, self.dim)
        dw = ops.unsorted_segment_sum(flat, ids.reshape(-1), self.rows)
        return ops.zeros_like(ids), self.source.grad(dw, stored)


def shared_op(op_class: type, source: WeightSource) -> nn.Cell:
    """The `op_class(source)` cell for weights whose sources have `source`'s config, one for all of them
    (`shared_cells`). It gets a twin of the source with the same trainability, so a later `sync_trainable` on one
    weight never changes what another computes."""

    def make() -> nn.Cell:
        twin = source.twin()
        twin.trainable = source.trainable
        return op_class(twin)

    return shared_cell((op_class, source.config()), make)


def sourced_weights(model: nn.Cell) -> list[tuple[nn.Cell, str]]:
    """(layer, attribute) of every weight a layer of `model` can read through a source, each layer once.

    Layers opt in by defining `use_source(source, name)`, `source_of(name)` and `source_shape(name)`; the
    attributes are its `SOURCED` names (one `weight` for Linear, Embedding and the patch projection; the two
    fused expert tensors of a MoE layer)."""
    out, seen = [], set()
    for _, cell in model.cells_and_names():
        if hasattr(cell, "use_source") and id(cell) not in seen:
            seen.add(id(cell))
            out += [(cell, name) for name in cell.SOURCED]
    return out


def attach_sources(model: nn.Cell, make_source) -> int:
    """Give every sourced weight of `model` the source `make_source(param, shape)` returns (or None); returns how
    many got one."""
    count = 0
    for cell, name in sourced_weights(model):
        source = make_source(getattr(cell, name), cell.source_shape(name))
        if source is not None:
            cell.use_source(source, name)
            count += 1
    return count


def sync_trainable(model: nn.Cell) -> None:
    """Copy each sourced weight's `requires_grad` into its source before a training step compiles, and build the
    model's chunked loss for them (`lm_loss.ChunkedLossHead.prepare_loss`)."""
    for cell, name in sourced_weights(model):
        source = cell.source_of(name)
        if source is not None:
            source.trainable = bool(getattr(cell, name).requires_grad)
            cell.use_source(source, name)  # the op of the source's config as it is now
    if hasattr(model, "prepare_loss"):
        model.prepare_loss()
