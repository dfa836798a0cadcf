"""Checkpoint folders: atomic publication, the multi-rank protocol, discovery, rotation, RNG and shards."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from qwenvl.train.checkpoint import (
    DataPosition,
    ShardedArrays,
    TrainerState,
    checkpoint_step,
    latest_checkpoint,
    optimizer_files,
    read_trainer_state,
    remove_partial_checkpoints,
    restore_rng_state,
    rng_state,
    rotate_checkpoints,
    save_arrays,
    write_checkpoint,
)


def _state(step: int) -> TrainerState:
    return TrainerState(
        global_step=step, max_steps=100, epoch=step / 10, data=DataPosition(epoch=1, step_in_epoch=step % 10, seed=3, world_size=2),
        tokens_seen=1234, skipped_steps=1, bad_samples=["a.jsonl:7"], log_history=[{"step": step, "loss": 1.5}],
    )


def _write(root: Path, step: int, payload: str = "weights") -> Path | None:
    return write_checkpoint(root, step, lambda d: (d / "model.safetensors").write_text(payload), _state(step))


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_write_publishes_a_complete_folder(tmp_path):
    path = _write(tmp_path, 5)
    assert path == tmp_path / "checkpoint-5"
    assert _entries(tmp_path) == ["checkpoint-5"]
    assert _entries(path) == ["model.safetensors", "trainer_state.json"]
    assert read_trainer_state(path) == _state(5)
    assert latest_checkpoint(tmp_path) == path


def test_a_failing_writer_leaves_no_checkpoint(tmp_path):
    _write(tmp_path, 1)

    def broken(folder: Path) -> None:
        (folder / "model.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, 2, broken, _state(2))
    assert _entries(tmp_path) == ["checkpoint-1"]  # neither checkpoint-2 nor a temporary folder
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert (tmp_path / "checkpoint-1" / "model.safetensors").read_text() == "weights"


def test_saving_a_step_again_replaces_it(tmp_path):
    _write(tmp_path, 3, "old")
    _write(tmp_path, 3, "new")
    assert _entries(tmp_path) == ["checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / "model.safetensors").read_text() == "new"


def test_two_ranks_write_their_files_into_one_folder(tmp_path):
    barrier = threading.Barrier(2, timeout=30)
    results: dict[int, Path | None] = {}

    def rank(r: int) -> None:
        results[r] = write_checkpoint(
            tmp_path, 7, lambda d: (d / "model.safetensors").write_text("w"), _state(7), is_main=r == 0,
            barrier=barrier.wait, write_rank_files=lambda d: (d / f"optimizer-rank{r}.safetensors").write_text(str(r)),
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: tmp_path / "checkpoint-7", 1: None}
    assert _entries(tmp_path / "checkpoint-7") == [
        "model.safetensors", "optimizer-rank0.safetensors", "optimizer-rank1.safetensors", "trainer_state.json",
    ]


def test_latest_ignores_incomplete_and_foreign_folders(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    _write(tmp_path, 9)
    _write(tmp_path, 10)  # numeric order: 10 is newer than 9
    (tmp_path / "checkpoint-11").mkdir()  # no trainer_state.json: a crash or another tool
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "checkpoint-12" / "model.safetensors").write_text("w")
    (tmp_path / ".tmp-checkpoint-13").mkdir()
    (tmp_path / ".tmp-checkpoint-13" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-final").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert remove_partial_checkpoints(tmp_path) == [tmp_path / ".tmp-checkpoint-13"]
    assert ".tmp-checkpoint-13" not in _entries(tmp_path) and "checkpoint-11" in _entries(tmp_path)


def test_rotation_keeps_the_newest(tmp_path):
    for step in (2, 10, 4, 8, 6):
        _write(tmp_path, step)
    (tmp_path / "checkpoint-1").mkdir()  # incomplete: not counted, not deleted
    assert rotate_checkpoints(tmp_path, None) == [] and rotate_checkpoints(tmp_path, 0) == []
    deleted = rotate_checkpoints(tmp_path, 2)
    assert deleted == [tmp_path / f"checkpoint-{s}" for s in (2, 4, 6)]
    assert _entries(tmp_path) == ["checkpoint-1", "checkpoint-10", "checkpoint-8"]
    assert rotate_checkpoints(tmp_path, 5) == []


def test_checkpoint_step_names():
    assert checkpoint_step("out/checkpoint-42") == 42
    assert checkpoint_step("checkpoint-x") is None and checkpoint_step(".tmp-checkpoint-3") is None


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist()


def test_rng_state_round_trips_through_json():
    """Python and numpy streams replay; MindSpore's default generator state is restored exactly.

    (On CPU, `ops.rand`/`ops.uniform` draw from per-op seeds, not from this generator.)
    """
    random.seed(1)
    np.random.seed(2)
    ms.set_seed(3)
    _draws()
    saved = json.loads(json.dumps(rng_state()))
    expected, generator = _draws(), ms.get_rng_state().asnumpy()
    _draws()
    ms.manual_seed(99)
    assert not np.array_equal(ms.get_rng_state().asnumpy(), generator)
    restore_rng_state(saved)
    np.testing.assert_array_equal(ms.get_rng_state().asnumpy(), generator)
    assert _draws() == expected


def test_sharded_arrays_view_every_rank_file(tmp_path):
    save_arrays(tmp_path / "optimizer-rank0.safetensors", {"exp_avg.a": np.arange(3, dtype=np.float32), "step": np.asarray(4)})
    save_arrays(tmp_path / "optimizer-rank1.safetensors", {"exp_avg.b": np.ones((2, 2), np.float32), "step": np.asarray(4)})
    save_arrays(tmp_path / "optimizer.safetensors", {"exp_avg.c": np.zeros(1, np.float32)})
    files = optimizer_files(tmp_path)
    assert [f.name for f in files] == ["optimizer.safetensors", "optimizer-rank0.safetensors", "optimizer-rank1.safetensors"]
    view = ShardedArrays(files[1:])
    assert sorted(view) == ["exp_avg.a", "exp_avg.b", "step"] and len(view) == 3
    np.testing.assert_array_equal(view["exp_avg.a"], np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(view["exp_avg.b"], np.ones((2, 2), np.float32))
    assert int(view["step"]) == 4
    with pytest.raises(KeyError):
        view["exp_avg.c"]
