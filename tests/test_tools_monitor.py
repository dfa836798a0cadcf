"""tools/monitor.py on a synthetic run folder: printed numbers worked by hand, the plot drawn."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import monitor  # noqa: E402

from qwenvl.train.checkpoint import TrainerState, write_checkpoint  # noqa: E402


def _train(step: int, loss, step_time: float) -> dict:
    return {
        "step": step,
        "epoch": step / 50,
        "loss": loss,
        "grad_norm": 0.5 + step / 100,
        "lr": {"llm": 2e-5 * (1 - step / 100), "vision": 2e-6},
        "tokens_per_s": 1000.0 + step,
        "step_time_s": step_time,
        "skipped_steps": 0,
        "memory": {"rss_mib": 2048.4, "peak_rss_mib": 3000.0},
    }


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    lines = [
        _train(10, 2.0, 1.0),
        _train(20, 1.6, 1.2),
        {"step": 20, "eval_loss": 1.5, "eval_perplexity": math.exp(1.5)},
        _train(30, 9.9, 9.0),  # replaced by its re-logged record after the resume below
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    text += "not json at all\n"
    text += "".join(json.dumps(r) + "\n" for r in (_train(30, 1.2, 1.4), _train(40, 1.0, 1.6)))
    text += '{"step": 50, "loss": 0.'  # the record being written right now
    (tmp_path / "train_log.jsonl").write_text(text)
    for step in (10, 20):  # complete checkpoints: trainer state and manifest
        write_checkpoint(tmp_path, step, lambda folder: None, TrainerState(global_step=step, max_steps=100, epoch=step / 50))
    (tmp_path / "checkpoint-30").mkdir()  # incomplete: no trainer_state.json
    return tmp_path


def test_report_numbers(run_dir, capsys):
    assert monitor.main(["--output_dir", str(run_dir), "--window", "3", "--no_plot"]) == 0
    out = capsys.readouterr().out
    assert "progress: step 40/100 (40.0%), epoch 0.80" in out
    # last 3 step times (1.2 + 1.4 + 1.6) / 3 = 1.4 s; 60 steps left -> 84 s
    assert "ETA: 0:01:24 for 60 steps (mean step 1.400 s over the last 3 logs)" in out
    # (1.6 + 1.2 + 1.0) / 3 = 1.2667: the 9.9 of the first step-30 record is gone
    assert "loss: 1.0000 (moving average over the last 3 logs: 1.2667)" in out
    assert "lr: llm 1.200e-05, vision 2.000e-06" in out  # 2e-5 * (1 - 0.4)
    assert "grad_norm: 0.9000   tokens/s: 1040.0" in out
    assert "memory: rss_mib 2048, peak_rss_mib 3000" in out
    assert "last eval: step 20, loss 1.5000, perplexity 4.482" in out
    assert "last checkpoint: checkpoint-20" in out
    assert "unreadable log lines (skipped): 5" in out
    assert not (run_dir / "loss.png").exists()


def test_plot_is_drawn(run_dir):
    monitor.main(["--output_dir", str(run_dir), "--plot_size", "640x480"])
    image = Image.open(run_dir / "loss.png")
    assert image.size == (640, 480)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in np.unique(pixels, axis=0)}
    for colour in (monitor.LOSS_COLOR, monitor.AVERAGE_COLOR, monitor.EVAL_COLOR, *monitor.GROUP_COLORS[:2]):
        assert colour in colours
    top = np.asarray(image.convert("RGB"))[: int(480 * 0.6)]
    assert (top != monitor.BACKGROUND).any(axis=2).mean() > 0.01


def test_moving_average_skips_nan():
    averages = monitor.moving_average([1.0, math.nan, 3.0, 5.0], 2)
    assert averages[:2] == [1.0, 1.0]
    assert averages[2:] == [3.0, 4.0]


def test_nan_loss_string_and_no_checkpoint(tmp_path, capsys):
    record = {"step": 5, "loss": "nan", "lr": 1e-4, "step_time_s": 2, "skipped_steps": 1}
    (tmp_path / "train_log.jsonl").write_text(json.dumps(record) + "\n")
    monitor.main(["--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "step 5 (max_steps unknown before the first checkpoint; pass --max_steps)" in out
    assert "loss: nan" in out and "lr: 1.000e-04" in out and "skipped steps: 1" in out
    assert (tmp_path / "loss.png").is_file()
    monitor.main(["--output_dir", str(tmp_path), "--max_steps", "10", "--no_plot"])
    assert "progress: step 5/10 (50.0%)" in capsys.readouterr().out


def test_watch_refreshes_until_max_steps(run_dir, capsys):
    sleeps = []

    def fake_sleep(seconds: float) -> None:
        """Training moves on while the monitor sleeps: finish the half-written line and reach step 100."""
        sleeps.append(seconds)
        with open(run_dir / "train_log.jsonl", "a") as handle:
            handle.write("5}\n" if len(sleeps) == 1 else json.dumps(_train(100, 0.4, 1.0)) + "\n")

    assert monitor.main(["--output_dir", str(run_dir), "--watch", "7", "--no_plot"], sleep=fake_sleep) == 0
    assert sleeps == [7, 7]
    out = capsys.readouterr().out
    assert out.count("== ") == 3
    assert "progress: step 50/100 (50.0%)" in out
    assert "progress: step 100/100 (100.0%)" in out and "ETA: done" in out


def test_empty_and_missing_output_dir(tmp_path, capsys):
    assert monitor.main(["--output_dir", str(tmp_path)]) == 0
    assert "no training record yet" in capsys.readouterr().out
    assert monitor.main(["--output_dir", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err



def _groups_run(tmp_path: Path) -> Path:
    """Two parameter groups with the same LR all along (decay and no-decay halves of one group), warmup from 0."""
    records = []
    for step in range(1, 41):
        lr = 1e-3 * min(step - 1, 4) / 4 * (1 - step / 41)
        records.append({"step": step, "loss": 2.0 - step / 40, "lr": {"base_decay": lr, "base_no_decay": lr}})
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_lr_axis_starts_at_zero_for_non_negative_values():
    low, high = monitor.axis_range([0.0, 5e-4, 1e-3])
    assert low == 0.0 and high > 1e-3
    assert min(monitor._ticks(low, high)) == 0.0
    assert monitor.axis_range([-1.0, 1.0])[0] < -1.0  # negative data keeps its margin


def test_every_lr_group_stays_visible_when_groups_coincide(tmp_path):
    run = _groups_run(tmp_path)
    assert monitor.main(["--output_dir", str(run), "--plot_size", "800x600"]) == 0
    pixels = np.asarray(Image.open(run / "loss.png").convert("RGB"))
    lr_panel = pixels[int(600 * 0.6) :, 70:500]  # the LR panel's curves, left of its legend
    for colour in monitor.GROUP_COLORS[:2]:
        assert (lr_panel == colour).all(axis=2).sum() > 100, colour
