"""The benchmark harness against torch (bench/workloads.py, torch_reference.py, torch_memory.py, vs_torch.py).

The torch parts need the reference venv (bash bench/make_torch_venv.sh); without it they skip saying so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from torch_memory import marginal_bytes_per_param  # noqa: E402
from torch_reference import resolve_torch_python  # noqa: E402
from workloads import (  # noqa: E402
    QWEN_IDS,
    check_vision_grads,
    make_batch,
    stored_parameters,
    token_mean_cross_entropy,
    vision_grad_summary,
)

ENV = {**os.environ, "GLOG_v": "3"}


@pytest.fixture(scope="module")
def torch_python() -> str:
    path = resolve_torch_python(None)
    if path is None:
        pytest.skip("torch reference venv absent (bash bench/make_torch_venv.sh creates it)")
    return path


def test_loss_definition_hand_computed():
    # targets: position 0 predicts labels[1] = 1 from logits [0, 0]; position 1 predicts labels[2] = 0 from
    # [ln 3, 0] (p = 3/4); position 2 has no next label; labels[0] = -100 is never a target.
    logits = np.array([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = np.array([[-100, 1, 0]])
    assert token_mean_cross_entropy(logits, labels) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, rel=1e-12)
    assert token_mean_cross_entropy(logits, np.array([[7, -100, 0]])) == pytest.approx(math.log(4 / 3), rel=1e-12)


def test_image_workload_layout():
    batch = make_batch("image448", "120m")
    ids = batch["input_ids"][0]
    assert ids.shape == (458,) and batch["position_ids"].shape == (3, 1, 458)
    assert (ids == QWEN_IDS["image_token_id"]).sum() == 256  # 32 x 32 patches merged 2 x 2
    start = int(np.flatnonzero(ids == QWEN_IDS["vision_start_token_id"])[0])
    assert start == 100 and ids[start + 257] == QWEN_IDS["vision_end_token_id"]
    targets = np.flatnonzero(batch["labels"][0] != -100)
    assert targets.tolist() == list(range(358, 458)) and (batch["labels"][0, targets] == ids[targets]).all()
    assert batch["pixel_values"].shape == (1024, 3 * 2 * 14 * 14) and batch["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert ids[:100].max() < min(QWEN_IDS.values())


def test_text_workload_is_all_targets_inside_the_vocabulary():
    batch = make_batch("text512", "tiny")
    assert batch["input_ids"].shape == (1, 512) and (batch["labels"] == batch["input_ids"]).all()
    assert batch["input_ids"].min() >= 16 and batch["input_ids"].max() < 512
    assert (batch["position_ids"] == np.arange(512)).all()


def test_vision_gradient_check_names_zero_gradients():
    grads = [("model.visual.blocks.0.attn.qkv.weight", np.ones((2, 2))),
             ("model.visual.merger.mlp.0.bias", np.zeros(3)),
             ("model.language_model.norm.weight", np.zeros(2))]  # fmt: skip
    summary = vision_grad_summary(grads)
    assert summary["tensors"] == 2 and summary["norm"] == pytest.approx(2.0)
    with pytest.raises(AssertionError, match="1/2 vision-tower gradients are all zero"):
        check_vision_grads(summary, "x")
    check_vision_grads(vision_grad_summary(grads[:1]), "x")
    with pytest.raises(AssertionError, match="no vision-tower gradients"):
        check_vision_grads(vision_grad_summary(grads[2:]), "x")


def test_marginal_bytes_per_param_is_the_slope():
    points = [{"params": n, "peak_rss_mib": (300 * 2**20 + 16 * n) / 2**20} for n in (10**6, 3 * 10**6, 5 * 10**6)]
    assert marginal_bytes_per_param(points) == pytest.approx(16.0)
    with pytest.raises(ValueError):
        marginal_bytes_per_param(points[:1] + [{"error": "out of memory"}])


@pytest.mark.slow
def test_memory_report_slices_the_compiled_graph_out_of_the_slope(capsys):
    import memory

    points = [{"size": "a", "params": 100_000_000, "peak_mib": 1000.0, "compiled_mib": 100.0, "tokens": 256,
               "phases": {}, "step_s": 1.0},
              {"size": "b", "params": 200_000_000, "peak_mib": 2000.0, "compiled_mib": 150.0, "tokens": 256,
               "phases": {}, "step_s": 2.0}]  # fmt: skip
    memory.report({"workload": "text256", "sizes": ["a", "b"], "modes": {"lora_fp16": {"points": points}}})
    out = capsys.readouterr().out
    # by hand: 1000 MiB over 1e8 parameters is 10.49 B/param, of which 50 MiB (0.52) the compiled graph
    assert "marginal 10.5 bytes/param" in out
    assert "compiled graph's host memory 0.5 bytes/param" in out and "without it 10.0 bytes/param" in out
    # bytes per token from the longer batch on the smallest size: 512 tokens, +64 MiB -> 256 KiB per token
    longer = {"peak_mib": 1064.0, "tokens": 512}
    memory.report({"workload": "text256", "sizes": ["a", "b"], "modes": {"fp32": {"points": points, "longer": longer}}})
    assert "256 KiB per token (256 -> 512 tokens, a)" in capsys.readouterr().out
    longer = {"peak_mib": 999.0, "tokens": 512}  # a token-independent phase set both peaks
    memory.report({"workload": "text256", "sizes": ["a", "b"], "modes": {"fp32": {"points": points, "longer": longer}}})
    assert "per token: not measurable (256 -> 512 tokens, a)" in capsys.readouterr().out
    longer = {"peak_mib": 1000.0, "tokens": 256}  # --token_workload the same as --workload: no division by zero
    memory.report({"workload": "text256", "sizes": ["a", "b"], "modes": {"fp32": {"points": points, "longer": longer}}})
    assert "per token: --token_workload has 256 tokens, not more than --workload's 256" in capsys.readouterr().out


def test_vs_torch_without_torch_says_not_measured(tmp_path):
    cmd = [sys.executable, "bench/vs_torch.py", "--sizes", "tiny", "--workloads", "text512",
           "--impls", "torch,torch_tuned", "--torch_python", "", "--work", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| tiny, text512"))
    assert row.count("not measured (no --torch_python)") == 2


@pytest.mark.slow
def test_vs_torch_quick_run_checks_losses_and_vision_gradients(tmp_path, torch_python):
    """native vs transformers + torch on the tiny image batch: same step-0 loss, both train, both reach the vision
    tower; the torch process never imports qwenvl or MindSpore."""
    cmd = [sys.executable, "bench/vs_torch.py", "--sizes", "tiny", "--workloads", "image448", "--impls", "native,torch",
           "--steps", "1", "--warmup", "1", "--work", str(tmp_path), "--json", str(tmp_path / "r.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "CHECK FAILED" not in proc.stdout
    results = json.loads((tmp_path / "r.json").read_text())[0]["results"]
    native, torch_ = results["native"], results["torch"]
    assert native["loss0"] == pytest.approx(torch_["loss0"], rel=1e-5)
    assert torch_["losses"][1] < torch_["losses"][0] and native["losses"][1] < native["losses"][0]
    assert not torch_["qwenvl_imported"] and torch_["params"] == stored_parameters(next(tmp_path.glob("tiny-*")))
    assert native["vision_grads"]["zero"] == [] and torch_["vision_grads0"]["zero"] == []
    assert "| tiny, image448 |" in proc.stdout


def test_graph_memory_programs_are_valid_python():
    import graph_memory

    for op in graph_memory.OPS:
        source = graph_memory.generated_source(op, 3)
        compile(source, f"<{op}>", "exec")
        body = source.split("def construct(self, x, w, c, s):")[-1]
        assert body.count(graph_memory.OPS[op].splitlines()[0]) == 3, op


@pytest.mark.slow
def test_graph_memory_shows_a_python_loop_costing_more_than_straight_code():
    import graph_memory

    # the statement of `mul` once per copy, either written out or inside a one-step `for` loop (MindSpore
    # unrolls the loop into graphs of its own): the loop keeps several times the host memory per copy
    result = graph_memory.measure_ops(["mul", "mul_in_for_loop"])
    straight, looped = result["mul"]["kb_per_copy"], result["mul_in_for_loop"]["kb_per_copy"]
    assert straight > 0 and looped > 2 * straight, result
