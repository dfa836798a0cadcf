"""Bucketed collectives over many tensors: the gradient and parameter traffic of data parallelism and ZeRO.

Tensors are grouped into buckets of about `bucket_elements` values (DeepSpeed's reduce_bucket_size), so
the only full-size flat buffer is one bucket, never the whole model. Reduce-scatter sends each rank the
sum of its chunk (`layout.ShardSpec`) of every tensor in the bucket; MindSpore's CPU backend has no
ReduceScatter kernel, so there it is an AllReduce of the bucket and a copy of the rank's row, which
computes the same values (the CPU twin). All-gather rebuilds full tensors from every rank's chunks.

These run between compiled graphs, on the tensors the graphs return; `reduce_scatter_in_graph` is the
same reduction for use inside a compiled graph (ZeRO-3's backward pass).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import mindspore as ms
from mindspore import Tensor, ops
from mindspore.ops import constexpr

from qwenvl.parallel.layout import ShardSpec


@constexpr
def _on_ascend() -> bool:
    return ms.get_context("device_target") == "Ascend"


def buckets(sizes: Sequence[int], bucket_elements: int) -> Iterator[list[int]]:
    """Consecutive index groups whose sizes add up to at most `bucket_elements` (a larger tensor alone)."""
    group: list[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if group and total + size > bucket_elements:
            yield group
            group, total = [], 0
        group.append(index)
        total += size
    if group:
        yield group


def _rows(tensor: Tensor, spec: ShardSpec) -> Tensor:
    """(world, chunk): the flattened tensor zero-padded and cut into the ranks' chunks."""
    flat = tensor.reshape(-1)
    if spec.padded != spec.numel:
        flat = ops.cat((flat, ops.zeros(spec.padded - spec.numel, flat.dtype)))
    return flat.reshape(spec.world, spec.chunk)


def reduce_scatter_in_graph(flat, world: int, rank_index):
    """Sum over ranks of a (world * chunk,) tensor, this rank's (chunk,) slice; usable inside a graph.

    `rank_index` is a scalar int32 Tensor holding this rank. The slice is a gathered copy: a slice view
    would keep the whole all-reduced buffer alive as long as the chunk lives.
    """
    if _on_ascend():
        return ops.ReduceScatter()(flat)
    summed = ops.AllReduce()(flat)
    return ops.gather(summed.reshape(world, -1), rank_index, 0)


class Collectives:
    """Bucketed all-reduce, reduce-scatter and all-gather for one data-parallel world."""

    def __init__(self, world: int, rank: int, bucket_elements: int) -> None:
        self.world = world
        self.rank = rank
        self.bucket_elements = max(1, int(bucket_elements))
        self._rank_index = Tensor(rank, ms.int32)

    def all_reduce(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Element-wise sums over ranks, bucket by bucket, in the tensors' own dtypes and shapes."""
        if self.world == 1:
            return list(tensors)
        out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        for group in buckets([int(t.size) for t in tensors], self.bucket_elements):
            flat = ops.cat([tensors[i].reshape(-1) for i in group])
            pieces = ops.split(ops.AllReduce()(flat), [int(tensors[i].size) for i in group])
            for i, piece in zip(group, pieces):
                out[i] = piece.reshape(tensors[i].shape)
        return out

    def reduce_scatter(self, tensors: Sequence[Tensor], specs: Sequence[ShardSpec]) -> list[Tensor]:
        """Each tensor summed over ranks, this rank's (chunk,) of it; the inputs can be dropped bucket by bucket."""
        if self.world == 1:
            return list(tensors)
        out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        for group in buckets([spec.padded for spec in specs], self.bucket_elements):
            block = ops.cat([_rows(tensors[i], specs[i]) for i in group], axis=1)  # (world, bucket chunk)
            mine = reduce_scatter_in_graph(block.reshape(-1), self.world, self._rank_index)
            for i, piece in zip(group, ops.split(mine, [specs[i].chunk for i in group])):
                out[i] = piece
        return out

    def all_gather(self, chunks: Sequence[Tensor], specs: Sequence[ShardSpec]) -> list[Tensor]:
        """Full tensors (their spec's shape) from every rank's (chunk,) pieces."""
        if self.world == 1:
            return [c.reshape(s.shape) for c, s in zip(chunks, specs)]
        out: list[Tensor] = [None] * len(chunks)  # type: ignore[list-item]
        for group in buckets([spec.padded for spec in specs], self.bucket_elements):
            mine = ops.cat([chunks[i].reshape(-1) for i in group])
            rows = ops.AllGather()(mine).reshape(self.world, -1)  # rank-major
            offset = 0
            for i in group:
                spec = specs[i]
                full = rows[:, offset : offset + spec.chunk].reshape(-1)
                out[i] = full[: spec.numel].reshape(spec.shape)
                offset += spec.chunk
        return out
