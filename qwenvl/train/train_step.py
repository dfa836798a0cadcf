"""One optimizer step over a global batch: accumulation, data-parallel reduction, clipping, loss scaling.

Loss normalisation is by tokens over the whole global batch: each micro-batch contributes its summed
token cross-entropy and its supervised-token count; sums (and gradients of sums) are reduced over
ranks and divided once by the global token count (one coefficient applied inside the optimizer's graph). k micro-batches of one sample, or w ranks with k/w
each, are therefore the same update as one batch of k on one device (HF's `num_items_in_batch` rule).

fp16 uses dynamic loss scaling with `torch.amp.GradScaler`'s defaults (2**16 start, halve on overflow
and skip the step, double after 2000 clean steps). Any step whose loss or gradient norm is not finite
is skipped and counted; the optimizer's step count (and so bias correction) does not advance.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from qwenvl.model.checkpoint_io import LazyTensors
from qwenvl.model.device import on_cpu
from qwenvl.model.weight_ops import sync_trainable
from qwenvl.train.graph_tracker import GraphTracker, signature
from qwenvl.train.host_squares import host_squared_sum
from qwenvl.train.layer_by_layer import LayerByLayer
from qwenvl.train.optimizer import AdamW, OptimizerState
from qwenvl.train.tensor_runs import RUN_ELEMENTS, small_runs


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and MindSpore so two runs with one seed are identical."""
    random.seed(seed)
    np.random.seed(seed)
    ms.set_seed(seed)


@dataclass
class StepMetrics:
    loss: float  # mean token loss over the global batch
    grad_norm: float  # global gradient norm before clipping (nan when not computed)
    n_tokens: int  # supervised tokens in the global batch
    skipped: bool
    loss_scale: float  # the scale the next step uses (1.0 without fp16)
    skip_reason: str | None = None


class DynamicLossScale:
    """fp16 loss scale: halved on overflow, doubled after `growth_interval` finite steps in a row."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0


class _ScaledLoss(nn.Cell):
    """(loss_sum * scale, loss_sum, n_tokens): the first output is differentiated, the rest are aux."""

    def __init__(self, model: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, scale, *inputs):
        loss_sum, n_tokens = self.model(*inputs)
        return loss_sum * scale, loss_sum, n_tokens


def _sum_of_squares(grad):
    """sum(grad**2) in float32. MindSpore's CPU ReduceSum over a whole tensor runs on one thread; summing rows
    first runs on all of them (8x faster on 120 M gradients; ZeRO chunks of large tensors are whole rows of 1024)."""
    flat = ops.cast(grad, ms.float32)
    if flat.ndim == 1 and flat.shape[0] % 1024 == 0:
        flat = flat.reshape(-1, 1024)
    squares = flat * flat
    return squares.sum(-1).sum() if squares.ndim > 1 else squares.sum()


class _SquaredSum(nn.Cell):
    """Sum of squares of every gradient, in float32: a run of small tensors (`small_runs`) concatenated and
    summed as one, a large tensor alone; one run's temporaries at a time."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.runs = small_runs(sizes)

    def construct(self, *grads):
        # after every gradient exists: inside the backward graph (`TrainStep`) the scheduler would otherwise square
        # early gradients while activations are still alive
        total = ops.depend(ops.zeros((), ms.float32), grads)
        for run in self.runs:
            if len(run) == 1:
                total = total + _sum_of_squares(ops.depend(grads[run[0]], total))
            else:
                pieces = [ops.cast(ops.depend(grads[i], total), ms.float32).reshape(-1) for i in run]
                total = total + _sum_of_squares(ops.cat(pieces))
        return total


