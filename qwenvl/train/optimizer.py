"""AdamW with torch's maths as one fused in-place kernel per tensor, over float32 master copies ZeRO may shard.

The update is `torch.optim.AdamW` (decoupled decay, bias correction). On Ascend MindSpore's fused
`AdamWeightDecay` kernel computes it, updating weight and moments in place (no per-step temporaries beyond the
scaled gradient of the tensor being updated): with lr' = lr * sqrt(bc2) / bc1, eps' = eps * sqrt(bc2)
and decay' = decay * bc1 / sqrt(bc2) its `w - lr' * (m / (sqrt(v) + eps') + decay' * w)` is exactly
torch's `w * (1 - lr * decay) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`. Gradient unscaling and
clipping arrive as one coefficient multiplied into each gradient inside the same graph. On CPU two kernels
take the coefficient without a scaled gradient tensor (`_FusedAdamW`, `_MomentScale`), and the float32 masters of
small tensors are updated by numpy where they lie (`host_adamw`: no kernel launches), except those a world-1
half-precision weight is copied back from.

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

from qwenvl.model.checkpoint_io import LazyTensors, write_tensor_file
from qwenvl.model.device import on_cpu
from qwenvl.parallel.layout import ShardSpec
from qwenvl.parallel.world import DataParallel
from qwenvl.parallel.zero import Slot, ZeroConfig, ZeroPartition
from qwenvl.train.host_adamw import HostAdamW
from qwenvl.train.param_groups import ParamGroup

_ADAM = ops.AdamWeightDecay()
_CAST_ADAM = FusedCastAdamWeightDecay()
_CPU_ADAM = ops.Adam()
_DECAY = ops.ApplyGradientDescent()
MIN_INV_COEF = 1e-10  # FusedCastAdamWeightDecay replaces a smaller global_norm by 1
LARGE_TENSOR = 2**18  # float32 tensors from this many elements take the scaled-moment Adam kernel on CPU


def _owns_master(slot: Slot) -> bool:
    """The model's parameter is itself the float32 tensor this rank updates."""
    return slot.param.dtype == ms.float32 and (slot.sharded or slot.spec.world == 1)


class _FusedAdamW(nn.Cell):
    """The compiled update: one AdamW kernel per tensor (`_update`), in order, then the half-precision copies back.

    On CPU a tensor takes one of two MindSpore kernels, neither of which needs the scaled gradient as a tensor
    (AdamWeightDecay, used elsewhere, does: a temporary the size of each parameter, which at 120 M (a 311 MB
    embedding) left MindSpore's CPU memory pool ~1 GB larger from the next forward/backward pass on, measured):

    - FusedCastAdamWeightDecay reads the gradient as it comes (float16 or float32) and scales it by 1 / `inv_coef`
      element by element, in one thread (~2.5 ns per element here);
    - float32 tensors of LARGE_TENSOR elements or more (`scaled`) take the Adam kernel, multi-threaded and about
      5x faster, after an in-place decoupled decay (ApplyGradientDescent of the weight by itself: w - lr wd w).
      It has no gradient scale, so their moments are kept divided by running scales (`_MomentScale`).
    """

    def __init__(self, masters, exp_avgs, exp_avg_sqs, lrs, wds, copies, copy_masters, betas, eps, scaled) -> None:
        super().__init__(auto_prefix=False)
        self.masters = ParameterTuple(masters)
        self.exp_avg = ParameterTuple(exp_avgs)
        self.exp_avg_sq = ParameterTuple(exp_avg_sqs)
        self.copies = ParameterTuple(copies)
        self.copy_masters = ParameterTuple(copy_masters)
        self.lrs, self.wds, self.scaled = tuple(lrs), tuple(wds), tuple(scaled)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)

    def construct(self, coef, inv_coef, lr_factor, bias_correction1, bias_correction2_sqrt, scaled_step, scaled_beta1,
                  scaled_beta2, scaled_eps, *grads):  # fmt: skip
        step = lr_factor * bias_correction2_sqrt / bias_correction1
        eps = self.eps * bias_correction2_sqrt
        decay = bias_correction1 / bias_correction2_sqrt
        token = coef
        for i in range(len(self.masters)):  # in order: a device kernel's temporaries one tensor at a time
            token = _update(step, eps, decay, coef, inv_coef, lr_factor, scaled_step, scaled_beta1, scaled_beta2,
                            scaled_eps, self.beta1, self.beta2, self.lrs[i], self.wds[i], self.scaled[i],
                            self.masters[i], self.exp_avg[i], self.exp_avg_sq[i], ops.depend(grads[i], token))
        for j in range(len(self.copies)):  # one half-precision cast alive at a time
            token = _copy_back(token, self.copies[j], self.copy_masters[j])
        return token


