"""One instance of a stateless cell per configuration, shared by every layer (and model) that uses it.

Why: MindSpore 2.7 parses a cell's `construct` and hand-written backward (`bprop`) once per cell *instance* and keeps
what it parsed for the life of the compiled graph (one blocked-attention cell per decoder layer kept ~13 MiB of host
memory per layer, one shared cell ~1 MiB; `bench/graph_memory.py`). A shared cell is never changed once made: a layer
that needs another configuration swaps to that configuration's instance.
"""

from __future__ import annotations

from typing import Callable, Hashable

from mindspore import nn

_CELLS: dict[Hashable, nn.Cell] = {}


def shared_cell(key: Hashable, make: Callable[[], nn.Cell]) -> nn.Cell:
    """The cell made for `key` (by `make`, the first time it is asked for)."""
    if key not in _CELLS:
        _CELLS[key] = make()
    return _CELLS[key]
