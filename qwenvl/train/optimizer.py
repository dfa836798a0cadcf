"""AdamW with torch's maths, and its ZeRO-1 form that shards the moments over data-parallel ranks.

The update is `torch.optim.AdamW` (decoupled decay, bias correction), unlike mindone's
`AdamWeightDecay` which has no bias correction. Master weights: the model's Parameters themselves stay
float32 and the models cast to the bf16/fp16 compute dtype inside their cells, so the optimizer only
ever sees fp32 parameters, gradients and moments (no separate master copy to keep in sync).

Every group follows one LR schedule: a step takes the schedule factor as a Tensor, and bias corrections
come in as Tensors too, so the compiled update is built once.

ZeRO-1 (`--optim adamw_zero1_mindspore`): whole parameters are assigned to ranks (largest first, each to
the least-loaded rank, a deterministic greedy balance); a rank keeps moments only for its own
parameters, updates them from the all-reduced gradients, then every rank's updated parameters are
all-gathered in one flat buffer. Element-wise AdamW makes this equal to the unsharded update.
"""

from __future__ import annotations

import math
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from qwenvl.train.distributed import DataParallel
from qwenvl.train.param_groups import ParamGroup


def _adamw_update(beta1, beta2, eps, lr_factor, bias_correction1, bias_correction2_sqrt, lr, weight_decay, param, exp_avg, exp_avg_sq, grad):
    """One parameter's torch AdamW step (decay first, then the bias-corrected Adam step)."""
    lr_t = lr * lr_factor
    decayed = param * (1.0 - lr_t * weight_decay) if weight_decay != 0.0 else param
    exp_avg_new = exp_avg + (1.0 - beta1) * (grad - exp_avg)
    exp_avg_sq_new = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    denom = ops.sqrt(exp_avg_sq_new) / bias_correction2_sqrt + eps
    ops.assign(exp_avg, exp_avg_new)
    ops.assign(exp_avg_sq, exp_avg_sq_new)
    ops.assign(param, decayed - (lr_t / bias_correction1) * exp_avg_new / denom)
    return True


def _scalar(value: float | Tensor) -> Tensor:
    return ops.cast(value, ms.float32) if isinstance(value, Tensor) else Tensor(float(value), ms.float32)


class _AdamWKernel(nn.Cell):
    """The compiled update over one list of parameters, their moments and per-parameter lr / decay."""

    def __init__(self, params: Sequence[Parameter], lrs: Sequence[float], wds: Sequence[float], betas: tuple[float, float], eps: float) -> None:
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        self.exp_avg = ParameterTuple([self._zeros(p, "exp_avg") for p in params])
        self.exp_avg_sq = ParameterTuple([self._zeros(p, "exp_avg_sq") for p in params])
        self.lrs = tuple(lrs)
        self.wds = tuple(wds)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.hyper_map = ops.HyperMap()

    @staticmethod
    def _zeros(param: Parameter, prefix: str) -> Parameter:
        return Parameter(Tensor(np.zeros(param.shape, np.float32)), name=f"{prefix}.{param.name}", requires_grad=False)

    @ms.jit
    def construct(self, grads, lr_factor, bias_correction1, bias_correction2_sqrt):
        update = ops.partial(_adamw_update, self.beta1, self.beta2, self.eps, lr_factor, bias_correction1, bias_correction2_sqrt)
        return self.hyper_map(update, self.lrs, self.wds, self.params, self.exp_avg, self.exp_avg_sq, grads)


