"""Smaller query blocks for the tests' tiny vision inputs, so that a reach actually leaves keys out."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from mindspore import nn

from qwenvl.model.attention import _BlockedAttention


@contextmanager
def query_blocks(model: nn.Cell, rows: int) -> Iterator[None]:
    """Every segment attention of `model` in blocks of `rows` queries (default 512) while inside."""
    cores = [cell for _, cell in model.cells_and_names() if isinstance(cell, _BlockedAttention)]
    saved = [core.block for core in cores]
    for core in cores:
        core.block = rows
    try:
        yield
    finally:
        for core, block in zip(cores, saved):
            core.block = block
