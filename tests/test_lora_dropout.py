"""LoRA dropout from a counter-based hash keyed by (seed, step, micro-batch, rank): the mask matches a numpy
reference, keeps 1 - p of the elements, differs per key and module, is off in eval mode; two training runs
are bitwise equal and a resumed run ends on the uninterrupted weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor
from safetensors.numpy import load_file

from qwenvl.model.layers import Linear
from qwenvl.model.lora import DropoutKey, LoraLinear, LoraSettings, dropout_mask
from qwenvl.train.train_qwen import main

M1, M2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """Chris Wellons' lowbias32 integer hash, in numpy uint32 (the reference the graph must match)."""
    x = x ^ (x >> np.uint32(16))
    x = x * M1
    x = x ^ (x >> np.uint32(15))
    x = x * M2
    return x ^ (x >> np.uint32(16))


def _reference_keep(shape: tuple[int, ...], key: np.ndarray, salt: int, p: float) -> np.ndarray:
    index = np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
    k0, k1 = key.view(np.uint32)
    with np.errstate(over="ignore"):
        h = _lowbias32(_lowbias32(index ^ k0) ^ (k1 ^ np.asarray(salt, np.int32).view(np.uint32)))
    return (h & np.uint32(0xFFFFFF)) >= np.uint32(round(p * 2**24))


def _mask(shape, key: np.ndarray, salt: int, p: float) -> np.ndarray:
    @ms.jit
    def run(x, k):
        return dropout_mask(x, k, salt, p)

    return run(Tensor(np.ones(shape, np.float32)), Tensor(key)).asnumpy()


def test_mask_matches_the_numpy_reference_and_keeps_one_minus_p():
    key = DropoutKey.words(seed=42, step=7, micro_batch=1, rank=0)
    shape, p = (2, 64, 48), 0.3
    mask = _mask(shape, key, 12345, p)
    keep = _reference_keep(shape, key, 12345, p)
    np.testing.assert_array_equal(mask, keep.astype(np.float32) / (1 - p))  # kept values scaled by 1/(1-p)
    assert abs(keep.mean() - 0.7) < 0.01  # 6144 draws: 3 standard deviations are 0.018
    assert abs(keep.reshape(2, -1).mean(1) - 0.7).max() < 0.03


def test_masks_differ_per_key_and_module_and_repeat_for_the_same_ones():
    shape, p = (1, 32, 32), 0.5
    base = _mask(shape, DropoutKey.words(1, 5, 0, 0), 7, p)
    np.testing.assert_array_equal(base, _mask(shape, DropoutKey.words(1, 5, 0, 0), 7, p))
    for other in (DropoutKey.words(2, 5, 0, 0), DropoutKey.words(1, 6, 0, 0), DropoutKey.words(1, 5, 1, 0),
                  DropoutKey.words(1, 5, 0, 1)):  # fmt: skip
        agreement = (_mask(shape, other, 7, p) > 0) == (base > 0)
        assert 0.4 < agreement.mean() < 0.6  # independent masks agree on about half the elements
    assert 0.4 < ((_mask(shape, DropoutKey.words(1, 5, 0, 0), 8, p) > 0) == (base > 0)).mean() < 0.6


def test_lora_linear_drops_only_in_training():
    rng = np.random.default_rng(0)
    base = Linear(8, 6, bias=True)
    layer = LoraLinear(base, LoraSettings(r=2, alpha=4.0, dropout=0.5, target_modules=("q_proj",)), rng, DropoutKey(), 3)
    layer.lora_B.weight.set_data(Tensor(rng.normal(0, 1, (6, 2)).astype(np.float32)))
    layer.dropout_key.set(seed=0, step=1, micro_batch=0, rank=0)
    x = rng.normal(0, 1, (1, 5, 8)).astype(np.float32)
    w, b = base.weight.asnumpy(), base.bias.asnumpy()
    a, bb = layer.lora_A.weight.asnumpy(), layer.lora_B.weight.asnumpy()

    def expected(h):
        return x @ w.T + b + (h @ a.T @ bb.T) * 2.0

    layer.set_train(False)
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), expected(x), rtol=1e-5, atol=1e-5)
    layer.set_train(True)
    mask = _reference_keep((1, 5, 8), DropoutKey.words(0, 1, 0, 0), layer.salt, 0.5) / 0.5
    np.testing.assert_allclose(layer(Tensor(x)).asnumpy(), expected(x * mask), rtol=1e-5, atol=1e-5)


def _flags(model_dir: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_use", "demo_images%25", "--output_dir", str(out),
            "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.3",
            "--tune_mm_mlp", "True", "--learning_rate", "2e-3", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "2",
            "--model_max_length", "256"]  # fmt: skip


@pytest.mark.slow
def test_dropout_runs_are_bitwise_equal_and_resume_exactly(tiny_model_factory, tmp_path):
    tiny = tiny_model_factory("qwen2.5vl")
    for name in ("a", "b"):
        assert main(_flags(tiny, tmp_path / name)) == 0
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    assert main(_flags(tiny, tmp_path / "resumed")) == 0
    want = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert any(np.abs(v).max() > 0 for k, v in want.items() if "lora_B" in k)  # the adapters trained
    for name in ("b", "resumed"):
        got = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
