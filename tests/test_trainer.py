"""The training loop on the toy VL model: loss, logs, checkpoints, rotation, resume, bad samples, dry run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor

from qwenvl.constants import IGNORE_INDEX
from qwenvl.data.buckets import ShapeBuckets
from qwenvl.data.collators import collate_padded
from qwenvl.data.dataset import EncodedSample
from qwenvl.data.errors import SampleError
from qwenvl.train.argument import parse_args
from qwenvl.train.checkpoint import complete_checkpoints, read_trainer_state
from qwenvl.train.train_step import seed_everything
from qwenvl.train.trainer import Trainer
from tests.toy_model import ToyVLForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]


def _sample(i: int) -> EncodedSample:
    """Counting sequences mod 40 (offset 5): a pattern the toy LM learns within a few steps."""
    length = 10 + i % 4
    ids = (5 + (i + np.arange(length)) % 40).astype(np.int64)
    labels = ids.copy()
    labels[: length // 2] = IGNORE_INDEX
    return EncodedSample(ids, labels, np.broadcast_to(np.arange(length), (3, length)).copy(), [length])


class Samples:
    def __init__(self, n: int, bad: set[int] = frozenset()) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> EncodedSample:
        if i in self.bad:
            raise SampleError("cannot read image missing.png", "train.json", i)
        return _sample(i)


class ToyFiles:
    """Weights as one safetensors file by parameter name (the toy has no HF twin)."""

    def save(self, model, out_dir: Path, write: bool = True) -> None:
        from safetensors.numpy import save_file

        if write:
            save_file({n: p.asnumpy() for n, p in model.parameters_and_names()}, str(out_dir / "model.safetensors"))

    def load_into(self, model, checkpoint: Path) -> None:
        from safetensors.numpy import load_file

        weights = load_file(str(checkpoint / "model.safetensors"))
        for name, param in model.parameters_and_names():
            param.set_data(Tensor(weights[name]))


def _collate(samples):
    return collate_padded(samples, pad_token_id=0, buckets=ShapeBuckets((16, 32, 64, 128)))


def _args(out: Path, *extra: str):
    _, _, training = parse_args(
        ["--output_dir", str(out), "--learning_rate", "1e-2", "--per_device_train_batch_size", "2",
         "--logging_steps", "2", "--save_steps", "4", "--num_train_epochs", "2", "--warmup_steps", "1",
         "--lr_scheduler_type", "cosine", "--weight_decay", "0.01", *extra]
    )  # fmt: skip
    return training


def _train(out: Path, *extra: str, dataset=None, seed: int = 0, **config):
    seed_everything(0)
    model = ToyVLForConditionalGeneration(seed=seed, **config)
    trainer = Trainer(model, _args(out, *extra), dataset or Samples(12), _collate, ToyFiles(), progress=False)
    return trainer, trainer.train()


def _weights(trainer) -> dict[str, np.ndarray]:
    return {n: p.asnumpy() for n, p in trainer.model.parameters_and_names()}


def test_loss_goes_down_logs_and_rotating_checkpoints(tmp_path):
    trainer, summary = _train(tmp_path, "--save_total_limit", "2")
    assert trainer.total_steps == 12 and summary.steps == 12  # 12 samples / batch 2 = 6 steps x 2 epochs
    assert summary.last_loss < 0.8 * summary.first_loss
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-8", "checkpoint-12"]
    state = read_trainer_state(tmp_path / "checkpoint-12")
    assert state.global_step == 12 and (state.data.epoch, state.data.step_in_epoch) == (2, 0)
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6, 8, 10, 12]
    # every group follows one schedule: warmup 1 step then cosine over 12; step 2's LR used factor(1)
    factor = 0.5 * (1 + np.cos(np.pi * (1 - 1) / 11))
    assert lines[0]["lr"]["base_decay"] == pytest.approx(1e-2 * factor)
    assert set(lines[0]["lr"]) == {"base_decay", "base_no_decay"}
    assert lines[-1]["tokens_per_s"] > 0 and "peak_rss_mib" in lines[-1]["memory"]
    assert (tmp_path / "checkpoint-12" / "optimizer-rank0.safetensors").is_file()
    assert (tmp_path / "checkpoint-12" / "rng_state-rank0.json").is_file()


# vocabulary 8192 x hidden 32 = 2^18: the embedding and the head take the CPU Adam kernel with scaled moments
@pytest.mark.parametrize("vocab", [48, 8192])
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, vocab):
    full, _ = _train(tmp_path / "full", "--max_steps", "8", vocab_size=vocab)
    assert any(full.step_fn.optimizer.scaled) == (vocab == 8192)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", resumed_dir / "checkpoint-4")
    # different initial weights: only a real resume of weights, moments and data position can match
    resumed, summary = _train(resumed_dir, "--max_steps", "8", seed=1, vocab_size=vocab)
    assert summary.resumed_from.endswith("checkpoint-4") and summary.steps == 8
    ref, got = _weights(full), _weights(resumed)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_resume_refuses_a_different_batch_layout(tmp_path):
    _train(tmp_path, "--max_steps", "4")
    with pytest.raises(ValueError, match="data order"):
        _train(tmp_path, "--max_steps", "8", "--gradient_accumulation_steps", "2")


def test_bad_sample_stops_with_its_location_by_default(tmp_path):
    with pytest.raises(SampleError, match=r"file train\.json, sample 3: cannot read image missing\.png"):
        _train(tmp_path, dataset=Samples(12, bad={3}))


def test_skip_bad_samples_trains_on_and_counts_once_per_sample(tmp_path):
    trainer, summary = _train(tmp_path, "--skip_bad_samples", dataset=Samples(12, bad={3}))
    assert summary.steps == 12
    assert summary.bad_samples == ["file train.json, sample 3: cannot read image missing.png"]
    assert read_trainer_state(tmp_path / "checkpoint-12").bad_samples == summary.bad_samples


def test_dry_run_writes_no_checkpoint(tmp_path, capsys):
    _, summary = _train(tmp_path, "--max_steps", "3", "--dry_run")
    assert summary.steps == 3 and complete_checkpoints(tmp_path) == []
    assert "[dry_run] 3 steps, mean step" in capsys.readouterr().out


def test_help_lists_flags_without_importing_mindspore():
    code = (
        "import sys\n"
        "from qwenvl.train.argument import parse_args\n"
        "try:\n    parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('MINDSPORE_LOADED' if 'mindspore' in sys.modules else 'NO_MINDSPORE')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for flag in ("--model_name_or_path", "--dataset_use", "--max_pixels", "--optim", "--save_total_limit", "--skip_bad_samples"):
        assert flag in out
    assert out.strip().endswith("NO_MINDSPORE")


def test_eval_loss_and_perplexity_during_training(tmp_path):
    seed_everything(0)
    model = ToyVLForConditionalGeneration(seed=0)
    args = _args(tmp_path, "--eval_strategy", "steps", "--eval_steps", "3", "--max_steps", "6",
                 "--per_device_eval_batch_size", "3", "--save_strategy", "no")  # fmt: skip
    eval_set = [_sample(i) for i in range(7)]  # 7 samples (seen in training): batches of 3, 3, 1
    trainer = Trainer(model, args, Samples(12), _collate, ToyFiles(), progress=False, eval_dataset=eval_set)
    trainer.train()
    records = [r for r in trainer.state.log_history if "eval_loss" in r]
    assert [r["step"] for r in records] == [3, 6]
    assert records[1]["eval_loss"] < records[0]["eval_loss"]
    # independent: the final model's summed loss over every eval sample, one at a time, / token count
    model.set_train(False)
    sums = [model(**model.prepare_inputs(_collate([s]))) for s in eval_set]
    expected = sum(float(a) for a, _ in sums) / sum(float(b) for _, b in sums)
    assert records[1]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert records[1]["eval_perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
    assert records[1]["eval_tokens"] == sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in eval_set)
