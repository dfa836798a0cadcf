"""Bucketed collectives over many tensors: the gradient and parameter traffic of data parallelism and ZeRO.

Tensors are grouped into buckets of about `bucket_elements` values (DeepSpeed's reduce_bucket_size), so
the only full-size flat buffer is one bucket, never the whole model. Reduce-scatter sends each rank the
sum of its chunk (`layout.ShardSpec`) of every tensor in the bucket; MindSpore's CPU backend has no
ReduceScatter kernel, so there it is an AllReduce of the bucket and a copy of the rank's row, which
computes the same values (the CPU twin); there a bucket is at most `CPU_BUCKET_ELEMENTS` values, because that
all-reduce and the copies around it touch several times the bucket's bytes. A tensor larger than a bucket is
reduce-scattered in several, by columns of its (world, chunk) rows. All-gather rebuilds full tensors from every
rank's chunks.

These run between compiled graphs, on the tensors the graphs return; `reduce_scatter_in_graph` is the
same reduction for use inside a compiled graph (ZeRO-3's backward pass).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.ops import constexpr

from qwenvl.parallel.layout import ShardSpec


@constexpr
def _on_ascend() -> bool:
    return ms.get_context("device_target") == "Ascend"


CPU_BUCKET_ELEMENTS = 1 << 22  # values per reduce-scatter on the CPU twin (module docstring)


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


def column_buckets(specs: Sequence[ShardSpec], bucket_elements: int) -> Iterator[list[tuple[int, int, int]]]:
    """Buckets of (tensor index, first column, end column) of the tensors' (world, chunk) rows, in order, each
    at most `bucket_elements` values (world x its columns, at least one column): a tensor larger than a bucket
    is cut by columns, so every piece of rank r's chunk is in rank r's row of its bucket."""
    cap = max(1, bucket_elements // max(1, specs[0].world)) if specs else 1
    group: list[tuple[int, int, int]] = []
    used = 0
    for index, spec in enumerate(specs):
        start = 0
        while start < spec.chunk:
            take = min(spec.chunk - start, cap - used)
            group.append((index, start, start + take))
            used += take
            start += take
            if used == cap:
                yield group
                group, used = [], 0
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
        for group in buckets([int(t.size) for t in tensors], self._limit()):
            flat = ops.cat([tensors[i].reshape(-1) for i in group])
            pieces = ops.split(ops.AllReduce()(flat), [int(tensors[i].size) for i in group])
            for i, piece in zip(group, pieces):
                out[i] = piece.reshape(tensors[i].shape)
        return out

    def reduce_scatter(self, tensors: Sequence[Tensor], specs: Sequence[ShardSpec]) -> list[Tensor]:
        """Each tensor summed over ranks, this rank's (chunk,) of it, bucket by bucket (`column_buckets`: a large
        tensor in several). On CPU the buckets are at most `CPU_BUCKET_ELEMENTS` values: there the reduce-scatter
        is an all-reduce of the whole bucket, and MindSpore's CPU AllReduce and the copies around it touch about
        13x a float16 bucket's bytes (measured: +868 MiB peak for one bucket of 32 Mi float16 values)."""
        if self.world == 1:
            return list(tensors)
        pieces: list[list[Tensor]] = [[] for _ in tensors]
        current, rows = -1, None  # the tensor being cut and its (world, chunk) rows; earlier tensors are done
        for group in column_buckets(specs, self._limit()):
            parts = []
            for i, start, end in group:
                if i != current:
                    current, rows = i, _rows(tensors[i], specs[i])
                parts.append(rows[:, start:end])
            block = ops.cat(parts, axis=1)  # (world, bucket columns)
            mine = reduce_scatter_in_graph(block.reshape(-1), self.world, self._rank_index)
            for (i, start, end), piece in zip(group, ops.split(mine, [end - start for _, start, end in group])):
                pieces[i].append(piece)
        return [p[0] if len(p) == 1 else ops.cat(p) for p in pieces]

    def all_gather(self, chunks: Sequence[Tensor], specs: Sequence[ShardSpec],
                   dtypes: Sequence[ms.Type] | None = None) -> Iterator[tuple[int, Tensor]]:  # fmt: skip
        """(index, full tensor in its spec's shape) for each tensor as soon as it is complete, from every rank's
        (chunk,) pieces cast to `dtypes[index]`, bucket by bucket as `reduce_scatter`. Only one bucket's gathered
        rows and the pieces of the tensor cut across buckets live at once, so the caller that writes each tensor
        where it belongs before taking the next holds no full copy of the model (MindSpore's CPU AllGather, like
        its AllReduce, touches several times its bytes)."""
        def piece(i: int, start: int, end: int) -> Tensor:
            flat = chunks[i].reshape(-1)[start:end]
            return flat if dtypes is None or flat.dtype == dtypes[i] else ops.cast(flat, dtypes[i])

        parts: list[Tensor] = []  # the pieces of the tensor being gathered
        for group in column_buckets(specs, self._limit()):
            rows = ops.AllGather()(ops.cat([piece(*cut) for cut in group])).reshape(self.world, -1)  # rank-major
            offset = 0
            for i, start, end in group:
                parts.append(rows[:, offset : offset + end - start])
                offset += end - start
                if end == specs[i].chunk:
                    full = (parts[0] if len(parts) == 1 else ops.cat(parts, axis=1)).reshape(-1)
                    parts = []
                    yield i, full[: specs[i].numel].reshape(specs[i].shape)

    def all_gather_on_host(self, sources: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                           specs: Sequence[ShardSpec]) -> None:  # fmt: skip
        """`all_gather` into host memory, for the CPU backend: `targets[i]` (flat, the tensor's values in its own
        dtype, e.g. a weight's memory) receives every rank's `sources[i]` (this rank's flat chunk), bucket by
        bucket. Besides the targets there is one bucket to send and one gathered, of the same size every bucket
        (MindSpore's pool reuses them): the PyNative pieces, concatenations and copies of `all_gather` grew the pool
        by ~1.3 bytes per parameter at ZeRO-2, and the next step's by as much again (BENCHMARKS.md)."""
        for group in column_buckets(specs, self._limit()):
            send = np.concatenate([sources[i][start:end].astype(targets[i].dtype, copy=False) for i, start, end in group])
            rows = ops.AllGather()(Tensor.from_numpy(send)).asnumpy().reshape(self.world, -1)  # rank-major
            offset = 0
            for i, start, end in group:
                spec = specs[i]
                for rank in range(self.world):  # rank r's columns start:end are values r * chunk + start.. of the tensor
                    first = rank * spec.chunk + start
                    count = min(end - start, spec.numel - first)
                    if count > 0:
                        targets[i][first : first + count] = rows[rank, offset : offset + count]
                offset += end - start

    def _limit(self) -> int:
        """Values per bucket: the configured size, at most `CPU_BUCKET_ELEMENTS` off Ascend."""
        if ms.get_context("device_target") == "Ascend":
            return self.bucket_elements
        return min(self.bucket_elements, CPU_BUCKET_ELEMENTS)
