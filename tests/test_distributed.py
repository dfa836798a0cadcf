"""Per-rank data shards, and a real two-process data-parallel run under msrun against one process."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from qwenvl.parallel.world import DataParallel, launched_by_msrun
from qwenvl.train.data_loader import shard_indices

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 4), (1, 1)])
def test_shards_are_disjoint_and_cover_every_sample(n, world):
    for epoch in range(3):
        shards = [shard_indices(n, rank, world, seed=3, epoch=epoch) for rank in range(world)]
        per_rank = -(-n // world)
        assert all(len(s) == per_rank for s in shards)
        merged = np.concatenate(shards)
        assert set(merged.tolist()) == set(range(n))
        # padding repeats exactly (world * per_rank - n) samples, the first of the permutation (wrap-around)
        counts = np.bincount(merged, minlength=n)
        assert counts.sum() == world * per_rank and counts.max() <= 1 + (world * per_rank - n > 0)
        if n % world == 0:
            assert len(merged) == n and (counts == 1).all()


def test_ranks_share_one_permutation_that_changes_per_epoch():
    n, world = 13, 3

    def interleaved(epoch: int) -> list[int]:
        """The common order rebuilt from the shards: position i is rank i % world's (i // world)-th index."""
        shards = [shard_indices(n, r, world, seed=7, epoch=epoch) for r in range(world)]
        return [int(shards[i % world][i // world]) for i in range(len(shards[0]) * world)]

    orders = [interleaved(epoch) for epoch in range(3)]
    for order in orders:
        assert sorted(order[:n]) == list(range(n))  # one permutation, then wrap-around padding
        assert order[n:] == order[: len(order) - n]
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] == interleaved(0)  # a pure function of (seed, epoch)
    assert shard_indices(n, 0, world, seed=8, epoch=0).tolist() != shard_indices(n, 0, world, seed=7, epoch=0).tolist()
    assert shard_indices(5, 1, 2, seed=0, epoch=0, shuffle=False).tolist() == [1, 3, 0]  # 0..4 padded with 0


def test_shard_indices_rejects_bad_rank():
    with pytest.raises(ValueError, match="outside"):
        shard_indices(4, 2, 2, 0, 0)
    assert shard_indices(0, 0, 2, 0, 0).size == 0


def test_world_of_one_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)
    assert not launched_by_msrun()
    dp = DataParallel()
    assert dp.is_main and not DataParallel(1, 2).is_main
    assert dp.all_reduce_sum([1, 2]) == [1, 2]  # no collective in a world of one
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_WORKER_NUM", "2")
    assert launched_by_msrun()
    monkeypatch.setenv("MS_ROLE", "MS_SCHED")  # msrun's scheduler runs the script too and must init()
    assert launched_by_msrun()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
