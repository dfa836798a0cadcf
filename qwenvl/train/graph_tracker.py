"""How many train-step graphs MindSpore compiled, and how long compiling took.

`ms.jit` compiles the step once per input signature: the shape and dtype of every input, and which inputs
are None. Each new signature is a graph (seconds to minutes of compilation and memory kept for the run),
so a dataset whose batches keep changing shape spends its time compiling. The tracker records every
signature, times its first call, and says when new shapes keep arriving.

Compile time of a graph = its first call's wall time minus the median of the steady (repeat-signature)
calls seen so far: the first call compiles and runs once, a steady call only runs. Before any steady call
the whole first call counts.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

WARN_GRAPHS = 16  # warn when the count passes this, and again each time it doubles
SHAPE_BUCKETS_HINT = "pad shapes to buckets: see README section \"Shape buckets\""


@dataclass
class NewGraph:
    index: int  # 1-based graph number
    summary: str  # the input shapes, e.g. "input_ids 2x64 int32, pixel_values -"
    first_call_s: float


def signature(names: list[str], values: list) -> tuple:
    """The compiled-graph key of one call: (name, shape, dtype) per input, None for an absent input."""
    return tuple(
        (name, None) if value is None else (name, tuple(value.shape), str(value.dtype))
        for name, value in zip(names, values)
    )


def describe(key: tuple) -> str:
    """`input_ids 2x64 Int32, labels 2x64 Int32, pixel_values -`: a one-line summary of a signature."""
    parts = []
    for entry in key:
        if entry[1] is None:
            parts.append(f"{entry[0]} -")
        else:
            name, shape, dtype = entry
            parts.append(f"{name} {'x'.join(map(str, shape)) or 'scalar'} {dtype}")
    return ", ".join(parts)


class GraphTracker:
    """Signatures seen by one compiled function; `observe(key, seconds)` after every call."""

    def __init__(self) -> None:
        self._first: dict[tuple, float] = {}
        self._steady: list[float] = []
        self._new: list[NewGraph] = []
        self._next_warning = WARN_GRAPHS + 1
        self._late_warned = False

    def is_new(self, key: tuple) -> bool:
        return key not in self._first

    def observe(self, key: tuple, seconds: float) -> None:
        if key in self._first:
            self._steady.append(seconds)
            return
        self._first[key] = seconds
        self._new.append(NewGraph(len(self._first), describe(key), seconds))

    @property
    def graphs(self) -> int:
        return len(self._first)

    @property
    def compile_seconds(self) -> float:
        steady = statistics.median(self._steady) if self._steady else 0.0
        return sum(max(0.0, first - steady) for first in self._first.values())

    def take_new(self) -> list[NewGraph]:
        """The graphs compiled since the last call (for one printed line each)."""
        new, self._new = self._new, []
        return new

    def warning(self, step: int, total_steps: int, compiled_now: bool) -> str | None:
        """A warning that shapes keep arriving: when the count passes 16, 32, 64, ... graphs, and once when a new
        graph appears in the second half of a run of at least 20 steps (the data has not settled into buckets)."""
        if self.graphs >= self._next_warning:
            while self._next_warning <= self.graphs:
                self._next_warning = 2 * (self._next_warning - 1) + 1
            return (f"{self.graphs} train-step graphs compiled so far ({self.compile_seconds:.1f} s): new input shapes "
                    f"keep arriving; {SHAPE_BUCKETS_HINT}")  # fmt: skip
        late = total_steps >= 20 and step > total_steps / 2
        if late and compiled_now and not self._late_warned:
            self._late_warned = True
            return (f"a new train-step graph (number {self.graphs}) was compiled at step {step} of {total_steps}: "
                    f"shapes are still new late in the run; {SHAPE_BUCKETS_HINT}")  # fmt: skip
        return None
