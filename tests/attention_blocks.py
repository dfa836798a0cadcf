"""Smaller query blocks for the tests' tiny vision inputs, so that a reach actually leaves keys out."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from mindspore import nn

from qwenvl.model.attention import SegmentAttention, shared_blocked_attention


@contextmanager
def query_blocks(model: nn.Cell, rows: int) -> Iterator[None]:
    """Every segment attention of `model` in blocks of `rows` queries (default 512) while inside: each gets the
    shared core of that block size (cores are shared between layers and models, so none is changed)."""
    layers = [cell for _, cell in model.cells_and_names() if isinstance(cell, SegmentAttention)]
    saved = [layer.core for layer in layers]
    for layer in layers:
        layer.core = shared_blocked_attention(layer.scale, layer.causal, layer.core.reach, rows)
    try:
        yield
    finally:
        for layer, core in zip(layers, saved):
            layer.core = core
