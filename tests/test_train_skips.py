"""Skipped steps end to end (train_qwen.py on a tiny Qwen2.5-VL): an fp16 overflow and a micro-batch whose every
sample is bad are skipped, counted, and training goes on to the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwenvl.train.train_qwen import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _flags(model_dir: Path, out: Path, dataset: str, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_use", dataset, "--output_dir", str(out),
            "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--model_max_length", "256", "--save_strategy", "no", *extra]  # fmt: skip


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_fp16_overflow_is_skipped_and_training_goes_on(tiny_model_factory, tmp_path, capsys):
    """GradScaler's 2**16 start overflows the tiny model's fp16 gradients: the step is skipped, the scale halves."""
    out = tmp_path / "fp16"
    flags = _flags(tiny_model_factory("qwen2.5vl"), out, "demo_images%25", "--fp16", "True", "--max_steps", "4",
                   "--per_device_train_batch_size", "2")  # fmt: skip
    assert main(flags) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_steps"] >= 1
    assert "skipped: fp16 overflow" in capsys.readouterr().out
    assert _log(out)[-1]["skipped_steps"] == summary["skipped_steps"]


def test_a_micro_batch_of_only_bad_samples_is_a_skipped_step(tiny_model_factory, tmp_path, capsys):
    """Batch 1 over 4 samples, one with a missing image: that step has no supervised token and is skipped."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    samples = []
    for i, name in enumerate(["red_circle_0.png", "blue_square_0.png", "missing.png", "green_triangle_0.png"]):
        if name != "missing.png":
            shutil.copy(ROOT / "demo" / "images" / name, data / "images" / name)
        samples.append({"image": f"images/{name}", "conversations": [
            {"from": "human", "value": "<image>\nWhat do you see?"}, {"from": "gpt", "value": f"Shape {i}."}]})  # fmt: skip
    (data / "train.json").write_text(json.dumps(samples))
    out = tmp_path / "bad"
    flags = _flags(tiny_model_factory("qwen2.5vl"), out, str(data / "train.json"), "--skip_bad_samples", "True",
                   "--per_device_train_batch_size", "1", "--num_train_epochs", "1")  # fmt: skip
    assert main(flags) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    assert len(summary["bad_samples"]) == 1 and "sample 2" in summary["bad_samples"][0]
    assert "skipped: no supervised tokens" in capsys.readouterr().out