class TrainStep:
    """`run(micro_batches, lr_factor)` performs one optimizer step on this rank's share of a global batch.

    `micro_batches` are `model.prepare_inputs(...)` dicts; every rank must pass the same number of them.
    Gradients travel as the optimizer's ZeRO partition says (`qwenvl.parallel.zero`); the norm, the
    loss-scale check and the clipping coefficient are computed on what this rank holds, summed over ranks.
    """

    def __init__(self, model: nn.Cell, optimizer: AdamW, args,
                 before_micro_batch: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.model = model
        self.before_micro_batch = before_micro_batch  # called with each micro-batch's index (dropout keys)
        self.on_phase: Callable[[str], None] | None = None  # told when each phase of a step ends (memory probes)
        self.optimizer = optimizer
        self.partition = optimizer.partition
        self.dp = self.partition.dp
        self.loss_scale = DynamicLossScale() if getattr(args, "fp16", False) else None
        self.max_grad_norm = float(args.max_grad_norm)
        self.skipped_steps = 0
        self._input_names = list(inspect.signature(model.construct).parameters)
        sync_trainable(model)
        grad_fn = ms.value_and_grad(_ScaledLoss(model), None, optimizer.parameters, has_aux=True)
        # one graph per decoder-layer structure instead of the whole model (`layer_by_layer`)
        self.layer_by_layer = bool(getattr(args, "layer_by_layer", False))
        self.layer_runner = (
            LayerByLayer(model, optimizer.parameters, self.partition.reduce_part, self.partition.zero_part)
            if self.layer_by_layer
            else None
        )
        self._forward_backward = self.layer_runner or ms.jit(grad_fn)
        sizes = [int(p.size) for p in optimizer.parameters]
        squares = _SquaredSum(sizes)

        def with_squares(scale, *inputs):
            outputs, grads = grad_fn(scale, *inputs)
            return outputs, grads, squares(*grads)

        # a step whose gradients are final after one backward pass (one micro-batch, one rank) takes their sum of
        # squares from the same graph: one compiled call less per step (~1 ms of the tiny model's ~20). Only when
        # every gradient is small (its squares at most one run's 1 MiB): a tensor-sized temporary there raised
        # the forward/backward peak of issue 10's models by ~1 byte per parameter (measured), where the separate
        # graph reuses memory the backward pass has freed
        self._squares_in_backward = max(sizes, default=0) <= RUN_ELEMENTS and not self.layer_by_layer
        self._forward_backward_squares = ms.jit(with_squares)
        self.graphs = GraphTracker()  # one compiled forward/backward graph per input signature
        self._norm_graphs: dict[tuple[int, ...], Callable] = {}

    @property
    def reduces_vision_per_micro_batch(self) -> bool:
        """Its layer-by-layer backward pass reduce-scatters the vision weights' gradients only on micro-batches with
        vision input, so the ranks must agree on those (`qwenvl.parallel.zero3.align_vision`)."""
        runner, partition = self.layer_runner, self.partition
        return bool(runner and runner.vision_slots and partition.partitioned and partition.config.stage >= 2)

    def positional(self, inputs: dict[str, Tensor]) -> list[Tensor | None]:
        unknown = set(inputs) - set(self._input_names)
        if unknown:
            raise ValueError(f"model.construct takes no input(s) {sorted(unknown)}")
        last = max(self._input_names.index(name) for name in inputs)
        return [inputs.get(name) for name in self._input_names[: last + 1]]

    def _compiled_pass(self, compiled: Callable, inputs: dict[str, Tensor], scale: float) -> tuple:
        """One compiled forward/backward graph on a micro-batch, timed per input signature."""
        values = self.positional(inputs)
        start = time.perf_counter()
        result = compiled(Tensor(scale, ms.float32), *values)
        self.graphs.observe(signature(self._input_names, values), time.perf_counter() - start)
        return result

    def forward_backward(self, inputs: dict[str, Tensor], scale: float = 1.0) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """(loss_sum, n_tokens, grads of scale * loss_sum) for one micro-batch, compiled (timed per signature)."""
        (_, loss_sum, n_tokens), grads = self._compiled_pass(self._forward_backward, inputs, scale)
        return loss_sum, n_tokens, grads

    def _forward_backward_with_squares(self, inputs: dict[str, Tensor], scale: float) -> tuple:
        """`forward_backward` and the gradients' sum of squares, from one compiled graph."""
        (_, loss_sum, n_tokens), grads, squares = self._compiled_pass(self._forward_backward_squares, inputs, scale)
        return loss_sum, n_tokens, grads, float(squares)

    def run(self, micro_batches: Sequence[dict[str, Tensor]], lr_factor: float) -> StepMetrics:
        if not micro_batches:
            raise ValueError("a step needs at least one micro-batch")
        scale = self.loss_scale.scale if self.loss_scale else 1.0
        grads, losses, counts, squares = None, [], [], None
        # the backward pass's gradients are the step's
        final = self._squares_in_backward and len(micro_batches) == 1 and self.dp.world_size == 1
        for index, inputs in enumerate(micro_batches):
            if self.before_micro_batch is not None:
                self.before_micro_batch(index)
            if final:
                loss_sum, n_tokens, micro_grads, squares = self._forward_backward_with_squares(inputs, scale)
            else:
                loss_sum, n_tokens, micro_grads = self.forward_backward(inputs, scale)
            grads = self.partition.micro_batch(grads, micro_grads, reduced=self.layer_by_layer)
            losses.append(loss_sum)
            counts.append(n_tokens)
            self._phase("forward_backward")
        loss_sum, n_tokens = (float(t) for t in self.dp.all_reduce_sum([ops.addn(losses), ops.addn(counts)]))
        if n_tokens == 0:
            return self._skip("no supervised tokens in the global batch", math.nan, math.nan, 0)
        grads = self.partition.step_gradients(grads)
        self._phase("gradient_reduction")
        factor = 1.0 / (n_tokens * scale)
        if squares is None:
            squares = self.partition.sum_over_ranks(self._squared_sum(grads))
        norm = math.sqrt(squares) * factor
        loss = loss_sum / n_tokens
        finite = math.isfinite(loss) and math.isfinite(norm)
        if self.loss_scale:
            self.loss_scale.update(finite)
        if not finite:
            reason = "fp16 overflow" if self.loss_scale else "non-finite loss or gradient"
            return self._skip(reason, loss, norm, int(n_tokens))
        clip = min(1.0, self.max_grad_norm / (norm + 1e-6)) if self.max_grad_norm > 0 else 1.0
        self.optimizer.step(grads, factor * clip, lr_factor)
        self._phase("optimizer_step")
        return StepMetrics(loss, norm, int(n_tokens), False, self._current_scale())

    def _squared_sum(self, grads: Sequence[Tensor]) -> float:
        if on_cpu():  # read in place: the compiled graph's squares would stay in the memory pool (`host_squares`)
            return host_squared_sum(grads)
        sizes = tuple(int(g.size) for g in grads)
        if sizes not in self._norm_graphs:  # one per gradient layout (fixed for a run)
            self._norm_graphs[sizes] = ms.jit(_SquaredSum(sizes).construct)
        return float(self._norm_graphs[sizes](*grads))  # separate inputs: cheaper to pass than a mutable tuple

    def _phase(self, name: str) -> None:
        if self.on_phase is not None:
            self.on_phase(name)

    def _current_scale(self) -> float:
        return self.loss_scale.scale if self.loss_scale else 1.0

    def _skip(self, reason: str, loss: float, norm: float, n_tokens: int) -> StepMetrics:
        self.skipped_steps += 1
        return StepMetrics(loss, norm, n_tokens, True, self._current_scale(), reason)

    def state_dict(self) -> tuple[LazyTensors, dict[str, str]]:
        """Optimizer moments, masters and step (read as they are asked for), loss-scale state and the
        skipped-step count, with the ZeRO layout metadata."""
        state, metadata = self.optimizer.state_dict()
        state.put("skipped_steps", np.asarray(self.skipped_steps, np.int64))
        if self.loss_scale:
            state.put("loss_scale", np.asarray(self.loss_scale.scale, np.float64))
            state.put("loss_scale_good_steps", np.asarray(self.loss_scale.good_steps, np.int64))
        return state, metadata

    def load_state_dict(self, state: OptimizerState) -> None:
        self.optimizer.load_state_dict(state)
        self.skipped_steps = int(state.scalar("skipped_steps")) if state.has("skipped_steps") else 0
        if self.loss_scale and state.has("loss_scale"):
            self.loss_scale.scale = float(state.scalar("loss_scale"))
            self.loss_scale.good_steps = int(state.scalar("loss_scale_good_steps"))
