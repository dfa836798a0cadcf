"""Checkpoint folders `output_dir/checkpoint-N/`: atomic writes, discovery for resume, rotation.

A checkpoint is written into a hidden temporary folder, every file is fsynced, and the folder is
renamed into place (an atomic rename on POSIX), so a crash mid-write never leaves a `checkpoint-N`
that resume would pick up; leftovers are removed at the next start. `trainer_state.json` is written
last and is required for a folder to count as complete (folders from other tools without it are
ignored).

Contents: model weights + config (`save_model`), tokenizer and processor files, optimizer and
loss-scale state (`optimizer.safetensors`, or one `optimizer-rank<r>.safetensors` per rank for
ZeRO-1 whose moments are sharded), `scheduler.json`, per-rank `rng_state-rank<r>.json`, and
`trainer_state.json` (global step, data position, HF-like `log_history`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-"
TRAINER_STATE_NAME = "trainer_state.json"
SCHEDULER_NAME = "scheduler.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass
class DataPosition:
    """Where the data stream stands: the epoch's shuffled order is a function of (seed, epoch, world)."""

    epoch: int = 0
    step_in_epoch: int = 0
    seed: int = 0
    world_size: int = 1
    dataset_size: int = 0
    micro_batch_size: int = 1
    accumulation_steps: int = 1


@dataclass
class TrainerState:
    """`trainer_state.json`: what resume needs beyond tensors, in Hugging Face's spirit."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    data: DataPosition = field(default_factory=DataPosition)
    tokens_seen: int = 0
    skipped_steps: int = 0
    bad_samples: list[str] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        raw = json.loads(text)
        raw["data"] = DataPosition(**raw.get("data", {}))
        return cls(**raw)


def checkpoint_step(path: str | Path) -> int | None:
    """N for a folder named `checkpoint-N`, else None."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of `output_dir`, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (step, path)
        for path in root.iterdir()
        if (step := checkpoint_step(path)) is not None and (path / TRAINER_STATE_NAME).is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete temporary folders left by a crash mid-write; returns what was removed."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TEMP_PREFIX + CHECKPOINT_PREFIX)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def rotate_checkpoints(output_dir: str | Path, limit: int | None) -> list[Path]:
    """Keep the newest `limit` complete checkpoints (HF's save_total_limit); returns the deleted ones."""
    if not limit or limit <= 0:
        return []
    found = complete_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - limit)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def temp_checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{TEMP_PREFIX}{CHECKPOINT_PREFIX}{step}"


def publish_checkpoint(temp_dir: Path, final_dir: Path) -> Path:
    """fsync everything, then rename the temporary folder into place.

    An older folder of the same step (a resumed run saving again) is first moved aside under a
    temporary name, so at no moment does a half-deleted `checkpoint-N` exist.
    """
    _fsync_tree(temp_dir)
    displaced = temp_dir.with_name(temp_dir.name + ".old")
    if final_dir.exists():
        os.rename(final_dir, displaced)
    os.rename(temp_dir, final_dir)
    _fsync(final_dir.parent)
    shutil.rmtree(displaced, ignore_errors=True)
    return final_dir


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    write_files: Callable[[Path], None],
    state: TrainerState,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    write_rank_files: Callable[[Path], None] = lambda path: None,
) -> Path | None:
    """The multi-rank write protocol; returns the published folder on the main rank.

    main creates the temp folder -> barrier -> every rank writes its own files -> barrier -> main writes
    the shared files and `trainer_state.json`, publishes -> barrier. On an error the temp folder is
    removed and the previous checkpoints are untouched.
    """
    temp_dir = temp_checkpoint_dir(output_dir, step)
    final_dir = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    try:
        if is_main:
            shutil.rmtree(temp_dir, ignore_errors=True)
            temp_dir.mkdir(parents=True)
        barrier()
        write_rank_files(temp_dir)
        barrier()
        published = None
        if is_main:
            write_files(temp_dir)
            (temp_dir / TRAINER_STATE_NAME).write_text(state.to_json(), encoding="utf-8")
            published = publish_checkpoint(temp_dir, final_dir)
        barrier()
        return published
    except BaseException:
        if is_main:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def read_trainer_state(checkpoint: str | Path) -> TrainerState:
    return TrainerState.from_json((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(value) for name, value in arrays.items()}, str(path))


class ShardedArrays(Mapping[str, np.ndarray]):
    """A read-only mapping over several safetensors files, read one tensor at a time on access.

    ZeRO-1 optimizer shards from every rank are viewed as one state, so a run can resume at another
    world size: each rank's optimizer looks up only the moments it owns.
    """

    def __init__(self, paths: list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        for path in paths:
            with safe_open(str(path), "np") as handle:
                for key in handle.keys():
                    self._where.setdefault(key, path)

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self._where[key]), "np") as handle:
            return handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def optimizer_files(checkpoint: str | Path) -> list[Path]:
    root = Path(checkpoint)
    return sorted(root.glob("optimizer.safetensors")) + sorted(root.glob("optimizer-rank*.safetensors"))


def rng_state() -> dict[str, Any]:
    """Python, numpy (global) and MindSpore generator states of this process, JSON-ready."""
    import mindspore as ms

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "mindspore": ms.get_rng_state().asnumpy().tolist(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    import mindspore as ms

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    ms.set_rng_state(ms.Tensor(np.asarray(state["mindspore"], np.uint8)))


def rng_file(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / f"rng_state-rank{rank}.json"
