"""Parameter groups: HF's weight-decay split and upstream's merger / vision-tower LRs on the toy model.

Expectations come from the toy's cell structure and hand-written names, and the per-group LRs are read
back from real AdamW updates under a warmup + cosine schedule.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from mindspore import Tensor

from qwenvl.train.freezing import apply_tuning_flags
from qwenvl.train.optimizer import build_optimizer
from qwenvl.train.param_groups import build_param_groups, decay_parameter_names
from qwenvl.train.schedule import lr_factor, warmup_steps
from tests.toy_model import Embedding, LayerNorm, Linear, RMSNorm, ToyVLForConditionalGeneration

BASE_LR, VISION_LR, MERGER_LR = 1e-2, 2e-3, 5e-2


def _args(mm=None, vision=None, weight_decay=0.1, lr=BASE_LR) -> SimpleNamespace:
    return SimpleNamespace(learning_rate=lr, mm_projector_lr=mm, vision_tower_lr=vision, weight_decay=weight_decay)


def _names_by_cell(model, kinds: tuple[type, ...], attr: str = "weight") -> set[str]:
    return {f"{name}.{attr}" for name, cell in model.cells_and_names() if isinstance(cell, kinds)}


@pytest.mark.parametrize("vision_rmsnorm", [False, True])
def test_decay_split_follows_hf_rule(vision_rmsnorm):
    model = ToyVLForConditionalGeneration(deepstack=True, vision_rmsnorm=vision_rmsnorm)
    names = {name for name, _ in model.parameters_and_names()}
    decay = decay_parameter_names(model)
    # matrices of Linear / Embedding cells always decay; biases and LayerNorm cells never do
    matrices = _names_by_cell(model, (Linear, Embedding))
    assert matrices <= decay
    assert not {n for n in names if n.endswith(".bias")} & decay
    layer_norm_params = _names_by_cell(model, (LayerNorm,)) | _names_by_cell(model, (LayerNorm,), "bias")
    assert not layer_norm_params & decay
    # RMSNorm weights: decayed unless the name says norm (HF's name patterns)
    rms = _names_by_cell(model, (RMSNorm,))
    named_norm = {n for n in rms if "layernorm" in n or n == "model.language_model.norm.weight"}
    assert named_norm and not named_norm & decay
    vision_rms = {f"model.visual.blocks.{i}.{k}.weight" for i in range(2) for k in ("norm1", "norm2")}
    vision_rms.add("model.visual.merger.ln_q.weight")
    if vision_rmsnorm:
        assert rms - named_norm == vision_rms and vision_rms <= decay  # Qwen2.5's vision norms decay upstream
    else:
        assert rms == named_norm and not vision_rms & decay  # Qwen2/3's LayerNorm vision norms do not
    assert decay == matrices | (vision_rms if vision_rmsnorm else set())
    for literal in ("model.language_model.layers.0.input_layernorm.weight", "model.visual.deepstack_merger_list.0.norm.weight"):
        assert literal in names and literal not in decay


def _expected_lr(name: str, mm, vision) -> float:
    if mm and "merger" in name:
        return mm
    if mm and vision and "visual" in name:
        return vision
    return BASE_LR


@pytest.mark.parametrize(
    "mm,vision,group_names",
    [
        (None, None, ["base_decay", "base_no_decay"]),
        (0.0, VISION_LR, ["base_decay", "base_no_decay"]),  # the vision LR needs a merger LR (upstream)
        (MERGER_LR, None, ["base_decay", "base_no_decay", "merger_decay", "merger_no_decay"]),
        (MERGER_LR, VISION_LR, ["base_decay", "vision_decay", "base_no_decay", "vision_no_decay", "merger_decay", "merger_no_decay"]),
    ],
)
def test_groups_and_learning_rates(mm, vision, group_names):
    model = ToyVLForConditionalGeneration(deepstack=True)
    groups = build_param_groups(model, _args(mm, vision))
    assert [g.name for g in groups] == group_names
    decay = decay_parameter_names(model)
    seen = []
    for group in groups:
        for name in group.param_names:
            assert group.lr == _expected_lr(name, mm, vision), name
            assert group.weight_decay == (0.1 if name in decay else 0.0), name
        seen += group.param_names
    assert sorted(seen) == sorted(name for name, _ in model.parameters_and_names())
    if mm:
        merger = next(g for g in groups if g.name == "merger_decay").param_names
        assert "model.visual.deepstack_merger_list.0.linear_fc1.weight" in merger


def test_frozen_parameters_are_left_out():
    model = ToyVLForConditionalGeneration()
    apply_tuning_flags(model, SimpleNamespace(tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False))
    groups = build_param_groups(model, _args(MERGER_LR, VISION_LR))
    assert [g.name for g in groups] == ["merger_decay", "merger_no_decay"]
    assert all(n.startswith("model.visual.merger.") for g in groups for n in g.param_names)
    apply_tuning_flags(model, SimpleNamespace(tune_mm_vision=False, tune_mm_mlp=False, tune_mm_llm=False))
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(model, _args())


def test_every_group_follows_the_schedule_factor():
    """Constant unit gradients make torch AdamW's step exactly lr_t / (1 + eps): the LR is read off the update."""
    model = ToyVLForConditionalGeneration(deepstack=True)
    groups = build_param_groups(model, _args(MERGER_LR, VISION_LR, weight_decay=0.0))
    assert len({g.lr for g in groups}) == 3
    eps = 1e-8
    opt = build_optimizer(groups, SimpleNamespace(optim="adamw_mindspore", adam_beta1=0.9, adam_beta2=0.999,
                                                  adam_epsilon=eps))  # fmt: skip
    total = 10
    warmup = warmup_steps(total, 0.2)
    factors = [lr_factor("cosine", step, total, warmup) for step in range(total)]
    assert factors[0] == 0.0 and factors[warmup] == pytest.approx(1.0) and 0 < factors[-1] < factors[warmup + 1]
    ones = [Tensor(np.ones(p.shape, np.float32)) for p in opt.parameters]
    for factor in factors:
        before = {p.name: p.asnumpy().astype(np.float64) for p in opt.parameters}
        opt.step(ones, 1.0, factor)
        for p in opt.parameters:
            want = _expected_lr(p.name, MERGER_LR, VISION_LR) * factor / (1 + eps)
            np.testing.assert_allclose(before[p.name] - p.asnumpy(), want, rtol=2e-5, atol=1e-7, err_msg=p.name)
