"""Damaged checkpoints and a full disk, through the trainer: every damage kind is passed over with a one-line
warning and the run resumes from the previous intact checkpoint, exactly; a named damaged checkpoint and a
failed write are one-line errors that keep the earlier checkpoints."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwenvl.train import trainer as trainer_module
from qwenvl.train.checkpoint import CheckpointError, checkpoint_problem, complete_checkpoints, write_checkpoint
from qwenvl.train.trainer import Trainer
from tests.test_checkpoint import DAMAGE, _damage, _state
from tests.test_trainer import Samples, ToyFiles, _args, _collate, _train, _weights
from tests.toy_model import ToyVLForConditionalGeneration


def _trainer(out: Path, *extra: str) -> Trainer:
    return Trainer(ToyVLForConditionalGeneration(seed=0), _args(out, *extra), Samples(12), _collate, ToyFiles(), progress=False)


def _fake_checkpoints(out: Path, steps: tuple[int, ...]) -> None:
    def files(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"weights-0123456789")
        (folder / "optimizer.safetensors").write_bytes(b"optimizer")

    for step in steps:
        write_checkpoint(out, step, files, _state(step))


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_resume_passes_over_a_damaged_latest_checkpoint(tmp_path, kind, capsys):
    _fake_checkpoints(tmp_path, (2, 4, 6))
    _damage(kind, tmp_path / "checkpoint-6")
    assert _trainer(tmp_path)._agreed_intact_checkpoint() == tmp_path / "checkpoint-4"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[train] warning: skipping {tmp_path / 'checkpoint-6'}: ")
    assert DAMAGE[kind] in lines[0] and lines[0].endswith("falling back to the previous checkpoint")


def test_every_checkpoint_damaged_means_a_fresh_start_with_a_warning_each(tmp_path, capsys):
    _fake_checkpoints(tmp_path, (2, 4))
    _damage("one flipped bit", tmp_path / "checkpoint-4")
    _damage("missing optimizer", tmp_path / "checkpoint-2")
    assert _trainer(tmp_path)._agreed_intact_checkpoint() is None
    out = capsys.readouterr().out
    assert "checkpoint-4: model.safetensors does not match" in out and "checkpoint-2: optimizer.safetensors is missing" in out


def test_a_named_damaged_checkpoint_is_a_one_line_error(tmp_path):
    _fake_checkpoints(tmp_path, (2, 4))
    _damage("truncated weights", tmp_path / "checkpoint-2")
    trainer = _trainer(tmp_path / "new", "--resume_from_checkpoint", str(tmp_path / "checkpoint-2"))
    with pytest.raises(CheckpointError) as caught:
        trainer._find_resume()
    message = str(caught.value)
    assert "\n" not in message
    assert message == (f"--resume_from_checkpoint {tmp_path / 'checkpoint-2'}: cannot resume, "
                       "model.safetensors is truncated (3 bytes, 18 expected)")  # fmt: skip
    missing = _trainer(tmp_path / "new", "--resume_from_checkpoint", str(tmp_path / "checkpoint-9"))
    with pytest.raises(CheckpointError, match="checkpoint-9: cannot resume, not a folder"):
        missing._find_resume()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """6 steps with checkpoints at 2, 4 and 6, and the final weights."""
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer, _ = _train(out, "--max_steps", "6", "--save_steps", "2")
    return out, _weights(trainer)


def _assert_same_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_falling_back_resumes_exactly(uninterrupted, tmp_path, capsys):
    """Bit flips in the newest weights: resume from checkpoint-4 and end bitwise on the uninterrupted weights."""
    source, want = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(source, out)
    _damage("one flipped bit", out / "checkpoint-6")
    trainer, summary = _train(out, "--max_steps", "6", "--save_steps", "2", seed=1)
    assert summary.resumed_from == str(out / "checkpoint-4") and summary.steps == 6
    assert "skipping" in capsys.readouterr().out
    _assert_same_weights(_weights(trainer), want)
    assert checkpoint_problem(out / "checkpoint-6") is None  # rewritten whole


@pytest.mark.slow
def test_a_full_disk_keeps_the_earlier_checkpoints_and_the_restart_resumes_exactly(uninterrupted, tmp_path, monkeypatch):
    """ENOSPC simulated in-process: the optimizer writer of checkpoint-4 writes part of the file, then fails."""
    _, want = uninterrupted
    real_save = trainer_module.save_optimizer_state

    def full_disk(path, arrays, metadata):
        step = int(Path(path).parent.name.rsplit("-", 1)[1])
        if step == 4:
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, arrays, metadata)

    monkeypatch.setattr(trainer_module, "save_optimizer_state", full_disk)
    with pytest.raises(CheckpointError) as caught:
        _train(tmp_path, "--max_steps", "6", "--save_steps", "2")
    assert str(caught.value) == (f"cannot write checkpoint-4 in {tmp_path}: No space left on device; "
                                 "the earlier checkpoints are kept")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "train_log.jsonl"]  # no temp folder
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None
    monkeypatch.setattr(trainer_module, "save_optimizer_state", real_save)
    trainer, summary = _train(tmp_path, "--max_steps", "6", "--save_steps", "2", seed=1)
    assert summary.resumed_from == str(tmp_path / "checkpoint-2")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    _assert_same_weights(_weights(trainer), want)
