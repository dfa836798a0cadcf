"""Offline bin packing of samples (by token count) into packs of at most `pack_length` tokens.

Global best-fit decreasing over the whole file. Upstream runs best-fit decreasing on consecutive chunks
of 256 samples, so packs cannot mix chunks and every chunk leaves a partly empty tail pack. Here bins are
indexed by remaining capacity (a sorted list of the capacities that have open bins, plus one stack of bins
per capacity), so each placement is a binary search and a million samples pack in seconds.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field

OVERSIZE_POLICIES = ("own_pack", "drop", "error")


@dataclass
class PackResult:
    """Packs as lists of input indices (ascending inside a pack), and what happened to oversize samples."""

    packs: list[list[int]]
    pack_length: int
    tokens: int
    oversize: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)

    @property
    def n_packs(self) -> int:
        return len(self.packs)

    @property
    def fill_ratio(self) -> float:
        """Packed tokens / (packs * pack_length); oversize packs count their real length."""
        return self.tokens / (self.n_packs * self.pack_length) if self.packs else 0.0


def best_fit_decreasing(lengths: list[int], pack_length: int) -> list[list[int]]:
    """Each item, longest first, goes into the fullest open bin it fits in, else a new bin.

    Every length must be at most `pack_length`. Returns bins of indices into `lengths`.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    open_caps: list[int] = []  # sorted distinct remaining capacities that have at least one open bin
    by_cap: dict[int, list[int]] = {}  # remaining capacity -> stack of bin numbers
    for i in order:
        need = lengths[i]
        k = bisect_left(open_caps, need)
        if k == len(open_caps):
            b, cap = len(bins), pack_length
            bins.append([])
        else:
            cap = open_caps[k]
            stack = by_cap[cap]
            b = stack.pop()
            if not stack:
                del open_caps[k]
                del by_cap[cap]
        bins[b].append(i)
        rest = cap - need
        if rest > 0:
            if rest not in by_cap:
                by_cap[rest] = []
                insort(open_caps, rest)
            by_cap[rest].append(b)
    return [sorted(b) for b in bins]


def pack_lengths(lengths: list[int], pack_length: int, oversize: str = "own_pack") -> PackResult:
    """Pack sample lengths; samples longer than `pack_length` follow `oversize` (own_pack, drop or error)."""
    if pack_length <= 0:
        raise ValueError(f"pack_length must be positive, got {pack_length}")
    if oversize not in OVERSIZE_POLICIES:
        raise ValueError(f"oversize must be one of {OVERSIZE_POLICIES}, got {oversize!r}")
    bad = [i for i, n in enumerate(lengths) if n < 0]
    if bad:
        raise ValueError(f"negative token counts at indices {bad[:10]}")
    too_long = [i for i, n in enumerate(lengths) if n > pack_length]
    if too_long and oversize == "error":
        raise ValueError(
            f"{len(too_long)} samples are longer than pack_length={pack_length} "
            f"(first indices {too_long[:10]}); use --oversize own_pack or drop"
        )
    fits = [i for i, n in enumerate(lengths) if n <= pack_length]
    packs = [[fits[j] for j in b] for b in best_fit_decreasing([lengths[i] for i in fits], pack_length)]
    if oversize == "own_pack":
        packs.extend([i] for i in too_long)
        tokens = sum(lengths)
        return PackResult(packs, pack_length, tokens, oversize=too_long)
    tokens = sum(lengths[i] for i in fits)
    return PackResult(packs, pack_length, tokens, dropped=too_long)
