"""The memory estimator: parameter lists equal the built models', predictions within 15% of bench/memory.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from workloads import config_for  # noqa: E402

from qwenvl.parallel.memory_estimate import MiB, Plan, estimate  # noqa: E402
from qwenvl.parallel.model_tensors import lora_tensors, model_tensors  # noqa: E402
from tools.estimate_memory import KNOWN_CONFIGS, RECIPES, chosen_stage, recipe_plan  # noqa: E402
from tools.make_tiny_model import tiny_config  # noqa: E402

IDS = {"vocab_size": 300, "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3,
       "vision_end_token_id": 4, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}  # fmt: skip
# Recorded measurements (peak RSS, MiB, max over ranks and phases) on the 2-core CPU machine, MindSpore 2.7.0 (256
# text tokens, batch 1), BENCHMARKS.md runs B-L of 2026-12-02 (every float16 step updating: before 8ec4c39 the
# bench's float16 steps all overflowed at the 2**16 start scale and skipped the optimizer update, so the points
# recorded before then lacked it). Whole graph:
#   GLOG_v=3 python bench/memory.py --modes fp32 --sizes mem109m,mem136m,mem163m --steps 2 --workload text256 \
#       --token_workload text512           (run B2, 52907e0; ZeRO-3 and LoRA: run K, 8ec4c39; ZeRO-2: run K2, e212c9c)
MEASURED = {
    ("fp32", "mem109m"): 2254, ("fp32", "mem136m"): 2664, ("fp32", "mem163m"): 3128,
    ("zero2_fp16", "mem109m"): 2456, ("zero2_fp16", "mem136m"): 2810, ("zero2_fp16", "mem163m"): 3187,
    ("zero3_fp16", "mem109m"): 2037, ("zero3_fp16", "mem136m"): 2280, ("zero3_fp16", "mem163m"): 2539,
    ("lora_fp16", "mem109m"): 1034, ("lora_fp16", "mem136m"): 1182, ("lora_fp16", "mem163m"): 1334,
}  # fmt: skip
# The same modes with `--layer_by_layer --steps 3`: fp32 run I (52907e0), LoRA run J (52907e0 with the bench's
# float16 fix), ZeRO-2 and ZeRO-3 runs M and N (e212c9c, the host gather).
MEASURED_LAYER_BY_LAYER = {
    ("fp32", "mem109m"): 2262, ("fp32", "mem136m"): 2694, ("fp32", "mem163m"): 3136,
    ("zero2_fp16", "mem109m"): 2278, ("zero2_fp16", "mem136m"): 2524, ("zero2_fp16", "mem163m"): 2761,
    ("zero3_fp16", "mem109m"): 2129, ("zero3_fp16", "mem136m"): 2282, ("zero3_fp16", "mem163m"): 2470,
    ("lora_fp16", "mem109m"): 1016, ("lora_fp16", "mem136m"): 1074, ("lora_fp16", "mem163m"): 1136,
}  # fmt: skip
MODES = {  # bench/memory.py MODES
    "fp32": dict(world=1, stage=0, dtype="fp32", tune_vision=True),
    "zero2_fp16": dict(world=2, stage=2, dtype="fp16", tune_vision=True),
    "zero3_fp16": dict(world=2, stage=3, dtype="fp16", tune_vision=True),
    "lora_fp16": dict(world=1, stage=0, dtype="fp16", lora_r=16, tune_merger=False),
}


@pytest.mark.parametrize("family", ["qwen2vl", "qwen2.5vl", "qwen3vl", "qwen3vl_moe"])
def test_tensors_equal_the_built_model(family):
    from qwenvl.model import build_model, named_parameters
    from qwenvl.model.lora import LoraSettings, apply_lora
    from qwenvl.model.weight_ops import sourced_weights

    config = tiny_config(family, IDS)
    model = build_model(config)
    base = model_tensors(config)
    assert {t.name: t.shape for t in base} == {n: tuple(p.shape) for n, p in named_parameters(model).items()}
    sourced = {id(getattr(cell, name)) for cell, name in sourced_weights(model)}
    assert {t.name for t in base if t.matrix} == {n for n, p in named_parameters(model).items() if id(p) in sourced}
    apply_lora(model, LoraSettings(4, 8.0, 0.0, ("q_proj", "v_proj")))
    adapters = {n: tuple(p.shape) for n, p in model.parameters_and_names() if ".lora_" in n}
    assert {t.name: t.shape for t in lora_tensors(base, 4, ("q_proj", "v_proj"))} == adapters


@pytest.mark.parametrize("mode,size", sorted(MEASURED))
def test_cpu_prediction_within_15_percent_of_measurement(mode, size):
    plan = Plan(seq_len=256, device="cpu", recompute=False, **MODES[mode])
    predicted = estimate(config_for(size), plan).total / MiB
    assert abs(predicted / MEASURED[(mode, size)] - 1) <= 0.15, (mode, size, predicted)


@pytest.mark.parametrize("mode,size", sorted(MEASURED_LAYER_BY_LAYER))
def test_cpu_layer_by_layer_prediction_within_15_percent_of_measurement(mode, size):
    plan = Plan(seq_len=256, device="cpu", recompute=False, layer_by_layer=True, **MODES[mode])
    predicted = estimate(config_for(size), plan).total / MiB
    assert abs(predicted / MEASURED_LAYER_BY_LAYER[(mode, size)] - 1) <= 0.15, (mode, size, predicted)


def test_layer_by_layer_keeps_one_stage_of_whole_gradients_at_zero2():
    """ZeRO-2 over 8 ranks, bf16: whole gradients of every tensor without it; with it the chunks (1/8) plus the
    largest stage's whole gradients (here the stage before the layers: embeddings and merger)."""
    config = config_for("mem109m")  # vocab 32768 x hidden 1024: the embedding table outweighs a decoder layer
    tensors = model_tensors(config)
    whole = estimate(config, Plan(world=8, stage=2, dtype="bf16", seq_len=1))
    layered = estimate(config, Plan(world=8, stage=2, dtype="bf16", seq_len=1, layer_by_layer=True))
    trained = [t for t in tensors if t.part != "vision"]
    assert whole.gradients == pytest.approx(2 * sum(t.numel for t in trained))
    before_layers = sum(t.numel for t in trained if t.name.startswith(("model.language_model.embed_tokens.",
                                                                       "model.visual.")))  # fmt: skip
    assert before_layers > 32768 * 1024
    assert layered.gradients == pytest.approx(2 * sum(t.numel for t in trained) / 8 + 2 * before_layers)


