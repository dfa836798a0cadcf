"""AdamW with torch's maths as one fused in-place kernel per tensor, over float32 master copies ZeRO may shard.

The update is `torch.optim.AdamW` (decoupled decay, bias correction), computed by MindSpore's fused
`AdamWeightDecay` kernel, which updates weight and moments in place (no per-step temporaries beyond the
scaled gradient of the tensor being updated): with lr' = lr * sqrt(bc2) / bc1, eps' = eps * sqrt(bc2)
and decay' = decay * bc1 / sqrt(bc2) its `w - lr' * (m / (sqrt(v) + eps') + decay' * w)` is exactly
torch's `w * (1 - lr * decay) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`. Gradient unscaling and
clipping arrive as one coefficient multiplied into each gradient inside the same graph.

Master weights: a float32 parameter that this rank updates whole is its own master. Otherwise (half
precision weights, or ZeRO stages 1-3 where the rank updates a chunk of a replicated parameter) the
optimizer keeps a float32 master of its part, and the updated values go back to the model's parameter
(cast in the same graph, or all-gathered by `ZeroPartition.gather_parameters`). Every group follows one
LR schedule; the factor and bias corrections are Tensors, so the update compiles once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.ops.operations.inner_ops import FusedCastAdamWeightDecay

from qwenvl.model.device import on_cpu
from qwenvl.parallel.layout import ShardSpec
from qwenvl.parallel.world import DataParallel
from qwenvl.parallel.zero import Slot, ZeroConfig, ZeroPartition
from qwenvl.train.param_groups import ParamGroup

_ADAM = ops.AdamWeightDecay()
_CAST_ADAM = FusedCastAdamWeightDecay()
MIN_INV_COEF = 1e-10  # FusedCastAdamWeightDecay replaces a smaller global_norm by 1


def _owns_master(slot: Slot) -> bool:
    """The model's parameter is itself the float32 tensor this rank updates."""
    return slot.param.dtype == ms.float32 and (slot.sharded or slot.spec.world == 1)


class _FusedAdamW(nn.Cell):
    """The compiled update: one AdamW kernel per tensor, in order, then the half-precision copies back.

    On CPU the kernel is MindSpore's FusedCastAdamWeightDecay: it reads the gradient as it comes (float16 or
    float32) and scales it by 1 / `inv_coef` element by element. AdamWeightDecay (elsewhere) needs the scaled
    float32 gradient as a tensor: a temporary the size of each parameter, which at 120 M (a 311 MB embedding)
    left MindSpore's CPU memory pool ~1 GB larger from the next forward/backward pass on (measured)."""

    def __init__(self, masters, exp_avgs, exp_avg_sqs, lrs, wds, copies, copy_index, betas, eps) -> None:
        super().__init__(auto_prefix=False)
        self.masters = ParameterTuple(masters)
        self.exp_avg = ParameterTuple(exp_avgs)
        self.exp_avg_sq = ParameterTuple(exp_avg_sqs)
        self.copies = ParameterTuple(copies)
        self.copy_index = tuple(copy_index)
        self.lrs, self.wds = tuple(lrs), tuple(wds)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)

    def construct(self, coef, inv_coef, lr_factor, bias_correction1, bias_correction2_sqrt, *grads):
        step = lr_factor * bias_correction2_sqrt / bias_correction1
        eps = self.eps * bias_correction2_sqrt
        decay = bias_correction1 / bias_correction2_sqrt
        token = coef
        for i in range(len(self.masters)):
            lr, wd = step * self.lrs[i], decay * self.wds[i]
            if on_cpu():
                token = _CAST_ADAM(self.masters[i], self.exp_avg[i], self.exp_avg_sq[i], lr, self.beta1, self.beta2,
                                   eps, wd, ops.depend(grads[i], token), inv_coef)[0]  # fmt: skip
            else:  # each scaled gradient after the previous update: one temporary at a time, not one per tensor
                grad = ops.cast(ops.depend(grads[i], token), ms.float32) * coef
                token = _ADAM(self.masters[i], self.exp_avg[i], self.exp_avg_sq[i], lr, self.beta1, self.beta2,
                              eps, wd, grad)[0]  # fmt: skip
        for j in range(len(self.copies)):
            master = ops.depend(self.masters[self.copy_index[j]], token)
            token = ops.assign(self.copies[j], ops.cast(master, self.copies[j].dtype))
        return token


