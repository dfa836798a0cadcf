"""Per-rank data shards, and a real two-process data-parallel run under msrun against one process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwenvl.train.distributed import DataParallel, launched_by_msrun, shard_indices
from tests.toy_batches import CFG
from tests.toy_model import ToyVLForConditionalGeneration

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


@pytest.mark.slow
def test_two_process_data_parallel_equals_one_process(tmp_path):
    """msrun, 2 CPU workers (MindSpore's CPU collectives): DP and ZeRO-1 equal a 1-process run on the full batch."""
    from tests.dp_worker import OPTIMS, STEPS, train

    msrun = Path(sys.executable).with_name("msrun")
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT)}
    for key in ("MS_ROLE", "MS_WORKER_NUM", "RANK_ID", "RANK_SIZE"):
        env.pop(key, None)
    command = [
        str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}", "--join=True",
        f"--log_dir={logs}", "python", str(ROOT / "tests" / "dp_worker.py"), str(out),
    ]
    # a session of its own, so a hang is ended with msrun's workers and scheduler, not just msrun
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    worker_logs = "\n".join(
        f"--- {p.name}\n" + "\n".join(line for line in p.read_text(errors="replace").splitlines() if "[INFO]" not in line)[-3000:]
        for p in sorted(logs.glob("*.log"))
    )
    assert proc.returncode == 0, f"msrun failed ({proc.returncode}):\n{output[-2000:]}\n{worker_logs}"

    reference = train(DataParallel(), "adamw_mindspore")
    assert len(reference["_loss"]) == STEPS
    for optim in OPTIMS:
        for rank in range(2):
            got = dict(np.load(out / f"{optim}-rank{rank}.npz"))
            assert set(got) == set(reference)
            for name in ("_loss", "_grad_norm"):
                np.testing.assert_allclose(got[name], reference[name], rtol=1e-5, err_msg=f"{optim} rank {rank} {name}")
            for name, want in reference.items():
                np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-5, err_msg=f"{optim} rank {rank} {name}")
    # the weights moved: the comparison above is not between untouched initialisations
    initial = {n: p.asnumpy() for n, p in ToyVLForConditionalGeneration(CFG).parameters_and_names()}
    assert max(np.abs(reference[n] - w).max() for n, w in initial.items()) > 1e-4