def _update(step, eps, decay, coef, inv_coef, lr_factor, scaled_step, scaled_beta1, scaled_beta2, scaled_eps, beta1,
            beta2, lr, wd, scaled, master, exp_avg, exp_avg_sq, grad):  # fmt: skip
    """One tensor's update. A function rather than the loop's body: MindSpore parses a function once, a loop body
    per tensor, and keeps what it parsed (~490 KB of host memory per tensor in the body, ~130 KB as a call)."""
    if scaled:  # CPU, float32 tensors of LARGE_TENSOR elements or more
        if wd:
            grad = ops.depend(grad, _DECAY(master, lr_factor * lr * wd, master))
        no_power = ops.zeros((), ms.float32)  # the Adam kernel's own bias correction off: it is in scaled_step
        return _CPU_ADAM(master, exp_avg, exp_avg_sq, no_power, no_power, scaled_step * lr, scaled_beta1,
                         scaled_beta2, scaled_eps, grad)[0]  # fmt: skip
    if on_cpu():
        return _CAST_ADAM(master, exp_avg, exp_avg_sq, step * lr, beta1, beta2, eps, decay * wd, grad, inv_coef)[0]
    return _ADAM(master, exp_avg, exp_avg_sq, step * lr, beta1, beta2, eps, decay * wd,
                 ops.cast(grad, ms.float32) * coef)[0]  # fmt: skip


def _copy_back(after, copy, master):
    """The half-precision model weight from its updated float32 master (after `after`)."""
    return ops.assign(copy, ops.cast(ops.depend(master, after), copy.dtype))


class _MomentScale:
    """The running scales of the moments the Adam kernel keeps for unscaled gradients.

    torch's AdamW sees the gradient c_t g_t (c_t: unscaling x clipping, new every step): m_t = b1 m_{t-1} +
    (1 - b1) c_t g_t, and v_t likewise with c_t^2 g_t^2. The kernel stores m~ = m / k and v~ = v / q with
    k_t = b1 k_{t-1} + (1 - b1) c_t and q_t = b2 q_{t-1} + (1 - b2) c_t^2: then m~_t = b1' m~_{t-1} + (1 - b1') g_t
    with b1' = b1 k_{t-1} / k_t (and v~ with b2' = b2 q_{t-1} / q_t), the kernel's own recurrence on g_t. The update
    lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps) is lr / bc1 * sqrt(bc2) * k / sqrt(q) * m~ / (sqrt(v~) + eps'), with
    eps' = eps * sqrt(bc2) / sqrt(q): the kernel's form. The scales are exact host floats; no tensor is rescaled.
    """

    def __init__(self, betas: tuple[float, float]) -> None:
        self.betas = betas
        self.m, self.v = 0.0, 0.0

    def advance(self, coef: float) -> tuple[float, float]:
        """Move to the next step's scales; the kernel's (beta1, beta2) for it."""
        beta1, beta2 = self.betas
        m = beta1 * self.m + (1.0 - beta1) * coef
        v = beta2 * self.v + (1.0 - beta2) * coef * coef
        kernel_betas = (beta1 * self.m / m, beta2 * self.v / v)
        self.m, self.v = m, v
        return kernel_betas


def _zeros(shape: tuple[int, ...], name: str) -> Parameter:
    """A float32 moment, allocated by MindSpore (no host array of the tensor's size on the way)."""
    return Parameter(ops.zeros(shape, ms.float32), name=name, requires_grad=False)


def _fp32_parameter(value: np.ndarray, name: str) -> Parameter:
    return Parameter(Tensor(np.ascontiguousarray(value, np.float32)), name=name, requires_grad=False)


