"""Runs of consecutive small tensors, so the gradient norm launches a few large kernels instead of many small ones.

On a small model the norm is launch-bound: three CPU kernels per tensor, each waiting for the previous (the chain
bounds the temporaries to one tensor's), ~30 us apiece. Tensors below RUN_ELEMENTS are grouped into runs of at
most RUN_ELEMENTS values; a run is handled as one piece (its temporaries are at most one run's), a larger tensor
alone, as before.
"""

from __future__ import annotations

from typing import Sequence

RUN_ELEMENTS = 2**18  # 1 MiB of float32 per run


def small_runs(sizes: Sequence[int], limit: int = RUN_ELEMENTS) -> tuple[tuple[int, ...], ...]:
    """Consecutive index groups, in order: each tensor of `limit` values or more alone, the smaller ones joined
    while their total stays within `limit`."""
    runs: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if size >= limit:
            runs.append([index])
            total = limit  # nothing joins a large tensor's run
            continue
        if not runs or total + size > limit:
            runs.append([])
            total = 0
        runs[-1].append(index)
        total += size
    return tuple(tuple(run) for run in runs)
