"""AdamW of the small float32 tensors on the CPU backend, computed by numpy in the tensors' own memory.

Why: on a small model the compiled update is launch-bound. Each tensor is one CPU kernel of a few microseconds,
but MindSpore's runtime leaves ~40 us between two of them (profiled: the 0.22 M model's 57 tensors take 7-11 ms
per step, 2 ms of it kernels), a third of what transformers + torch spends on the whole step there. Here every
small tensor is updated at once: the gradients and weights are gathered into flat arrays, updated with torch's
AdamW maths in a dozen vectorised operations, and the weights written back where they are.

A CPU tensor's device memory is host memory, so numpy reads and writes it in place (`host_squares.host_view`).
A Parameter has that memory only once a graph has taken it as an input, and loses it to `set_data`; `_Prepare`, a
compiled graph over these Parameters, gives each one its memory before every update. The gradients are only read,
so they are copied (`asnumpy`: small tensors), whatever made them. The moments are numpy arrays
this class owns (one flat array each). The tensors are float32 masters: weights that are their own (float32 on
one rank, ZeRO-3 chunks), or a ZeRO rank's chunks of replicated weights, which `gather_parameters` all-gathers;
every rank and a single process so update a small tensor's elements with the same arithmetic. A half-precision
weight on one rank keeps its master in the compiled update, which also writes the weight back.
"""

from __future__ import annotations

from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from qwenvl.train.host_squares import host_view


class _Prepare(nn.Cell):
    """A graph over the Parameters: running it gives each one its device memory (the graph prepares its inputs)."""

    def __init__(self, params: Sequence[Parameter]) -> None:
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)

    def construct(self):
        return ops.depend(ops.zeros((), ms.float32), self.params)


class HostAdamW:
    """`torch.optim.AdamW` over `params` (float32, CPU), each with its own learning rate and weight decay."""

    def __init__(self, params: Sequence[Parameter], lrs: Sequence[float], weight_decays: Sequence[float],
                 betas: tuple[float, float], eps: float) -> None:  # fmt: skip
        self.params = list(params)
        self.sizes = [int(p.size) for p in self.params]
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes))).astype(np.int64)
        total = int(self.offsets[-1])
        self.exp_avg = np.zeros(total, np.float32)
        self.exp_avg_sq = np.zeros(total, np.float32)
        self.lr = np.repeat(np.asarray(lrs, np.float32), self.sizes)
        self.weight_decay = np.repeat(np.asarray(weight_decays, np.float32), self.sizes)
        self.decays = bool(np.any(self.weight_decay))
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self._prepare = ms.jit(_Prepare(self.params).construct) if self.params else None

    def moments(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of tensor `index`'s (exp_avg, exp_avg_sq), flat."""
        start, stop = self.offsets[index], self.offsets[index + 1]
        return self.exp_avg[start:stop], self.exp_avg_sq[start:stop]

    def step(self, grads: Sequence[Tensor], coef: float, lr_factor: float, bias_correction1: float,
             bias_correction2_sqrt: float) -> None:  # fmt: skip
        """One update from `grads` (in the parameters' order, float32 or float16) times `coef`."""
        if not self.params:
            return
        self._prepare()
        weights = [host_view(p) for p in self.params]
        # read only, so copied whatever made them (small tensors); float16 at ZeRO-3 with half-precision compute
        grad = np.concatenate([g.asnumpy().reshape(-1) for g in grads], dtype=np.float32)
        if coef != 1.0:
            grad *= np.float32(coef)
        self.exp_avg *= np.float32(self.beta1)
        self.exp_avg += np.float32(1.0 - self.beta1) * grad
        grad *= grad
        self.exp_avg_sq *= np.float32(self.beta2)
        self.exp_avg_sq += np.float32(1.0 - self.beta2) * grad
        weight = np.concatenate(weights)
        if self.decays:
            weight *= 1.0 - np.float32(lr_factor) * self.lr * self.weight_decay
        denominator = np.sqrt(self.exp_avg_sq)
        denominator *= np.float32(1.0 / bias_correction2_sqrt)
        denominator += np.float32(self.eps)
        update = self.exp_avg / denominator
        update *= self.lr
        update *= np.float32(lr_factor / bias_correction1)
        weight -= update
        for view, start, stop in zip(weights, self.offsets[:-1], self.offsets[1:]):
            view[:] = weight[start:stop]
