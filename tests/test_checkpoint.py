"""Checkpoint folders: atomic publication, the multi-rank protocol, manifests and verification, discovery,
rotation, the atomic final model folder, RNG and shards."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from qwenvl.train.checkpoint import (
    DataPosition,
    TrainerState,
    CheckpointError,
    checkpoint_problem,
    checkpoint_step,
    latest_checkpoint,
    optimizer_files,
    read_trainer_state,
    remove_partial_checkpoints,
    restore_rng_state,
    rng_state,
    rotate_checkpoints,
    write_checkpoint,
    write_model_folder,
)
from qwenvl.train import checkpoint as checkpoint_module


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
    assert _entries(path) == ["manifest.json", "model.safetensors", "trainer_state.json"]
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
        "manifest.json", "model.safetensors", "optimizer-rank0.safetensors", "optimizer-rank1.safetensors",
        "trainer_state.json",
    ]
    # the manifest, written by rank 0, covers rank 1's file too: sizes and SHA-256 of the exact bytes
    manifest = json.loads((tmp_path / "checkpoint-7" / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["model.safetensors", "optimizer-rank0.safetensors", "optimizer-rank1.safetensors",
                                "trainer_state.json"]  # fmt: skip
    assert manifest["optimizer-rank1.safetensors"] == {"size": 1, "sha256": hashlib.sha256(b"1").hexdigest()}
    assert manifest["model.safetensors"] == {"size": 1, "sha256": hashlib.sha256(b"w").hexdigest()}
    assert checkpoint_problem(tmp_path / "checkpoint-7") is None


def test_latest_ignores_incomplete_and_foreign_folders(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    _write(tmp_path, 9)
    _write(tmp_path, 10)  # numeric order: 10 is newer than 9
    (tmp_path / "checkpoint-11").mkdir()  # no trainer_state.json: a crash or another tool
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "checkpoint-12" / "model.safetensors").write_text("w")
    (tmp_path / "checkpoint-14").mkdir()  # a trainer state but no manifest: an older writer or a foreign tool
    (tmp_path / "checkpoint-14" / "trainer_state.json").write_text(_state(14).to_json())
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


def _damage(kind: str, folder: Path) -> None:
    """One kind of damage a checkpoint meets on a real disk or at a careless user's hands."""
    weights, state = folder / "model.safetensors", folder / "trainer_state.json"
    if kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:3])
    elif kind == "zero-byte weights":
        weights.write_bytes(b"")
    elif kind == "garbage weights":  # same size, other bytes
        weights.write_bytes(b"\xff" * weights.stat().st_size)
    elif kind == "one flipped bit":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x10
        weights.write_bytes(bytes(data))
    elif kind == "missing optimizer":
        (folder / "optimizer.safetensors").unlink()
    elif kind == "garbage optimizer":
        (folder / "optimizer.safetensors").write_bytes(b"\x00garbage\x00" * 5)
    elif kind == "garbage trainer state":
        state.write_text("{not json", encoding="utf-8")
    elif kind == "trainer state without its keys":
        state.write_text(json.dumps({"log_history": []}), encoding="utf-8")
    elif kind == "missing manifest":
        (folder / "manifest.json").unlink()
    elif kind == "garbage manifest":
        (folder / "manifest.json").write_text("[1, 2", encoding="utf-8")


DAMAGE = {
    "truncated weights": "model.safetensors is truncated (3 bytes, 18 expected)",
    "zero-byte weights": "model.safetensors is empty (0 bytes, 18 expected)",
    "garbage weights": "model.safetensors does not match its SHA-256 checksum",
    "one flipped bit": "model.safetensors does not match its SHA-256 checksum",
    "missing optimizer": "optimizer.safetensors is missing",
    "garbage optimizer": "optimizer.safetensors is too long (45 bytes, 9 expected)",
    "garbage trainer state": "trainer_state.json is truncated",
    "trainer state without its keys": "trainer_state.json is truncated",
    "missing manifest": "no manifest.json (incomplete",
    "garbage manifest": "manifest.json is unreadable",
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_every_damage_is_found_and_named(tmp_path, kind):
    def files(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"weights-0123456789")  # 18 bytes
        (folder / "optimizer.safetensors").write_bytes(b"optimizer")  # 9 bytes

    path = write_checkpoint(tmp_path, 4, files, _state(4))
    assert checkpoint_problem(path) is None
    _damage(kind, path)
    problem = checkpoint_problem(path)
    assert problem is not None and DAMAGE[kind] in problem and "\n" not in problem


def test_a_trainer_state_without_its_keys_is_refused():
    with pytest.raises(ValueError, match="global_step"):
        TrainerState.from_json(json.dumps({"log_history": []}))
    with pytest.raises(ValueError, match="unexpected"):
        TrainerState.from_json(json.dumps({"global_step": 3, "data": {"epoch": 1, "colour": "red"}}))
    assert TrainerState.from_json(_state(3).to_json()) == _state(3)


def test_a_rotation_cut_short_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (2, 4, 6):
        _write(tmp_path, step)
    real_rmtree = checkpoint_module.shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # the process dies after deleting only the weights
        (Path(path) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        rotate_checkpoints(tmp_path, 2)
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", real_rmtree)
    assert [p.name for p in checkpoint_module.complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert ".tmp-checkpoint-2.deleting" in _entries(tmp_path) and "checkpoint-2" not in _entries(tmp_path)
    assert remove_partial_checkpoints(tmp_path) == [tmp_path / ".tmp-checkpoint-2.deleting"]
    assert _entries(tmp_path) == ["checkpoint-4", "checkpoint-6"]


def test_model_folder_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old config")

    def files(folder: Path) -> None:
        (folder / "config.json").write_text("new config")
        (folder / "model.safetensors").write_bytes(b"new weights")
        (folder / "train_summary.json").write_text("{}")

    moves: list[str] = []
    real_replace = checkpoint_module.os.replace

    def recording_replace(src, dst):
        moves.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", recording_replace)
    write_model_folder(out, files, last="train_summary.json")
    assert moves == ["config.json", "model.safetensors", "train_summary.json"]  # the completion marker last
    assert _entries(out) == ["config.json", "model.safetensors", "train_summary.json"]
    assert (out / "config.json").read_text() == "new config"

    def disk_full(folder: Path) -> None:
        (folder / "config.json").write_text("newer config")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_model_folder(out, disk_full, last="train_summary.json")
    assert _entries(out) == ["config.json", "model.safetensors", "train_summary.json"]  # no temp folder left
    assert (out / "config.json").read_text() == "new config"


def test_stray_temporary_folders_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    for name in (".tmp-final-model", ".tmp-checkpoint-3", ".tmp-checkpoint-3.old", ".tmp-checkpoint-1.deleting"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("")
    (tmp_path / ".tmp-user-notes").mkdir()  # not ours: kept
    removed = remove_partial_checkpoints(tmp_path)
    assert [p.name for p in removed] == [".tmp-checkpoint-1.deleting", ".tmp-checkpoint-3", ".tmp-checkpoint-3.old",
                                         ".tmp-final-model"]  # fmt: skip
    assert _entries(tmp_path) == [".tmp-user-notes"]


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


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


def test_optimizer_files_lists_the_single_file_and_every_rank_file(tmp_path):
    for name in ("optimizer-rank1.safetensors", "optimizer.safetensors", "optimizer-rank0.safetensors", "other.bin"):
        (tmp_path / name).write_bytes(b"x")
    names = [f.name for f in optimizer_files(tmp_path)]
    assert names == ["optimizer.safetensors", "optimizer-rank0.safetensors", "optimizer-rank1.safetensors"]


