"""LoRA on the native model: starts at the base, trains only adapters (and flagged parts), saves in PEFT
format that `peft` loads to equal logits, and merges (tools/merge_lora.py) to equal logits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from qwenvl.data.annotations import parse_sample
from qwenvl.data.arguments import DataArguments
from qwenvl.data.collators import collate_padded
from qwenvl.data.pipeline import build_encoder
from qwenvl.model import load_model
from qwenvl.model.lora import LoraSettings, apply_lora, save_adapter
from qwenvl.train.argument import parse_args
from qwenvl.train.optimizer import build_optimizer
from qwenvl.train.param_groups import build_param_groups
from qwenvl.train.train_qwen import configure_trainable
from qwenvl.train.train_step import TrainStep
from tests.hf_child import run_child

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import merge_lora  # noqa: E402

DEMO = ROOT / "demo"


@pytest.fixture(scope="module")
def tiny(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen2.5vl")


@pytest.fixture(scope="module")
def batch(tiny) -> dict:
    encoder = build_encoder(tiny, DataArguments())
    item = {"image": "images/red_circle_0.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red circle."}]}  # fmt: skip
    return collate_padded([encoder.encode(parse_sample(item, str(DEMO)))], pad_token_id=encoder.special.pad)


def _logits(model, batch) -> np.ndarray:
    model.set_train(False)
    return model.logits(**model.prepare_inputs(batch)).asnumpy()


def _randomise_adapters(model, seed: int = 3) -> None:
    rng = np.random.default_rng(seed)
    for name, param in model.parameters_and_names():
        if ".lora_B." in name:
            param.set_data(Tensor(rng.normal(0, 0.05, param.shape).astype(np.float32)))


def _lora_model(tiny, *flags: str):
    model_args, _, training = parse_args(["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", *flags])
    model = load_model(tiny)
    counts = configure_trainable(model, model_args, training)
    return model, training, counts


def test_adapters_start_at_base_and_only_they_train(tiny, batch):
    base = _logits(load_model(tiny), batch)
    model, training, counts = _lora_model(tiny, "--tune_mm_mlp", "True", "--learning_rate", "1e-2")
    np.testing.assert_allclose(_logits(model, batch), base, atol=1e-6)  # B = 0 at the start
    names = model.lora_modules
    assert len(names) == 2 * 4 and all(n.startswith("model.language_model.layers.") for n in names)
    assert counts["llm"] == 0 and counts["lm_head"] == 0 and counts["merger"] > 0 and counts["lora"] > 0
    before = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    step = TrainStep(model, build_optimizer(build_param_groups(model, training), training), training)
    model.set_train(True)
    for _ in range(2):
        step.run([model.prepare_inputs(batch)], 1.0)
    after = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed, "nothing trained"
    assert all(".lora_" in n or n.startswith("model.visual.merger.") for n in changed)
    assert any(".lora_B." in n for n in changed) and any(n.startswith("model.visual.merger.") for n in changed)


def test_vision_lora_targets_the_vision_attention(tiny):
    model, _, _ = _lora_model(tiny, "--lora_vision", "True", "--lora_target_modules", "q_proj,v_proj")
    vision = [n for n in model.lora_modules if n.startswith("model.visual.")]
    assert sorted({n.rsplit(".", 1)[1] for n in vision}) == ["proj", "qkv"]
    assert sorted({n.rsplit(".", 1)[1] for n in model.lora_modules if "language_model" in n}) == ["q_proj", "v_proj"]


def test_peft_loads_the_adapter_to_equal_logits(tiny, batch, tmp_path):
    model = load_model(tiny)
    apply_lora(model, LoraSettings(4, 8.0, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj")))
    _randomise_adapters(model)
    ours = _logits(model, batch)
    assert np.abs(ours - _logits(load_model(tiny), batch)).max() > 1e-3  # the adapter matters
    save_adapter(model, tmp_path / "adapter", str(tiny))
    ref = run_child(tmp_path / "child", {"task": "peft_logits", "base": str(tiny), "adapter": str(tmp_path / "adapter")}, batch)
    np.testing.assert_allclose(ours, ref["logits"], atol=1e-5)


def test_merge_tool_gives_the_adapter_logits(tiny, batch, tmp_path, capsys):
    model = load_model(tiny)
    apply_lora(model, LoraSettings(4, 8.0, 0.0, ("q_proj", "v_proj"), vision=True))
    _randomise_adapters(model, seed=5)
    ours = _logits(model, batch)
    save_adapter(model, tmp_path / "adapter", str(tiny))
    assert merge_lora.main(["--base", str(tiny), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert "merged 8 LoRA modules" in capsys.readouterr().out  # 2 LLM layers x 2 + 2 vision blocks x 2
    merged = load_model(tmp_path / "merged")
    np.testing.assert_allclose(_logits(merged, batch), ours, atol=1e-5)
    assert (tmp_path / "merged" / "preprocessor_config.json").is_file()


def test_merge_tool_reports_a_missing_adapter(tiny, tmp_path, capsys):
    assert merge_lora.main(["--base", str(tiny), "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "adapter_config.json not found" in capsys.readouterr().err