class AdamW:
    """`torch.optim.AdamW` over a partition's slots; `step(grads, coef, lr_factor)` with grads in slot order."""

    def __init__(self, partition: ZeroPartition, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 large_tensor: int = LARGE_TENSOR) -> None:  # fmt: skip
        self.partition = partition
        self.slots = partition.slots
        names = [slot.name for slot in self.slots]
        if len(set(names)) != len(names):
            raise ValueError("a parameter appears twice (or two share a name) across the optimizer groups")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.step_count = 0
        self.masters: list[Parameter] = []
        copies, copy_masters = [], []
        for slot in self.slots:
            if _owns_master(slot):
                self.masters.append(slot.param)
                continue
            value = slot.param.asnumpy().astype(np.float32)
            self.masters.append(_fp32_parameter(value if slot.sharded else slot.spec.take(value), f"master.{slot.name}"))
            if slot.spec.world == 1:
                copies.append(slot.param)
                copy_masters.append(self.masters[-1])
        # by the whole tensor's size, so every rank of a ZeRO partition treats a tensor alike
        self.scaled = [on_cpu() and s.param.dtype == ms.float32 and s.spec.numel >= large_tensor for s in self.slots]
        # the masters a half-precision weight is copied back from in the compiled update stay there with it
        self.on_host = [on_cpu() and not scaled and (_owns_master(s) or s.spec.world > 1)
                        for s, scaled in zip(self.slots, self.scaled)]  # fmt: skip
        host = [i for i, on_host in enumerate(self.on_host) if on_host]
        self._host = HostAdamW([self.masters[i] for i in host], [self.slots[i].lr for i in host],
                               [self.slots[i].weight_decay for i in host], self.betas, self.eps)  # fmt: skip
        self._host_index = {slot: k for k, slot in enumerate(host)}
        self._in_kernel = [i for i, on_host in enumerate(self.on_host) if not on_host]
        self.exp_avg = {i: _zeros(self.slots[i].local_shape, f"exp_avg.{self.slots[i].name}") for i in self._in_kernel}
        self.exp_avg_sq = {i: _zeros(self.slots[i].local_shape, f"exp_avg_sq.{self.slots[i].name}")
                           for i in self._in_kernel}  # fmt: skip
        self.moment_scale = _MomentScale(self.betas)
        kernel = self._in_kernel
        self._kernel = _FusedAdamW([self.masters[i] for i in kernel], [self.exp_avg[i] for i in kernel],
                                   [self.exp_avg_sq[i] for i in kernel], [self.slots[i].lr for i in kernel],
                                   [self.slots[i].weight_decay for i in kernel], copies, copy_masters, self.betas,
                                   self.eps, [self.scaled[i] for i in kernel])  # fmt: skip
        self._kernel_fn = ms.jit(self._kernel.construct) if kernel else None

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
        scaled_beta1, scaled_beta2 = self.moment_scale.advance(coef)
        root_v = math.sqrt(self.moment_scale.v)
        scaled_step = lr_factor / bc1 * bc2_sqrt * self.moment_scale.m / root_v
        scalars = (coef, 1.0 / coef, lr_factor, bc1, bc2_sqrt, scaled_step, scaled_beta1, scaled_beta2,
                   self.eps * bc2_sqrt / root_v)  # fmt: skip
        if self._kernel_fn is not None:
            # the gradients as separate inputs: cheaper to pass than a mutable tuple (~0.3 ms a call for 57 tensors)
            self._kernel_fn(*(Tensor(float(v), ms.float32) for v in scalars), *(grads[i] for i in self._in_kernel))
        self._host.step([grads[i] for i in self._host_index], coef, lr_factor, bc1, bc2_sqrt)
        self.partition.gather_parameters(self.masters)

    # ----- state ---------------------------------------------------------------------------------

    def _moment(self, index: int, which: int) -> np.ndarray:
        """Slot `index`'s exp_avg (`which` 0) or exp_avg_sq (1), a fresh array (reading a Parameter copies it)."""
        if index in self._host_index:
            return self._host.moments(self._host_index[index])[which].copy()
        return (self.exp_avg, self.exp_avg_sq)[which][index].asnumpy()

    def _moment_shape(self, index: int) -> tuple[int, ...]:
        if index in self._host_index:
            return self._host.moments(self._host_index[index])[0].shape
        return tuple(self.exp_avg[index].shape)

    def _set_moments(self, index: int, exp_avg: np.ndarray, exp_avg_sq: np.ndarray) -> None:
        if index in self._host_index:
            for kept, value in zip(self._host.moments(self._host_index[index]), (exp_avg, exp_avg_sq)):
                kept[:] = value
            return
        for target, value in ((self.exp_avg[index], exp_avg), (self.exp_avg_sq[index], exp_avg_sq)):
            target.set_data(Tensor(value.reshape(target.shape), ms.float32))

    def owns_state_file(self) -> bool:
        """Whether this rank writes an optimizer file: every rank when state is partitioned, else rank 0."""
        return self.partition.partitioned or self.partition.dp.rank == 0

    def state_dict(self) -> tuple[LazyTensors, dict[str, str]]:
        """This rank's moments and separate masters (whole tensors, or chunks) and the layout metadata, each
        tensor read when it is asked for, so saving holds one at a time. Moments of `scaled` tensors are saved
        as kept, with their scale (`exp_avg_scale.<name>`, `exp_avg_sq_scale.<name>`: the moment is the tensor
        times it), so a resumed run continues bit for bit."""
        state = LazyTensors()
        state.put("step", np.asarray(self.step_count, np.int64))
        for index, (slot, master, scaled) in enumerate(zip(self.slots, self.masters, self.scaled)):
            for which, key in enumerate(("exp_avg", "exp_avg_sq")):
                state.add(f"{key}.{slot.name}", self._moment_shape(index), "float32",
                          lambda index=index, which=which: self._moment(index, which))  # fmt: skip
            if scaled:
                state.put(f"exp_avg_scale.{slot.name}", np.asarray(self.moment_scale.m, np.float64))
                state.put(f"exp_avg_sq_scale.{slot.name}", np.asarray(self.moment_scale.v, np.float64))
            if master is not slot.param or slot.sharded:  # a ZeRO-3 chunk is saved as weights in the model dtype
                state.add(f"master.{slot.name}", master.shape, str(master.dtype), master.asnumpy)
        world = self.partition.dp.world_size if self.partition.partitioned else 1
        rank = self.partition.dp.rank if self.partition.partitioned else 0
        return state, {"zero_world": str(world), "zero_rank": str(rank)}

    def load_state_dict(self, state: "OptimizerState") -> None:
        """Moments (and masters where saved) from any layout: each tensor is rebuilt whole, then cut to this
        rank's part, so a run resumes at another ZeRO stage or world size (or tensor size rule: a moment saved
        with a scale is multiplied out unless this optimizer keeps it at that same scale). A missing master is
        taken from the (already loaded) weights."""
        self.step_count = int(state.scalar("step"))
        saved = [slot.name for slot in self.slots if state.has(f"exp_avg_scale.{slot.name}")]
        scales = [float(state.scalar(f"{key}_scale.{saved[0]}")) for key in ("exp_avg", "exp_avg_sq")] if saved else []
        # one scale for all of a file's scaled moments; none (or zero: saved before the first step) -> unit scale
        self.moment_scale.m, self.moment_scale.v = scales if scales and min(scales) > 0 else (1.0, 1.0)
        kept_scales = {"exp_avg": self.moment_scale.m, "exp_avg_sq": self.moment_scale.v}
        for index, (slot, master, scaled) in enumerate(zip(self.slots, self.masters, self.scaled)):
            spec = slot.spec
            values = []
            for key, kept in kept_scales.items():
                value = spec.take(state.full(f"{key}.{slot.name}", spec))
                scale_key = f"{key}_scale.{slot.name}"
                scale = float(state.scalar(scale_key)) if state.has(scale_key) else 1.0
                wanted = kept if scaled else 1.0
                if scale != wanted:
                    value = value * (scale / wanted)
                values.append(np.asarray(value, np.float32).reshape(-1))
            self._set_moments(index, *values)
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
    """One rank's optimizer file, streamed tensor by tensor from a `state_dict`."""
    write_tensor_file(Path(path), state, metadata)


def build_optimizer(groups: Sequence[ParamGroup], args, dp: DataParallel | None = None, zero: ZeroConfig | None = None,
                    sharded: Mapping[str, ShardSpec] | None = None) -> AdamW:
    """AdamW over the groups' parameters, partitioned for the ZeRO stage (`sharded`: ZeRO-3's chunked weights).

    `--optim` adamw_torch is an alias of adamw_mindspore, adamw_zero1_mindspore of ZeRO stage 1.
    """
    if args.optim not in ("adamw_mindspore", "adamw_torch", "adamw_zero1_mindspore"):
        raise ValueError(f"unknown --optim {args.optim!r}")
    partition = ZeroPartition.build(groups, dp or DataParallel(), zero or ZeroConfig(), sharded)
    return AdamW(partition, (args.adam_beta1, args.adam_beta2), args.adam_epsilon)
