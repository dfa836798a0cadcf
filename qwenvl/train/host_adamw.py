"""AdamW of the small float32 tensors on the CPU backend, computed by numpy in the tensors' own memory.

Why: on a small model the compiled update is launch-bound. Each tensor is one CPU kernel of a few microseconds,
but MindSpore's runtime leaves ~40 us between two of them (profiled: the 0.22 M model's 57 tensors take 7-11 ms
per step, 2 ms of it kernels), a third of what transformers + torch spends on the whole step there. Here the
small tensors are updated a chunk at a time: gradients and weights gathered into flat arrays, updated with torch's
AdamW maths in a dozen vectorised operations, and the weights written back where they are.

A CPU tensor's device memory is host memory, so numpy reads and writes it in place (`qwenvl.model.host_memory`,
whose compiled graph gives each Parameter its memory before every update). The gradients are only read,
so they are copied (`asnumpy`: small tensors), whatever made them. The moments are numpy arrays this class owns
(one flat array each). The tensors are float32 masters: weights that are their own (float32 on one rank, ZeRO-3
chunks), or a ZeRO rank's chunks of replicated weights, which `gather_parameters` all-gathers; every rank and a
single process so update a small tensor's elements with the same arithmetic. A half-precision weight on one rank
keeps its master in the compiled update, which also writes the weight back.

Memory: a chunk is whole tensors of one learning rate and weight decay (so both stay scalars) of at most `CHUNK`
elements, updated in three scratch arrays of the largest chunk's size, allocated once, so the work space does not
grow with the model. (One pass over all the tensors at once took ~6 temporaries of their total size: 0.6 bytes
per model parameter of peak on issue 10's configs, whose small tensors include every layer's k/v projections.)
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from mindspore import Parameter, Tensor

from qwenvl.model.host_memory import HostMemory

CHUNK = 2**18  # elements updated together: bounds the scratch arrays; numpy's per-call cost is negligible at this size


class _Chunk(NamedTuple):
    """Tensors `members` (indices into the parameters) at `start:stop` of the flat moments, sharing lr and decay."""

    members: tuple[int, ...]
    start: int
    stop: int
    lr: float
    weight_decay: float


def _chunks(sizes: Sequence[int], lrs: Sequence[float], weight_decays: Sequence[float], limit: int) -> list[_Chunk]:
    """Consecutive runs of tensors grouped by (lr, weight decay), each of at most `limit` elements (or one tensor)."""
    order = sorted(range(len(sizes)), key=lambda i: (lrs[i], weight_decays[i]))
    chunks: list[_Chunk] = []
    members: list[int] = []
    start = stop = 0
    for i in order:
        if members and ((lrs[i], weight_decays[i]) != (lrs[members[0]], weight_decays[members[0]])
                        or stop - start + sizes[i] > limit):  # fmt: skip
            chunks.append(_Chunk(tuple(members), start, stop, lrs[members[0]], weight_decays[members[0]]))
            members, start = [], stop
        members.append(i)
        stop += sizes[i]
    if members:
        chunks.append(_Chunk(tuple(members), start, stop, lrs[members[0]], weight_decays[members[0]]))
    return chunks


class HostAdamW:
    """`torch.optim.AdamW` over `params` (float32, CPU), each with its own learning rate and weight decay."""

    def __init__(self, params: Sequence[Parameter], lrs: Sequence[float], weight_decays: Sequence[float],
                 betas: tuple[float, float], eps: float, chunk: int = CHUNK) -> None:  # fmt: skip
        self.params = list(params)
        sizes = [int(p.size) for p in self.params]
        self.chunks = _chunks(sizes, [float(v) for v in lrs], [float(v) for v in weight_decays], chunk)
        self.start = [0] * len(self.params)
        for part in self.chunks:
            offset = part.start
            for i in part.members:
                self.start[i] = offset
                offset += sizes[i]
        self.sizes = sizes
        total = sum(sizes)
        self.exp_avg = np.zeros(total, np.float32)
        self.exp_avg_sq = np.zeros(total, np.float32)
        scratch = max((part.stop - part.start for part in self.chunks), default=0)
        self._grad, self._weight, self._work = (np.empty(scratch, np.float32) for _ in range(3))
        self.beta1, self.beta2 = np.float32(betas[0]), np.float32(betas[1])
        self.eps = np.float32(eps)
        self._memory = HostMemory(self.params)

    def moments(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of tensor `index`'s (exp_avg, exp_avg_sq), flat."""
        start, stop = self.start[index], self.start[index] + self.sizes[index]
        return self.exp_avg[start:stop], self.exp_avg_sq[start:stop]

    def step(self, grads: Sequence[Tensor], coef: float, lr_factor: float, bias_correction1: float,
             bias_correction2_sqrt: float) -> None:  # fmt: skip
        """One update from `grads` (in the parameters' order, float32 or float16) times `coef`."""
        if not self.params:
            return
        memory = self._memory.views()
        for part in self.chunks:
            size = part.stop - part.start
            grad, weight, work = self._grad[:size], self._weight[:size], self._work[:size]
            exp_avg, exp_avg_sq = self.exp_avg[part.start:part.stop], self.exp_avg_sq[part.start:part.stop]
            # read only, so copied whatever made them (small tensors); float16 at ZeRO-3 with half-precision compute
            np.concatenate([grads[i].asnumpy().reshape(-1) for i in part.members], out=grad)
            views = [memory[i] for i in part.members]
            np.concatenate(views, out=weight)
            if coef != 1.0:
                grad *= np.float32(coef)
            exp_avg *= self.beta1
            np.multiply(grad, np.float32(1.0) - self.beta1, out=work)
            exp_avg += work
            grad *= grad
            exp_avg_sq *= self.beta2
            grad *= np.float32(1.0) - self.beta2
            exp_avg_sq += grad
            if part.weight_decay:
                weight *= np.float32(1.0) - np.float32(lr_factor) * np.float32(part.lr) * np.float32(part.weight_decay)
            np.sqrt(exp_avg_sq, out=work)
            work *= np.float32(1.0 / bias_correction2_sqrt)
            work += self.eps
            np.divide(exp_avg, work, out=work)
            work *= np.float32(part.lr) * np.float32(lr_factor / bias_correction1)
            weight -= work
            offset = 0
            for view in views:
                view[:] = weight[offset:offset + view.size]
                offset += view.size
