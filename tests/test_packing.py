"""Global best-fit-decreasing packing against a plain reference implementation and hand cases."""

from __future__ import annotations

import numpy as np
import pytest

from qwenvl.data.packing import best_fit_decreasing, pack_lengths


def _reference_bfd(lengths: list[int], capacity: int) -> list[int]:
    """Textbook BFD (scan every bin, take the fullest that fits); returns the bin loads."""
    loads: list[int] = []
    for n in sorted(lengths, reverse=True):
        fitting = [b for b, load in enumerate(loads) if load + n <= capacity]
        if fitting:
            best = max(fitting, key=lambda b: loads[b])
            loads[best] += n
        else:
            loads.append(n)
    return sorted(loads)


def test_hand_worked_best_fit():
    # 3 -> bin A (2 left), 3 -> bin B (2 left), 2 fills A, 2 fills B, 2 opens C
    packs = best_fit_decreasing([3, 3, 2, 2, 2], 5)
    assert sorted(sum([3, 3, 2, 2, 2][i] for i in p) for p in packs) == [2, 5, 5]


@pytest.mark.parametrize("seed", range(6))
def test_same_bins_as_reference_and_every_index_once(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(20, 200))
    lengths = [int(x) for x in rng.integers(1, capacity + 1, int(rng.integers(1, 300)))]
    packs = best_fit_decreasing(lengths, capacity)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    loads = sorted(sum(lengths[i] for i in p) for p in packs)
    assert max(loads) <= capacity
    assert loads == _reference_bfd(lengths, capacity)


def test_global_packing_never_needs_more_packs_than_chunked():
    rng = np.random.default_rng(7)
    lengths = [int(x) for x in np.clip(rng.lognormal(6.0, 0.8, 3000), 30, 4096)]
    chunked = sum(len(best_fit_decreasing(lengths[i : i + 256], 4096)) for i in range(0, len(lengths), 256))
    result = pack_lengths(lengths, 4096)
    assert result.n_packs < chunked
    assert result.fill_ratio == pytest.approx(sum(lengths) / (result.n_packs * 4096))


def test_oversize_policies():
    lengths = [10, 50, 7, 3]
    own = pack_lengths(lengths, 10, "own_pack")
    assert own.oversize == [1] and [1] in own.packs and own.dropped == []
    assert sorted(i for p in own.packs for i in p) == [0, 1, 2, 3]
    dropped = pack_lengths(lengths, 10, "drop")
    assert dropped.dropped == [1] and sorted(i for p in dropped.packs for i in p) == [0, 2, 3]
    assert dropped.fill_ratio == pytest.approx(20 / 20)
    with pytest.raises(ValueError, match=r"1 samples are longer than pack_length=10 \(first indices \[1\]\)"):
        pack_lengths(lengths, 10, "error")


def test_empty_input_and_bad_arguments():
    assert pack_lengths([], 16).n_packs == 0
    with pytest.raises(ValueError, match="oversize"):
        pack_lengths([1], 16, "split")
    with pytest.raises(ValueError, match="negative"):
        pack_lengths([3, -1], 16)