class AdamW:
    """`torch.optim.AdamW` over parameter groups; `step(grads, lr_factor)` with grads in `parameters` order."""

    def __init__(self, groups: Sequence[ParamGroup], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.groups = list(groups)
        self.parameters: tuple[Parameter, ...] = tuple(p for g in self.groups for p in g.params)
        self._lrs = [g.lr for g in self.groups for _ in g.params]
        self._wds = [g.weight_decay for g in self.groups for _ in g.params]
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError("a parameter appears twice (or two share a name) across the optimizer groups")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.step_count = 0
        self._kernel = self._build_kernel(self._owned_indices())

    def _owned_indices(self) -> list[int]:
        """Indices into `parameters` whose moments this process keeps and updates."""
        return list(range(len(self.parameters)))

    def _build_kernel(self, indices: list[int]) -> _AdamWKernel | None:
        if not indices:
            return None
        return _AdamWKernel(
            [self.parameters[i] for i in indices], [self._lrs[i] for i in indices], [self._wds[i] for i in indices], self.betas, self.eps
        )

    def _update(self, grads: Sequence[Tensor], lr_factor: float | Tensor) -> None:
        """Advance the step count and update the parameters this kernel owns."""
        self.step_count += 1
        if self._kernel is None:
            return
        bc1 = 1.0 - self.betas[0] ** self.step_count
        bc2_sqrt = math.sqrt(1.0 - self.betas[1] ** self.step_count)
        self._kernel(
            ms.mutable(tuple(grads)),
            _scalar(lr_factor),
            _scalar(bc1),
            _scalar(bc2_sqrt),
        )

    def step(self, grads: Sequence[Tensor], lr_factor: float | Tensor) -> None:
        if len(grads) != len(self.parameters):
            raise ValueError(f"{len(grads)} gradients for {len(self.parameters)} parameters")
        self._update(grads, lr_factor)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Moments keyed `exp_avg.<param name>` / `exp_avg_sq.<param name>` and the step count."""
        state = {"step": np.asarray(self.step_count, np.int64)}
        if self._kernel is not None:
            for moment in (*self._kernel.exp_avg, *self._kernel.exp_avg_sq):
                state[moment.name] = moment.asnumpy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Load moments by name; any extra entries (another rank's ZeRO shard) are ignored."""
        self.step_count = int(state["step"])
        if self._kernel is None:
            return
        for moment in (*self._kernel.exp_avg, *self._kernel.exp_avg_sq):
            if moment.name not in state:
                raise KeyError(f"optimizer state has no {moment.name!r}")
            value = np.asarray(state[moment.name], np.float32)
            if value.shape != tuple(moment.shape):
                raise ValueError(f"{moment.name}: saved shape {value.shape} != {tuple(moment.shape)}")
            moment.set_data(Tensor(value))


def assign_shards(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Parameter indices per rank: largest first to the least-loaded rank (ties: lower index, lower rank)."""
    loads = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owned[rank].append(index)
        loads[rank] += sizes[index]
    return [sorted(indices) for indices in owned]


class ZeRO1AdamW(AdamW):
    """AdamW whose moments live only on the rank that owns each parameter (see the module docstring)."""

    def __init__(self, groups: Sequence[ParamGroup], dp: DataParallel, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.dp = dp
        self.owned: list[list[int]] = []
        self._shard_numel = 0
        super().__init__(groups, betas, eps)

    def _owned_indices(self) -> list[int]:
        sizes = [int(p.size) for p in self.parameters]
        self.owned = assign_shards(sizes, self.dp.world_size)
        self._shard_numel = max(sum(sizes[i] for i in indices) for indices in self.owned)
        return self.owned[self.dp.rank]

    def update_shard(self, grads: Sequence[Tensor], lr_factor: float | Tensor) -> Tensor:
        """Update this rank's parameters; returns them flattened and zero-padded to the common shard size."""
        if len(grads) != len(self.parameters):
            raise ValueError(f"{len(grads)} gradients for {len(self.parameters)} parameters")
        mine = self.owned[self.dp.rank]
        self._update([grads[i] for i in mine], lr_factor)
        pieces = [self.parameters[i].reshape(-1) for i in mine]
        used = sum(int(self.parameters[i].size) for i in mine)
        pieces.append(ops.zeros(self._shard_numel - used, ms.float32))
        return ops.cat(pieces)

    def apply_gathered(self, gathered: Tensor) -> None:
        """Write the other ranks' updated parameters from the all-gathered (world * shard) buffer.

        `ops.assign` copies into each Parameter's own memory: `set_data` with slices of a collective's
        output left compiled graphs reading invalid memory under msrun (NaN losses on the next step).
        """
        shards = gathered.reshape(self.dp.world_size, self._shard_numel)
        for rank, indices in enumerate(self.owned):
            if rank == self.dp.rank:
                continue
            offset = 0
            for i in indices:
                param = self.parameters[i]
                numel = int(param.size)
                ops.assign(param, shards[rank, offset : offset + numel].reshape(param.shape))
                offset += numel

    def step(self, grads: Sequence[Tensor], lr_factor: float | Tensor) -> None:
        self.apply_gathered(self.dp.all_gather(self.update_shard(grads, lr_factor)))


def build_optimizer(groups: Sequence[ParamGroup], args, dp: DataParallel | None = None) -> AdamW:
    """The optimizer `--optim` names (adamw_torch is an alias of adamw_mindspore)."""
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optim in ("adamw_mindspore", "adamw_torch"):
        return AdamW(groups, betas, args.adam_epsilon)
    if args.optim == "adamw_zero1_mindspore":
        return ZeRO1AdamW(groups, dp or DataParallel(), betas, args.adam_epsilon)
    raise ValueError(f"unknown --optim {args.optim!r}")