def _zeros(shape: tuple[int, ...], name: str) -> Parameter:
    """A float32 moment, allocated by MindSpore (no host array of the tensor's size on the way)."""
    return Parameter(ops.zeros(shape, ms.float32), name=name, requires_grad=False)


def _fp32_parameter(value: np.ndarray, name: str) -> Parameter:
    return Parameter(Tensor(np.ascontiguousarray(value, np.float32)), name=name, requires_grad=False)


class AdamW:
    """`torch.optim.AdamW` over a partition's slots; `step(grads, coef, lr_factor)` with grads in slot order."""

    def __init__(self, partition: ZeroPartition, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.partition = partition
        self.slots = partition.slots
        names = [slot.name for slot in self.slots]
        if len(set(names)) != len(names):
            raise ValueError("a parameter appears twice (or two share a name) across the optimizer groups")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.step_count = 0
        self.masters: list[Parameter] = []
        copies, copy_index = [], []
        for index, slot in enumerate(self.slots):
            if _owns_master(slot):
                self.masters.append(slot.param)
                continue
            value = slot.param.asnumpy().astype(np.float32)
            self.masters.append(_fp32_parameter(value if slot.sharded else slot.spec.take(value), f"master.{slot.name}"))
            if slot.spec.world == 1:
                copies.append(slot.param)
                copy_index.append(index)
        self.exp_avg = [_zeros(s.local_shape, f"exp_avg.{s.name}") for s in self.slots]
        self.exp_avg_sq = [_zeros(s.local_shape, f"exp_avg_sq.{s.name}") for s in self.slots]
        self._kernel = _FusedAdamW(self.masters, self.exp_avg, self.exp_avg_sq, [s.lr for s in self.slots],
                                   [s.weight_decay for s in self.slots], copies, copy_index, self.betas, self.eps)  # fmt: skip
        self._kernel_fn = ms.jit(self._kernel.construct)

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        """The model parameters whose gradients `step` takes, in order."""
        return tuple(slot.param for slot in self.slots)

    def step(self, grads: Sequence[Tensor], coef: float, lr_factor: float) -> None:
        """One update from the summed gradients (shaped like each slot's state) times `coef`."""
        if len(grads) != len(self.slots):
            raise ValueError(f"{len(grads)} gradients for {len(self.slots)} parameters")
        self.step_count += 1
        bc1 = 1.0 - self.betas[0] ** self.step_count
        bc2_sqrt = math.sqrt(1.0 - self.betas[1] ** self.step_count)
        if not MIN_INV_COEF <= 1.0 / coef:  # the CPU kernel takes a smaller inverse for 1 (no scaling)
            raise ValueError(f"gradient coefficient {coef} is too large for the fused update")
        scalars = (coef, 1.0 / coef, lr_factor, bc1, bc2_sqrt)
        # the gradients as separate inputs: cheaper to pass than a mutable tuple (~0.3 ms a call for 57 tensors)
        self._kernel_fn(*(Tensor(float(v), ms.float32) for v in scalars), *grads)
        self.partition.gather_parameters(self.masters)

    # ----- state ---------------------------------------------------------------------------------

    def owns_state_file(self) -> bool:
        """Whether this rank writes an optimizer file: every rank when state is partitioned, else rank 0."""
        return self.partition.partitioned or self.partition.dp.rank == 0

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """This rank's moments and separate masters (whole tensors, or chunks) and the layout metadata."""
        state = {"step": np.asarray(self.step_count, np.int64)}
        for slot, master, m, v in zip(self.slots, self.masters, self.exp_avg, self.exp_avg_sq):
            state[f"exp_avg.{slot.name}"] = m.asnumpy()
            state[f"exp_avg_sq.{slot.name}"] = v.asnumpy()
            if master is not slot.param or slot.sharded:  # a ZeRO-3 chunk is saved as weights in the model dtype
                state[f"master.{slot.name}"] = master.asnumpy()
        world = self.partition.dp.world_size if self.partition.partitioned else 1
        rank = self.partition.dp.rank if self.partition.partitioned else 0
        return state, {"zero_world": str(world), "zero_rank": str(rank)}

    def load_state_dict(self, state: "OptimizerState") -> None:
        """Moments (and masters where saved) from any layout: each tensor is rebuilt whole, then cut to this
        rank's part, so a run resumes at another ZeRO stage or world size. A missing master is taken from the
        (already loaded) weights."""
        self.step_count = int(state.scalar("step"))
        for slot, master, m, v in zip(self.slots, self.masters, self.exp_avg, self.exp_avg_sq):
            spec = slot.spec
            for target, key in ((m, f"exp_avg.{slot.name}"), (v, f"exp_avg_sq.{slot.name}")):
                target.set_data(Tensor(spec.take(state.full(key, spec)).reshape(target.shape), ms.float32))
            if (master is not slot.param or slot.sharded) and state.has(f"master.{slot.name}"):
                value = spec.take(state.full(f"master.{slot.name}", spec)).reshape(master.shape)
                master.set_data(Tensor(value, ms.float32))
                if master is not slot.param and slot.spec.world == 1:
                    slot.param.set_data(Tensor(value, slot.param.dtype))


class OptimizerState:
    """The optimizer files of a checkpoint (one per rank that owned state) read one tensor at a time."""

    def __init__(self, files: Sequence[Path]) -> None:
        from safetensors import safe_open

        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("no optimizer state files")
        self._layout: list[tuple[int, int, Path]] = []
        self._where: dict[str, list[Path]] = {}
        for path in self.files:
            with safe_open(str(path), "np") as handle:
                meta = handle.metadata() or {}
                world, rank = int(meta.get("zero_world", 0)), int(meta.get("zero_rank", 0))
                self._layout.append((world, rank, path))
                for key in handle.keys():
                    self._where.setdefault(key, []).append(path)
        worlds = {world for world, _, _ in self._layout}
        if len(worlds) != 1:
            raise ValueError(f"optimizer files of mixed layouts {sorted(worlds)}: {[str(f) for f in self.files]}")
        self.world = worlds.pop()
        if self.world > 1 and sorted(rank for _, rank, _ in self._layout) != list(range(self.world)):
            raise ValueError(f"optimizer state saved by {self.world} ranks but {len(self.files)} files found")

    def has(self, key: str) -> bool:
        return key in self._where

    def _read(self, path: Path, key: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(path), "np") as handle:
            return handle.get_tensor(key)

    def scalar(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"optimizer state has no {key!r}")
        return self._read(self._where[key][0], key)

    def full(self, key: str, spec: ShardSpec) -> np.ndarray:
        """The whole tensor `key` (of `spec.shape`), joined from the saving ranks' chunks if partitioned."""
        if key not in self._where:
            raise KeyError(f"optimizer state has no {key!r}")
        if self.world <= 1:  # saved whole (world of one, stage 0, or the whole-parameter ZeRO-1 of earlier versions)
            value = np.asarray(self._read(self._where[key][0], key), np.float32)
            if value.size != spec.numel:
                raise ValueError(f"{key}: saved {value.shape}, parameter has shape {spec.shape}")
            return value.reshape(spec.shape)
        saved = ShardSpec(spec.shape, self.world, 0)
        chunks = {rank: self._read(path, key) for _, rank, path in self._layout}
        if any(c.size != saved.chunk for c in chunks.values()):
            raise ValueError(f"{key}: saved chunks do not match parameter shape {spec.shape}")
        return saved.join([np.asarray(chunks[r], np.float32) for r in range(self.world)])


def save_optimizer_state(path: Path, state: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path), metadata=dict(metadata))


def build_optimizer(groups: Sequence[ParamGroup], args, dp: DataParallel | None = None, zero: ZeroConfig | None = None,
                    sharded: Mapping[str, ShardSpec] | None = None) -> AdamW:
    """AdamW over the groups' parameters, partitioned for the ZeRO stage (`sharded`: ZeRO-3's chunked weights).

    `--optim` adamw_torch is an alias of adamw_mindspore, adamw_zero1_mindspore of ZeRO stage 1.
    """
    if args.optim not in ("adamw_mindspore", "adamw_torch", "adamw_zero1_mindspore"):
        raise ValueError(f"unknown --optim {args.optim!r}")
    partition = ZeroPartition.build(groups, dp or DataParallel(), zero or ZeroConfig(), sharded)
    return AdamW(partition, (args.adam_beta1, args.adam_beta2), args.adam_epsilon)
