"""What a run records (args.json) and how a rerun is compared with the checkpoint it would resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qwenvl.train.argument import parse_args
from qwenvl.train.checkpoint import DataPosition, TrainerState
from qwenvl.train.run_record import clear_previous_run, json_safe, resume_conflicts, run_args, write_run_args


def _record(*flags: str, world_size: int = 1) -> dict:
    return run_args(*parse_args(["--dataset_use", "a%50", *flags]), world_size=world_size)


def _checkpoint(folder: Path, record: dict | None, total_steps: int = 12, **position) -> Path:
    folder.mkdir(parents=True)
    data = DataPosition(seed=42, world_size=1, dataset_size=12, micro_batch_size=8, accumulation_steps=1)
    data = DataPosition(**{**data.__dict__, **position})
    (folder / "trainer_state.json").write_text(TrainerState(global_step=4, max_steps=total_steps, data=data).to_json())
    (folder / "scheduler.json").write_text(json.dumps({"total_steps": total_steps}))
    if record is not None:
        write_run_args(folder, record)
    return folder


def test_same_flags_spelled_differently_do_not_conflict(tmp_path):
    saved = _record("--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate":0.1}')
    now = _record("--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}',
                  "--output_dir", "elsewhere", "--logging_steps", "7")  # fmt: skip
    assert resume_conflicts(_checkpoint(tmp_path / "c", saved), now, 12, 12) == []


def test_changed_flags_are_named_saved_to_now(tmp_path):
    checkpoint = _checkpoint(tmp_path / "c", _record("--learning_rate", "1e-3"))
    now = _record("--learning_rate", "2e-3", "--dataset_use", "b", "--seed", "7", world_size=2)
    assert resume_conflicts(checkpoint, now, 12, 12) == [
        "--dataset_use a%50 -> b", "--seed 42 -> 7", "--world_size 1 -> 2",
        "--learning_rate 0.001 -> 0.002"]  # fmt: skip


def test_checkpoints_without_args_json_are_compared_by_data_position_and_schedule(tmp_path):
    checkpoint = _checkpoint(tmp_path / "c", None)
    assert resume_conflicts(checkpoint, _record("--gradient_accumulation_steps", "2"), 12, 12) == [
        "--gradient_accumulation_steps 1 -> 2"]  # fmt: skip
    assert resume_conflicts(checkpoint, _record(), 12, 20) == ["training samples 12 -> 20 (the data changed)"]
    assert resume_conflicts(checkpoint, _record(), 30, 12) == [
        "total steps 12 -> 30 (--num_train_epochs or --max_steps changed)"]  # fmt: skip


def test_overwrite_clears_the_previous_run_but_not_other_files(tmp_path):
    for name in ("checkpoint-4", "checkpoint-8", ".tmp-checkpoint-12", "runs", "my_notes"):
        (tmp_path / name).mkdir()
    for name in ("train_log.jsonl", "train_summary.json", "args.json", "model.safetensors", "eval_results.json"):
        (tmp_path / name).write_text("x")
    clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.json", "model.safetensors", "my_notes"]


def test_json_safe_turns_undefined_numbers_into_null():
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": "nan", "e": 2}
    expected = '{"a": null, "b": [1.0, null, {"c": null}], "d": "nan", "e": 2}'
    assert json.dumps(json_safe(value), allow_nan=False) == expected
