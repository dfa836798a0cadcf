"""Step plans per rank, resume from a data position, and bad samples delivered with their own step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qwenvl.constants import IGNORE_INDEX
from qwenvl.data.dataset import EncodedSample
from qwenvl.data.errors import DatasetError, SampleError
from qwenvl.train.data_loader import StepLoader, epoch_plan, steps_per_epoch, total_steps


class IndexDataset:
    """Item i is a sample of i + 1 tokens whose first token is i; listed indices fail like bad media."""

    def __init__(self, n: int, bad: dict[int, str] | None = None, crash: int | None = None) -> None:
        self.n, self.bad, self.crash = n, bad or {}, crash

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> EncodedSample:
        if index in self.bad:
            raise SampleError("image cannot be decoded", self.bad[index], index)
        if index == self.crash:
            raise RuntimeError(f"disk gone at {index}")
        ids = np.full(index + 1, index, np.int64)
        return EncodedSample(ids, ids.copy(), np.zeros((3, index + 1), np.int64), [index + 1])


def collate(samples: list[EncodedSample]) -> dict[str, np.ndarray]:
    return {"first": np.array([int(s.input_ids[0]) for s in samples]), "labels": np.concatenate([s.labels for s in samples])}


def test_steps_per_epoch_and_total_steps_hand_values():
    # 10 items, 2 ranks -> 5 each; micro-batch 2 -> 3 micro-batches; accumulation 2 -> 2 steps
    assert steps_per_epoch(10, 2, 2, 2) == 2
    assert steps_per_epoch(11, 2, 2, 2) == 2  # 6 per rank (padded) -> 3 micro-batches -> 2 steps
    assert steps_per_epoch(16, 2, 2, 2) == 2
    assert steps_per_epoch(17, 2, 2, 2) == 3
    assert steps_per_epoch(7, 1, 1, 1) == 7
    assert total_steps(2.0, -1, 5) == 10
    assert total_steps(0.5, 0, 5) == 3  # fractional epochs round up
    assert total_steps(3.0, 4, 5) == 4  # max_steps wins
    assert total_steps(0.01, -1, 5) == 1


@pytest.mark.parametrize("n,world,micro,accum", [(12, 2, 2, 3), (13, 3, 2, 2), (5, 1, 3, 1), (9, 4, 1, 2)])
def test_epoch_plans_cover_every_index_across_ranks(n, world, micro, accum):
    for epoch in range(2):
        plans = [epoch_plan(n, rank, world, seed=1, epoch=epoch, micro_batch=micro, accumulation=accum) for rank in range(world)]
        assert all(len(plan) == steps_per_epoch(n, world, micro, accum) for plan in plans)
        for plan in plans:
            assert all(1 <= len(step) <= accum for step in plan)
            assert all(1 <= len(mb) <= micro for step in plan for mb in step)
            assert all(len(step) == accum for step in plan[:-1])  # only the epoch's last step may be short
        flat = np.concatenate([mb for plan in plans for step in plan for mb in step])
        padding = -(-n // world) * world - n
        assert len(flat) == n + padding
        assert set(flat.tolist()) == set(range(n))
        assert np.bincount(flat, minlength=n).max() == (2 if padding else 1)
    first = epoch_plan(n, 0, world, 1, 0, micro, accum)
    assert [mb.tolist() for s in first for mb in s] == [mb.tolist() for s in epoch_plan(n, 0, world, 1, 0, micro, accum) for mb in s]


def _firsts(step) -> list[list[int]]:
    return [mb["first"].tolist() for mb in step.micro_batches]


def _take(loader: StepLoader, count: int, epoch: int = 0, step: int = 0) -> list:
    iterator = loader.iterate(epoch, step)
    try:
        return list(itertools.islice(iterator, count))
    finally:
        iterator.close()


def test_loader_follows_the_plan_across_epochs_and_resumes():
    loader = StepLoader(IndexDataset(10), collate, rank=1, world=2, seed=4, micro_batch=2, accumulation=2)
    per_epoch = loader.steps_per_epoch
    assert per_epoch == 2
    steps = _take(loader, 3 * per_epoch)
    assert [(s.epoch, s.step_in_epoch) for s in steps] == [(e, i) for e in range(3) for i in range(per_epoch)]
    for s in steps:
        plan = epoch_plan(10, 1, 2, 4, s.epoch, 2, 2)[s.step_in_epoch]
        assert _firsts(s) == [mb.tolist() for mb in plan]
        assert s.n_samples == sum(len(mb) for mb in plan)
        assert s.n_input_tokens == sum(int(i) + 1 for mb in plan for i in mb)  # item i has i + 1 tokens
        assert s.bad == []
    for start in range(1, len(steps)):
        resumed = _take(loader, len(steps) - start, *divmod(start, per_epoch))
        assert [(s.epoch, s.step_in_epoch, _firsts(s)) for s in resumed] == [(s.epoch, s.step_in_epoch, _firsts(s)) for s in steps[start:]]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_samples_arrive_with_their_step(num_workers):
    """A bad sample is reported (file and index kept) in the step that holds it; the rest of it trains."""
    n, micro, accum = 8, 2, 2
    plan = epoch_plan(n, 0, 1, 0, 0, micro, accum)
    bad_index = int(plan[1][0][0])  # first item of the second step
    # every item of a whole micro-batch of the last step is bad too
    all_bad = [int(i) for i in plan[1][1]]
    bad = {bad_index: "a.jsonl", **{i: "b.jsonl" for i in all_bad}}
    loader = StepLoader(IndexDataset(n, bad), collate, micro_batch=micro, accumulation=accum, num_workers=num_workers)
    first, second = _take(loader, 2)
    assert first.bad == [] and first.n_samples == 4
    assert [(e.file, e.index, e.reason) for e in second.bad] == [
        ("a.jsonl", bad_index, "image cannot be decoded"),
        *(("b.jsonl", i, "image cannot be decoded") for i in all_bad),
    ]
    assert second.n_samples == 1
    kept, empty = second.micro_batches
    assert kept["first"].tolist() == [int(plan[1][0][1])]
    # a micro-batch with no good sample is a one-token placeholder with no label: ranks stay in step
    assert empty["first"].tolist() == [0] and (empty["labels"] == IGNORE_INDEX).all()


def test_other_errors_reach_the_consumer():
    loader = StepLoader(IndexDataset(6, crash=epoch_plan(6, 0, 1, 0, 0, 1, 1)[2][0][0]), collate)
    iterator = loader.iterate()
    assert len(list(itertools.islice(iterator, 2))) == 2  # the steps before the crash arrive first
    with pytest.raises(RuntimeError, match="disk gone"):
        next(iterator)


def test_an_empty_dataset_is_refused_at_once():
    """It used to loop over empty epochs at 100% CPU forever."""
    with pytest.raises(DatasetError, match="no samples"):
        StepLoader(IndexDataset(0), collate)


@pytest.mark.parametrize("start", [0, 2])
def test_an_epoch_of_only_bad_samples_stops_instead_of_training_on_placeholders(start):
    """Every step of such an epoch is a one-token placeholder: an endless run of skipped steps. A resumed
    partial epoch (start 2) is not judged, the next whole one is."""
    n = 5
    loader = StepLoader(IndexDataset(n, bad={i: "all_bad.jsonl" for i in range(n)}), collate, micro_batch=2)
    iterator = loader.iterate(0, start)
    delivered = []
    with pytest.raises(DatasetError, match=f"all {n} samples of an epoch are bad"):
        for step in iterator:
            delivered.append((step.epoch, step.step_in_epoch))
    iterator.close()
    per_epoch = loader.steps_per_epoch
    whole_epoch = [(1, s) for s in range(per_epoch - 1)] if start else [(0, s) for s in range(per_epoch - 1)]
    assert delivered == [(0, s) for s in range(start, per_epoch)] * bool(start) + whole_epoch
