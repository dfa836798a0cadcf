"""Compiled train-step graphs: one per input signature, counted, timed, reported in the log and the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mindspore import Tensor

from qwenvl.constants import IGNORE_INDEX
from qwenvl.data.dataset import EncodedSample
from qwenvl.train.graph_tracker import GraphTracker, describe, signature
from qwenvl.train.train_step import seed_everything
from qwenvl.train.trainer import Trainer
from tests.test_trainer import ToyFiles, _args, _collate
from tests.toy_model import ToyVLForConditionalGeneration


def test_signature_keys_shape_dtype_and_absent_inputs():
    a = [Tensor(np.zeros((2, 16), np.int32)), None]
    b = [Tensor(np.zeros((2, 32), np.int32)), None]
    c = [Tensor(np.zeros((2, 16), np.int32)), Tensor(np.zeros(3, np.float32))]
    names = ["input_ids", "pixel_values"]
    keys = {signature(names, v) for v in (a, b, c, [Tensor(np.ones((2, 16), np.int32)), None])}
    assert len(keys) == 3
    assert describe(signature(names, a)) == "input_ids 2x16 Int32, pixel_values -"


def _key(length: int) -> tuple:
    return (("input_ids", (1, length), "Int32"),)


def test_compile_seconds_is_first_calls_minus_the_steady_median():
    tracker = GraphTracker()
    tracker.observe(_key(1), 5.0)
    assert tracker.compile_seconds == 5.0  # no steady call yet: the whole first call
    tracker.observe(_key(2), 3.0)
    for seconds in (1.0, 0.5, 2.0):
        tracker.observe(_key(1), seconds)
    assert tracker.graphs == 2
    assert tracker.compile_seconds == (5.0 - 1.0) + (3.0 - 1.0)
    assert [g.index for g in tracker.take_new()] == [1, 2] and tracker.take_new() == []


def test_warning_past_16_graphs_then_at_each_doubling_and_once_late_in_the_run():
    tracker = GraphTracker()
    warned = []
    for n in range(1, 70):
        tracker.observe(_key(n), 1.0)
        if tracker.warning(step=n, total_steps=1000, compiled_now=True):
            warned.append(n)
    assert warned == [17, 33, 65]
    late = GraphTracker()
    late.observe(_key(1), 1.0)
    assert late.warning(step=60, total_steps=100, compiled_now=False) is None
    message = late.warning(step=60, total_steps=100, compiled_now=True)
    assert "Shape buckets" in message and "step 60 of 100" in message
    assert late.warning(step=70, total_steps=100, compiled_now=True) is None  # once


class Lengths:
    """Counting samples whose padded length (multiple of 16) is 16 or 32 as `lengths` says, sample by sample."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> EncodedSample:
        length = self.lengths[i]
        ids = (5 + (i + np.arange(length)) % 40).astype(np.int64)
        labels = ids.copy()
        labels[: length // 2] = IGNORE_INDEX
        return EncodedSample(ids, labels, np.broadcast_to(np.arange(length), (3, length)).copy(), [length])


def _run(tmp_path, lengths: list[int]):
    seed_everything(0)
    args = _args(tmp_path, "--per_device_train_batch_size", "1", "--num_train_epochs", "1", "--logging_steps", "1",
                 "--save_strategy", "no", "--peak_tflops", "0.05")  # fmt: skip
    trainer = Trainer(ToyVLForConditionalGeneration(), args, Lengths(lengths), _collate, ToyFiles(), progress=False)
    summary = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    return summary, records


@pytest.mark.slow
def test_two_sequence_lengths_compile_two_graphs_one_length_one(tmp_path, capsys):
    summary, records = _run(tmp_path / "two", [12, 12, 20, 20])  # padded to 16, 16, 32, 32 (shuffled)
    out = capsys.readouterr().out
    assert records[-1]["graphs"] == 2 and summary.graphs == 2
    assert out.count("compiled train-step graph") == 2
    assert "input_ids 1x16 Int32" in out and "input_ids 1x32 Int32" in out
    assert "2 train-step graph(s) compiled" in out
    assert summary.compile_seconds > 0 and records[-1]["compile_s"] == summary.compile_seconds
    # MFU from --peak_tflops: model FLOP/s over the peak
    assert all(abs(r["mfu"] - r["tflops"] / 0.05) < 1e-12 for r in records)
    assert "mfu " in out and "tok/s" in out

    summary, records = _run(tmp_path / "one", [12, 13, 14, 15])
    assert [r["graphs"] for r in records] == [1, 1, 1, 1] and summary.graphs == 1
