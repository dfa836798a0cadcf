"""The blocked CPU twin in smaller query blocks for the tests' tiny vision inputs, so that a reach actually leaves
keys out."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from mindspore import nn

from qwenvl.model.attention import SegmentAttention, shared_blocked_attention


@contextmanager
def query_blocks(model: nn.Cell, rows: int) -> Iterator[None]:
    """Every segment attention of `model` on the blocked twin, in blocks of `rows` queries (default 512), while
    inside: each gets the shared core of that block size (cores are shared between layers and models, so none is
    changed) and leaves the fused CPU kernel aside."""
    layers = [cell for _, cell in model.cells_and_names() if isinstance(cell, SegmentAttention)]
    saved = [(layer.core, layer.use_fused) for layer in layers]
    for layer in layers:
        layer.core = shared_blocked_attention(layer.scale, layer.causal, layer.core.reach, rows)
        layer.use_fused = False
    try:
        yield
    finally:
        for layer, (core, use_fused) in zip(layers, saved):
            layer.core, layer.use_fused = core, use_fused
