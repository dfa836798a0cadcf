"""How one tensor's values are split over data-parallel ranks (ZeRO's partition).

Every ZeRO stage uses the same layout, so optimizer state written at one stage loads at another: a
tensor's flattened values are cut into `world` equal contiguous chunks (whole rows of 1024 values for
tensors that large), the last padded with zeros, and rank r owns chunk r. A world of one owns the tensor
whole, in its own shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ROW = 1024


@dataclass(frozen=True)
class ShardSpec:
    """Rank `rank`'s chunk of a tensor of `shape` split `world` ways."""

    shape: tuple[int, ...]
    world: int = 1
    rank: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def chunk(self) -> int:
        """Elements per rank (the padded length divided by world); a multiple of ROW for large tensors, so
        reductions over a chunk can run row by row on every core."""
        chunk = -(-self.numel // self.world)
        if self.world == 1 or self.numel < self.world * ROW:
            return chunk
        return -(-chunk // ROW) * ROW

    @property
    def padded(self) -> int:
        return self.chunk * self.world

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The shape this rank holds: the tensor's own shape in a world of one, else (chunk,)."""
        return tuple(self.shape) if self.world == 1 else (self.chunk,)

    def bounds(self, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of `rank`'s real (unpadded) elements in the flattened tensor."""
        rank = self.rank if rank is None else rank
        start = min(rank * self.chunk, self.numel)
        return start, min(start + self.chunk, self.numel)

    def take(self, full: np.ndarray) -> np.ndarray:
        """This rank's chunk of the full tensor, zero-padded, in `local_shape`."""
        full = np.asarray(full)
        if self.world == 1:
            return full.reshape(self.shape)
        start, stop = self.bounds()
        return self.pad(full.reshape(-1)[start:stop])

    def pad(self, part: np.ndarray) -> np.ndarray:
        """This rank's real elements (`bounds()`, read on their own) as its chunk: zero-padded to `chunk`."""
        out = np.zeros(self.chunk, part.dtype)
        out[: part.size] = part.reshape(-1)
        return out

    def join(self, chunks: list[np.ndarray]) -> np.ndarray:
        """The full tensor from every rank's chunk, in rank order (padding dropped)."""
        if len(chunks) != self.world:
            raise ValueError(f"{len(chunks)} chunks for a world of {self.world}")
        flat = np.concatenate([np.asarray(c).reshape(-1) for c in chunks])
        return flat[: self.numel].reshape(self.shape)
