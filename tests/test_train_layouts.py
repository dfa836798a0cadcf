"""One optimizer step of the tiny Qwen2.5-VL gives the same loss and weights whether the micro-batch is
padded, flattened (one row, per-sample segments) or pre-packed; half-precision compute keeps fp32 masters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwenvl.data.annotations import parse_sample
from qwenvl.data.arguments import DataArguments
from qwenvl.data.buckets import ShapeBuckets
from qwenvl.data.collators import collate_flattened, collate_padded
from qwenvl.data.dataset import concat_encoded
from qwenvl.data.pipeline import build_encoder
from qwenvl.model import load_model
from qwenvl.train.argument import parse_args
from qwenvl.train.freezing import apply_tuning_flags
from qwenvl.train.optimizer import build_optimizer
from qwenvl.train.param_groups import build_param_groups
from qwenvl.train.train_step import TrainStep

DEMO = Path(__file__).resolve().parents[1] / "demo"


def _samples(model_dir: Path) -> list:
    encoder = build_encoder(model_dir, DataArguments())
    items = [
        {"image": "images/red_circle_0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat do you see?"}, {"from": "gpt", "value": "A red circle."}]},
        {"conversations": [{"from": "human", "value": "Name a shape."}, {"from": "gpt", "value": "A square, drawn blue."}]},
        {"image": "images/green_triangle_1.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A green triangle."}]},
    ]  # fmt: skip
    return [encoder.encode(parse_sample(item, str(DEMO))) for item in items], encoder.special.pad


def _step(model_dir: Path, batch: dict, dtype: str = "float32", *flags: str):
    model = load_model(model_dir, dtype=dtype)
    model_args, _, training = parse_args(["--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "True",
                                          "--learning_rate", "1e-3", *flags])  # fmt: skip
    apply_tuning_flags(model, model_args)
    model.set_train(True)
    step = TrainStep(model, build_optimizer(build_param_groups(model, training), training), training)
    loss_sum, n_tokens, grads = step.forward_backward(model.prepare_inputs(batch))
    grads = {p.name: g.asnumpy() / float(n_tokens) for p, g in zip(step.optimizer.parameters, grads)}
    metrics = step.run([model.prepare_inputs(batch)], 1.0)
    return metrics, grads, model


@pytest.fixture(scope="module")
def tiny(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen2.5vl")


def test_padded_flattened_and_packed_steps_are_equal(tiny):
    samples, pad = _samples(tiny)
    padded = _step(tiny, collate_padded(samples, pad))
    flat = _step(tiny, collate_flattened(samples, pad, ShapeBuckets.from_flag("auto", 3, 64)))
    packed = _step(tiny, collate_flattened([concat_encoded(samples[:2]), samples[2]], pad))
    for metrics, grads, _ in (flat, packed):
        assert metrics.n_tokens == padded[0].n_tokens
        assert metrics.loss == pytest.approx(padded[0].loss, rel=1e-5)
        assert metrics.grad_norm == pytest.approx(padded[0].grad_norm, rel=1e-4)
        for name, value in padded[1].items():
            np.testing.assert_allclose(grads[name], value, rtol=1e-4, atol=1e-5 * np.abs(value).max(), err_msg=name)


def test_fp16_weights_train_through_float32_masters(tiny):
    samples, pad = _samples(tiny)
    batch = collate_padded(samples, pad)
    reference, ref_grads, _ = _step(tiny, batch)
    model = load_model(tiny, dtype="float16")
    model_args, _, training = parse_args(["--tune_mm_llm", "True", "--fp16"])
    apply_tuning_flags(model, model_args)
    model.set_train(True)
    step = TrainStep(model, build_optimizer(build_param_groups(model, training), training), training)
    inputs = model.prepare_inputs(batch)
    history = [step.run([inputs], 1.0) for _ in range(8)]
    # the 2**16 start scale overflows fp16 gradients: those steps are skipped and the scale halves (GradScaler)
    first_ok = next(i for i, m in enumerate(history) if not m.skipped)
    assert all(m.skip_reason == "fp16 overflow" for m in history[:first_ok])
    assert history[first_ok].loss_scale == 2.0**16 / 2**first_ok
    assert history[first_ok].loss == pytest.approx(reference.loss, rel=0.03)  # same maths at lower precision
    assert step.optimizer.step_count == sum(not m.skipped for m in history)
    # weights are stored in float16; the optimizer's float32 masters drive them
    assert all(str(p.dtype) == "Float16" for p in model.get_parameters())
    assert all(str(m.dtype) == "Float32" for m in step.optimizer.masters)
    for master, param in zip(step.optimizer.masters, step.optimizer.parameters):
        np.testing.assert_array_equal(param.asnumpy(), master.asnumpy().astype(np.float16), err_msg=param.name)


def test_bf16_on_cpu_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="bfloat16 compute needs an Ascend or GPU device"):
        load_model(tiny, dtype="bfloat16")
