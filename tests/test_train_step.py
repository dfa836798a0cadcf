"""TrainStep on the toy VL model: token-weighted accumulation, clipping, skipped steps, fp16 scaling, seeding."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
from mindspore import ops

from qwenvl.constants import IGNORE_INDEX
from qwenvl.train.host_squares import host_squared_sum
from qwenvl.train.optimizer import OptimizerState, build_optimizer, save_optimizer_state
from qwenvl.train.param_groups import ParamGroup
from qwenvl.train.train_step import DynamicLossScale, TrainStep, seed_everything
from tests.toy_batches import CFG, collate, samples
from tests.toy_model import ToyVLForConditionalGeneration


def trainer(max_grad_norm: float = 0.0, lr: float = 1e-2, eps: float = 1e-3, fp16: bool = False, **cfg):
    model = ToyVLForConditionalGeneration(replace(CFG, **cfg))
    params = list(model.trainable_params())
    optimizer = build_optimizer([ParamGroup("all", params, lr, 0.0)], SimpleNamespace(
        optim="adamw_mindspore", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=eps))
    step = TrainStep(model, optimizer, SimpleNamespace(max_grad_norm=max_grad_norm, fp16=fp16))
    return model, step


def weights(model) -> dict[str, np.ndarray]:
    return {name: p.asnumpy().copy() for name, p in model.parameters_and_names()}


def reference_loss_and_grads(model, batch: dict[str, np.ndarray]) -> tuple[float, int, dict[str, np.ndarray]]:
    """Token-mean loss and its gradients by plain PyNative autodiff of the model, outside TrainStep."""
    inputs = model.prepare_inputs(batch)
    params = list(model.trainable_params())

    def mean_loss(input_ids, labels, attention_mask, pixel_values, vision_mask, vision_index, vision_slots):
        loss_sum, n_tokens = model(input_ids, labels, attention_mask, pixel_values, vision_mask, vision_index, vision_slots)
        return loss_sum / n_tokens

    order = ["input_ids", "labels", "attention_mask", "pixel_values", "vision_mask", "vision_index", "vision_slots"]
    loss, grads = ms.value_and_grad(mean_loss, None, params)(*[inputs[k] for k in order])
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return float(loss), n_tokens, {p.name: g.asnumpy() for p, g in zip(params, grads)}


def forward_loss(batch: dict[str, np.ndarray]) -> tuple[float, float]:
    """(loss_sum, n_tokens) of a fresh toy model, by a plain PyNative forward."""
    model = ToyVLForConditionalGeneration(CFG)
    loss_sum, n_tokens = model(**model.prepare_inputs(batch))
    return float(loss_sum), float(n_tokens)


def test_accumulated_single_samples_equal_one_batch(monkeypatch):
    from qwenvl.train import train_step

    data = samples()
    model_a, step_a = trainer()
    model_b, step_b = trainer()
    host_sums = []
    monkeypatch.setattr(train_step, "host_squared_sum", lambda g: host_sums.append(len(g)) or host_squared_sum(g))
    micro = step_a.run([model_a.prepare_inputs(collate([s])) for s in data], 1.0)
    assert len(host_sums) == 1  # three micro-batches: the summed gradients' squares, read in place on CPU
    whole = step_b.run([model_b.prepare_inputs(collate(data))], 1.0)
    # the toy's gradients are small: one micro-batch takes its norm from the backward graph
    assert step_b._squares_in_backward and len(host_sums) == 1 and not step_a._norm_graphs

    per_sample = [forward_loss(collate([s])) for s in data]
    assert [n for _, n in per_sample] == [2, 5, 8]  # token weighting matters
    token_mean = sum(loss for loss, _ in per_sample) / 15
    assert abs(np.mean([loss / n for loss, n in per_sample]) - token_mean) > 1e-3  # the check below is sensitive
    assert micro.n_tokens == whole.n_tokens == 15
    assert micro.loss == pytest.approx(token_mean, rel=1e-5) and whole.loss == pytest.approx(token_mean, rel=1e-5)
    assert micro.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)
    assert not micro.skipped and not whole.skipped
    got_a, got_b = weights(model_a), weights(model_b)
    for name in got_a:
        np.testing.assert_allclose(got_a[name], got_b[name], rtol=0, atol=1e-6, err_msg=name)
    assert any(not np.array_equal(got_a[n], w) for n, w in weights(ToyVLForConditionalGeneration(CFG)).items())


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clipping_reports_pre_clip_norm_and_scales_update(max_norm):
    data = samples(1)
    before = weights(ToyVLForConditionalGeneration(CFG))
    _, n_tokens, grads = reference_loss_and_grads(ToyVLForConditionalGeneration(CFG), collate(data))
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))

    lr, eps = 1e-2, 1.0  # a large eps makes Adam's first step depend on the gradient's scale
    model, step = trainer(max_grad_norm=max_norm, lr=lr, eps=eps)
    metrics = step.run([model.prepare_inputs(collate(data))], 1.0)
    assert metrics.grad_norm == pytest.approx(norm, rel=1e-5)
    assert metrics.n_tokens == n_tokens

    coef = min(1.0, max_norm / (norm + 1e-6))
    assert (coef < 0.5) == (max_norm < 1)
    after = weights(model)
    for name, g in grads.items():
        clipped = coef * g  # first AdamW step: m_hat = g, sqrt(v_hat) = |g|
        expected = before[name] - lr * clipped / (np.abs(clipped) + eps)
        np.testing.assert_allclose(after[name], expected, rtol=0, atol=1e-7, err_msg=name)


def test_nan_loss_step_is_skipped_and_counted():
    model, step = trainer(max_grad_norm=1.0)
    before = weights(model)
    bad = collate(samples(2))
    bad["pixel_values"][0, 0] = np.nan
    metrics = step.run([model.prepare_inputs(bad)], 1.0)
    assert metrics.skipped and step.skipped_steps == 1 and step.optimizer.step_count == 0
    assert "non-finite" in metrics.skip_reason and math.isnan(metrics.loss)
    for name, value in weights(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert int(step.state_dict()[0]["skipped_steps"]) == 1

    good = step.run([model.prepare_inputs(collate(samples(2)))], 1.0)
    assert not good.skipped and math.isfinite(good.loss) and step.optimizer.step_count == 1
    assert step.skipped_steps == 1


def test_batch_without_supervised_tokens_is_skipped():
    model, step = trainer()
    batch = collate(samples(3))
    batch["labels"][:] = IGNORE_INDEX
    metrics = step.run([model.prepare_inputs(batch)], 1.0)
    assert metrics.skipped and metrics.n_tokens == 0 and step.skipped_steps == 1
    assert step.optimizer.step_count == 0


def test_fp16_overflow_halves_scale_and_skips():
    model, step = trainer(max_grad_norm=1.0, fp16=True, dtype="float16")
    assert step.loss_scale.scale == 2.0**16
    before = weights(model)
    huge = collate(samples(4))
    huge["pixel_values"][:] = 1e6  # inf once cast to float16
    metrics = step.run([model.prepare_inputs(huge)], 1.0)
    assert metrics.skipped and metrics.skip_reason == "fp16 overflow"
    assert step.loss_scale.scale == 2.0**15 == metrics.loss_scale
    for name, value in weights(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert float(step.state_dict()[0]["loss_scale"]) == 2.0**15

    # a real batch: the scale keeps halving while scaled fp16 gradients overflow, then the step is taken
    # with its gradients unscaled (norm equal to the float32 model's)
    batch = collate(samples(4))
    _, _, grads = reference_loss_and_grads(ToyVLForConditionalGeneration(CFG), batch)
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    inputs = model.prepare_inputs(batch)
    for attempt in range(1, 16):
        clean = step.run([inputs], 1.0)
        if not clean.skipped:
            break
        assert clean.skip_reason == "fp16 overflow" and step.loss_scale.scale == 2.0 ** (15 - attempt)
    assert not clean.skipped and clean.grad_norm == pytest.approx(norm, rel=2e-2)
    assert step.skipped_steps == attempt and step.optimizer.step_count == 1 and step.loss_scale.good_steps == 1


def test_dynamic_loss_scale_schedule():
    scale = DynamicLossScale(init_scale=8.0, growth_interval=3)
    for finite in (True, True, False, True, True):
        scale.update(finite)
    assert scale.scale == 4.0 and scale.good_steps == 2
    scale.update(True)
    assert scale.scale == 8.0 and scale.good_steps == 0


def test_train_step_state_round_trip(tmp_path):
    model, step = trainer(fp16=True, dtype="float16")
    step.loss_scale.scale, step.loss_scale.good_steps, step.skipped_steps = 1024.0, 7, 3
    save_optimizer_state(tmp_path / "optimizer-rank0.safetensors", *step.state_dict())
    _, fresh = trainer(fp16=True, dtype="float16")
    fresh.load_state_dict(OptimizerState([tmp_path / "optimizer-rank0.safetensors"]))
    assert (fresh.loss_scale.scale, fresh.loss_scale.good_steps, fresh.skipped_steps) == (1024.0, 7, 3)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), ops.uniform((3,), ms.Tensor(0.0), ms.Tensor(1.0)).asnumpy().tolist()


def test_seed_everything_is_deterministic():
    seed_everything(123)
    first = _draws()
    seed_everything(123)
    assert _draws() == first
    seed_everything(124)
    other = _draws()
    assert all(a != b for a, b in zip(other, first))

    runs = []
    for _ in range(2):
        seed_everything(5)
        model, step = trainer(max_grad_norm=1.0)
        for s in samples(5)[:2]:
            step.run([model.prepare_inputs(collate([s]))], 1.0)
        runs.append(weights(model))
    for name, value in runs[0].items():
        np.testing.assert_array_equal(value, runs[1][name], err_msg=name)


def test_small_runs_join_consecutive_small_tensors_up_to_the_limit():
    from qwenvl.train.tensor_runs import small_runs

    assert small_runs([1, 2, 3, 10, 1, 1], limit=5) == ((0, 1), (2,), (3,), (4, 5))
    assert small_runs([5, 1, 4, 1], limit=5) == ((0,), (1, 2), (3,))
    assert small_runs([], limit=5) == ()


def test_squared_sum_over_runs_and_large_tensors_equals_numpy():
    from qwenvl.runtime import graph_mode
    from qwenvl.train.tensor_runs import RUN_ELEMENTS
    from qwenvl.train.train_step import _SquaredSum

    rng = np.random.default_rng(3)
    shapes = [(3,), (4, 5), (RUN_ELEMENTS + 5,), (7,), (256, 1024), (2, 11), (RUN_ELEMENTS - 40,), (30,)]
    values = [rng.standard_normal(s).astype(np.float16 if i == 1 else np.float32) for i, s in enumerate(shapes)]
    expected = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in values)
    cell = _SquaredSum([v.size for v in values])
    assert cell.runs == ((0, 1), (2,), (3,), (4,), (5, 6), (7,))  # 22 + 2^18 - 40 fit; + 30 does not
    with graph_mode():
        total = float(ms.jit(cell.construct)(*(ms.Tensor(v) for v in values)))
    assert total == pytest.approx(expected, rel=1e-5)