def test_model_states_by_hand():
    """fp32 stage 0 = 16 bytes per trainable parameter; ZeRO-2 bf16 over 8 = 2 + 2 + 12/8; frozen = 2."""
    config = config_for("mem109m")
    params = sum(t.numel for t in model_tensors(config))
    full = estimate(config, Plan(world=1, stage=0, dtype="fp32", tune_vision=True, seq_len=1))
    assert full.weights + full.gradients + full.optimizer == pytest.approx(16 * params)
    zero2 = estimate(config, Plan(world=8, stage=2, dtype="bf16", tune_vision=True, seq_len=1))
    assert zero2.weights + zero2.gradients + zero2.optimizer == pytest.approx((4 + 12 / 8) * params)
    frozen = estimate(config, Plan(world=8, stage=2, dtype="bf16", tune_llm=False, tune_merger=False, seq_len=1))
    assert frozen.weights == 2 * params and frozen.gradients == frozen.optimizer == 0


def test_recipe_flags_are_read_from_the_scripts():
    repo, plan = recipe_plan(ROOT / "scripts" / "sft_qwen3vl_30b_a3b_lora.sh")
    assert repo == "Qwen/Qwen3-VL-30B-A3B-Instruct"
    assert (plan.lora_r, plan.micro_batch, plan.seq_len, plan.stage) == (64, 1, 8192, 3)
    assert plan.vision_patches == 256 * 32 * 32 // 16**2 and not plan.tune_llm
    _, plan = recipe_plan(ROOT / "scripts" / "sft_qwen3vl_8b.sh")
    assert (plan.micro_batch, plan.accumulation, plan.lora_r) == (2, 8, 0)


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_each_recipe_uses_the_stage_the_estimator_chooses(script):
    repo, plan = recipe_plan(ROOT / "scripts" / script)
    assert plan.stage == chosen_stage(KNOWN_CONFIGS[repo], plan)


def test_known_configs_have_the_published_parameter_counts():
    """Totals of the Hugging Face model cards (3.75 B, 8.29 B, 4.44 B, 8.77 B, 31.1 B), to 0.5%."""
    published = {"Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9, "Qwen/Qwen2.5-VL-7B-Instruct": 8.29e9,
                 "Qwen/Qwen3-VL-4B-Instruct": 4.44e9, "Qwen/Qwen3-VL-8B-Instruct": 8.77e9,
                 "Qwen/Qwen3-VL-30B-A3B-Instruct": 31.1e9}  # fmt: skip
    for repo, total in published.items():
        assert sum(t.numel for t in model_tensors(KNOWN_CONFIGS[repo])) == pytest.approx(total, rel=5e-3), repo


def test_cli_json_and_bad_input(tmp_path):
    import json
    import subprocess

    (tmp_path / "config.json").write_text(json.dumps(config_for("mem109m")))
    tool = str(ROOT / "tools" / "estimate_memory.py")
    out = subprocess.run([sys.executable, tool, "--model", str(tmp_path), "--world", "2", "--zero_stage", "3",
                          "--dtype", "fp16", "--seq_len", "256", "--device", "cpu", "--json"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    report = json.loads(out)
    assert report["params"] == 108_996_736 and report["bytes"]["zero3_gathered"] > 0
    bad = subprocess.run([sys.executable, tool, "--model", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr


def test_readme_recipe_table_is_the_tools_output(capsys):
    from tools.estimate_memory import print_recipe_table, recipe_rows

    print_recipe_table(recipe_rows())
    table = capsys.readouterr().out
    assert table.strip() in (ROOT / "README.md").read_text(encoding="utf-8")
