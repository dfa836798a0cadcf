"""The fused MoE expert matmuls: grouped-matmul kernels, and the expert weights read through a `WeightSource`.

`Qwen3VLMoeTextExperts` multiplies in two ways: every expert on every token (a batched matmul, the CPU path)
or each token's rows by its own experts only (rows sorted by expert, `counts` rows per expert: a grouped
matmul, the Ascend path). The grouped kernels are Ascend's fused GroupedMatmul and its backward
(`AscendGroupedKernels`) or a twin computing the same by masks (`MaskedGroupedKernels`), which the tests run.

A weight read through a source (ZeRO-3 chunks gathered, half precision multiplied in float32 on CPU) goes
through `ExpertsMatmul` / `GroupedMatmul`, whose backward passes rebuild the weight instead of keeping the
forward's copy (`weight_ops` explains why): one MoE layer's expert tensors are whole at a time, and these are
most of a MoE model's weights.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.ops import constexpr
from mindspore.ops.function.math_func import gmm, gmm_backward, gmm_backward_fusion

from qwenvl.model.weight_ops import SourcedMatmul, WeightSource

_BMM = ops.BatchMatMul()
_BMM_NT = ops.BatchMatMul(transpose_b=True)
_BMM_TN = ops.BatchMatMul(transpose_a=True)


@constexpr
def _lower_triangle(n: int) -> Tensor:
    return Tensor(np.tril(np.ones((n, n), np.float32)))


@constexpr
def _row_index(rows: int) -> Tensor:
    return Tensor(np.arange(rows, dtype=np.float32)[None, :])


class AscendGroupedKernels(nn.Cell):
    """Ascend's GroupedMatmul (Atlas A2): rows of x (S, K) in consecutive groups of `counts` rows times
    weight[g] (G, K, N) -> (S, N); the backward kernel gives dx and dw (G, K, N), or dx alone."""

    def forward(self, x, weight, counts):
        return gmm([x], [weight], group_list=ops.cast(counts, ms.int64), group_type=0, group_list_type=1)[0]

    def backward(self, dout, x, weight, counts, weight_grad: bool):
        group_list = ops.cast(counts, ms.int64)
        if weight_grad:
            dx, dw, _ = gmm_backward([dout], [x], [weight], group_list, 1)
            return dx[0], dw[0]
        dx, _, _ = gmm_backward_fusion([dout], [weight], group_list, 1)
        return dx[0], None


class MaskedGroupedKernels(nn.Cell):
    """The CPU twin of `AscendGroupedKernels`: every group's product over all rows, each row keeping its own
    group's (G times the work; for tests)."""

    def _select(self, counts, rows: int, like):
        """(G, S, 1) 1.0 where row s belongs to group g: counts[:g] sum to at most s, counts[:g+1] to more.
        (Index constants from numpy: MindSpore 2.7 fails to compile ops.arange / ops.cumsum in a bprop.)"""
        ends = (_lower_triangle(counts.shape[0]) * ops.cast(counts, ms.float32)[None, :]).sum(1)  # (G,)
        starts = ends - ops.cast(counts, ms.float32)
        row = _row_index(rows)
        inside = ops.logical_and(row >= starts[:, None], row < ends[:, None])  # (G, S)
        return ops.cast(inside, like.dtype)[..., None]

    def forward(self, x, weight, counts):
        select = self._select(counts, x.shape[0], x)
        return (_BMM(ops.broadcast_to(x[None], (weight.shape[0],) + x.shape), weight) * select).sum(0)

    def backward(self, dout, x, weight, counts, weight_grad: bool):
        select = self._select(counts, x.shape[0], dout)
        picked = ops.broadcast_to(dout[None], (weight.shape[0],) + dout.shape) * select  # (G, S, N)
        dx = _BMM_NT(picked, weight).sum(0)
        if not weight_grad:
            return dx, None
        return dx, _BMM_TN(ops.broadcast_to(x[None], (weight.shape[0],) + x.shape), picked)


class ExpertsMatmul(SourcedMatmul):
    """(E, T, N) = x (E, T, K) times W (E, K, N) expert by expert."""

    def product(self, x, w):
        return _BMM(x, w)

    def input_grad(self, g, w):
        return _BMM_NT(g, w)

    def weight_grad(self, g, x):
        return _BMM_TN(x, g)


class GroupedMatmul(nn.Cell):
    """(S, N) = rows of x (S, K) grouped by `counts` times W[g] (G, K, N), W = source.full(stored), through
    `kernels`; the backward pass rebuilds W and runs the kernels' backward (dx only for a frozen W)."""

    def __init__(self, source: WeightSource, kernels: nn.Cell) -> None:
        super().__init__()
        self.source = source
        self.kernels = kernels

    def construct(self, x, counts, stored):
        w = self.source.full(stored, x, x.dtype)
        return self.kernels.forward(x, w, counts)

    def bprop(self, x, counts, stored, out, dout):
        w = self.source.full(stored, dout, x.dtype)
        if not self.source.trainable:
            dx, _ = self.kernels.backward(dout, x, w, counts, False)
            return dx, ops.zeros_like(counts), ops.zeros((), stored.dtype)
        dx, dw = self.kernels.backward(dout, x, w, counts, True)
        dw = self.source.grad(dw, stored)
        return ops.depend(dx, dw), ops.zeros_like(counts), dw
