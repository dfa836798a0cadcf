"""Sourced weight ops (`qwenvl.model.weight_ops`): one op cell per source configuration, shared by the weights
that have it, each weight still getting the gradient its own trainability says."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from qwenvl.model.layers import Linear, parameter_dtype, use_half_precision_on_cpu
from qwenvl.model.weight_ops import sync_trainable
from qwenvl.runtime import graph_mode


class _Chain(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        with parameter_dtype(ms.float16):
            self.a, self.b, self.c = Linear(8, 8, bias=False), Linear(8, 8, bias=False), Linear(8, 8, bias=False)

    def construct(self, x):
        return self.c(self.b(self.a(x))).sum()


def _chain(seed: int) -> tuple[_Chain, list[np.ndarray]]:
    net = _Chain()
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0.0, 0.5, (8, 8)).astype(np.float16) for _ in range(3)]
    for layer, w in zip((net.a, net.b, net.c), weights):
        layer.weight.set_data(Tensor(w))
    use_half_precision_on_cpu(net, ms.float16)
    return net, [w.astype(np.float64) for w in weights]


def test_same_config_weights_share_one_op_and_freezing_one_swaps_only_its_op():
    net, _ = _chain(0)
    assert net.a.op is net.b.op is net.c.op
    net.c.weight.requires_grad = False
    sync_trainable(net)
    assert net.a.op is net.b.op and net.c.op is not net.a.op
    assert net.a.op.source.trainable and not net.c.op.source.trainable
    assert net.a.source.trainable and not net.c.source.trainable  # each layer's own source says its own
    net.c.weight.requires_grad = True
    sync_trainable(net)
    assert net.a.op is net.b.op is net.c.op and net.c.op.source.trainable


def test_shared_ops_give_each_trainable_weight_its_own_gradient():
    net, (wa, wb, wc) = _chain(1)
    net.c.weight.requires_grad = False
    sync_trainable(net)
    x = np.random.default_rng(2).normal(0.0, 1.0, (5, 8))
    with graph_mode():
        grad_fn = ms.jit(ms.value_and_grad(net, None, [net.a.weight, net.b.weight]))
        loss, (ga, gb) = grad_fn(Tensor(x, ms.float32))
    # by hand, loss = sum(x A^T B^T C^T): with u = x A^T, v = u B^T, dL/dv = 1 C, dL/dB = (1 C)^T u, dL/du = 1 C B
    u = x @ wa.T
    v = u @ wb.T
    ones = np.ones((5, 8))
    dv = ones @ wc
    du = dv @ wb
    np.testing.assert_allclose(float(loss), (v @ wc.T).sum(), rtol=1e-3)
    np.testing.assert_allclose(gb.asnumpy().astype(np.float64), dv.T @ u, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(ga.asnumpy().astype(np.float64), du.T @ x, rtol=2e-2, atol=2e-2)
