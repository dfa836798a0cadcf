"""The gradients' sum of squares on the CPU backend, computed by numpy where the tensors lie.

Why: the compiled norm graph (`train_step._SquaredSum`) squares each gradient into a temporary of its size, and
MindSpore's CPU memory pool keeps those: ~150 MiB at issue 10's 109 M model, and ~0.9 B/param more with each
layer's tensors (measured, `bench/memory.py`'s optimizer-step phase). On CPU a tensor's device memory is host
memory, so numpy can read it in place: no temporary, no graph. `Tensor.asnumpy()` would not do: it keeps a host
copy as large as the tensor with it. Other devices keep the compiled graph (their gradients are in device memory).
"""

from __future__ import annotations

from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor

from qwenvl.model.host_memory import host_view


def host_squared_sum(tensors: Sequence[Tensor]) -> float:
    """sum(t**2) over every tensor: numpy's einsum per tensor (float32 accumulation, float16 ones accumulated in
    float32: ~4e-8 relative error over 33 M values), float64 across tensors."""
    ms.runtime.synchronize()  # the graphs that wrote them have finished
    total = 0.0
    for tensor in tensors:
        flat = host_view(tensor)
        total += float(np.einsum("i,i->", flat, flat, dtype=np.float32 if flat.dtype == np.float16 else None))
    return total
