"""What a run records about itself, and whether a rerun may continue it.

`args.json` (every flag of the run plus the world size) goes into `output_dir` and into every
checkpoint, as the Hugging Face Trainer keeps `training_args.bin` and LLaMA-Factory `training_args.yaml`:
a finished folder tells how it was made, and a rerun is compared with the checkpoint it would resume.
Resuming continues the data order and the LR schedule of the checkpoint, so flags that change either are
named in a `ResumeConflict` instead of silently mixing two runs. `train_summary.json` is written through
`json_safe`: undefined numbers (no step trained) become null, never the bare `NaN` that is not JSON.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qwenvl.data.processor_files import RUN_ARGS_FILE as RUN_ARGS_NAME
from qwenvl.errors import FlagError
from qwenvl.train.checkpoint import (
    CHECKPOINT_PREFIX,
    SCHEDULER_NAME,
    TEMP_PREFIX,
    checkpoint_step,
    read_trainer_state,
)

# Flags that decide which sample each step sees and which learning rate it uses.
ORDER_FLAGS = (
    "dataset_use", "data_packing", "seed", "per_device_train_batch_size", "gradient_accumulation_steps",
    "world_size", "num_train_epochs", "max_steps", "learning_rate", "mm_projector_lr", "vision_tower_lr",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "group_by_modality_length",
    "group_by_length",
)  # fmt: skip
# What a previous run leaves in output_dir besides its final model files.
RUN_OUTPUTS = ("train_log.jsonl", "train_summary.json", RUN_ARGS_NAME, "runs")


class ResumeConflict(FlagError):
    """A rerun whose flags would not continue the checkpoint's data order or schedule."""


def run_args(*arg_groups, world_size: int) -> dict[str, Any]:
    """Every flag of the run (the three argument dataclasses) and the number of data-parallel ranks."""
    record: dict[str, Any] = {}
    for group in arg_groups:
        record.update(asdict(group))
    if isinstance(record.get("lr_scheduler_kwargs"), str):  # JSON text: compared by value, not by spelling
        record["lr_scheduler_kwargs"] = json.loads(record["lr_scheduler_kwargs"])
    record["world_size"] = world_size
    return record


def write_run_args(folder: str | Path, record: dict[str, Any]) -> Path:
    path = Path(folder) / RUN_ARGS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def read_run_args(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / RUN_ARGS_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class WithRunArgs:
    """Model files (`HFModelFiles`) that also write `args.json` into every folder they save."""

    def __init__(self, files, record: dict[str, Any]) -> None:
        self.files = files
        self.record = record

    def save(self, model, out_dir: Path, write: bool = True) -> None:
        self.files.save(model, out_dir, write=write)
        if write:
            write_run_args(out_dir, self.record)

    def load_into(self, model, checkpoint: Path) -> None:
        self.files.load_into(model, checkpoint)

    def __getattr__(self, name: str):
        return getattr(self.files, name)


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) or value is None else str(value)


def resume_conflicts(checkpoint: Path, current: dict[str, Any], total_steps: int, dataset_size: int) -> list[str]:
    """`--flag saved -> now` for every order or schedule setting that differs from the checkpoint's run.

    Flags come from the checkpoint's `args.json`; checkpoints without one (older runs, other tools) are
    compared through what every checkpoint holds: the data position and the schedule's total steps.
    """
    conflicts, named = [], set()
    saved = read_run_args(checkpoint)
    if saved is not None:
        named = {k for k in ORDER_FLAGS if k in saved and saved[k] != current.get(k)}
        conflicts = [f"--{k} {_show(saved[k])} -> {_show(current.get(k))}" for k in ORDER_FLAGS if k in named]
    data = read_trainer_state(checkpoint).data
    position = {"seed": data.seed, "world_size": data.world_size, "per_device_train_batch_size": data.micro_batch_size,
                "gradient_accumulation_steps": data.accumulation_steps}  # fmt: skip
    conflicts += [f"--{k} {v} -> {current.get(k)}" for k, v in position.items()
                  if v != current.get(k) and k not in named]  # fmt: skip
    if data.dataset_size != dataset_size:
        conflicts.append(f"training samples {data.dataset_size} -> {dataset_size} (the data changed)")
    scheduler = Path(checkpoint) / SCHEDULER_NAME
    if scheduler.is_file() and not conflicts:
        saved_total = json.loads(scheduler.read_text(encoding="utf-8")).get("total_steps")
        if saved_total is not None and saved_total != total_steps:
            conflicts.append(f"total steps {saved_total} -> {total_steps} (--num_train_epochs or --max_steps changed)")
    return conflicts


def conflict_message(output_dir: Path, checkpoint: Path, conflicts: list[str]) -> str:
    return (
        f"{checkpoint} was saved by a run with other settings: {'; '.join(conflicts)}. Resuming would not continue "
        f"its data order and schedule. Restore those flags to resume, pass --overwrite_output_dir True to train "
        f"afresh in {output_dir} (its checkpoints and logs are deleted), or choose another --output_dir"
    )


def clear_previous_run(output_dir: str | Path) -> list[Path]:
    """Delete the checkpoints and logs of an earlier run in `output_dir` (for `--overwrite_output_dir`).

    They must go: left in place, a later automatic resume would pick a stale checkpoint of the old run,
    and `save_total_limit` would rotate new checkpoints against old ones. Final model files are
    overwritten by the new run's final save.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    doomed = [p for p in root.iterdir()
              if checkpoint_step(p) is not None or p.name.startswith(TEMP_PREFIX + CHECKPOINT_PREFIX)
              or p.name in RUN_OUTPUTS]  # fmt: skip
    for path in doomed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return doomed


def json_safe(value: Any) -> Any:
    """NaN and infinities -> None (JSON null), recursively; everything else unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
