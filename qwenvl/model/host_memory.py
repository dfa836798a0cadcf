"""A CPU tensor's memory as a numpy array, for the updates numpy does in place (optimizer, ZeRO gather, norms).

On the CPU backend a tensor's device memory is host memory, so numpy can read and write it where it lies: no
graph, no temporary of the tensor's size in MindSpore's memory pool (which keeps what it once held). A Parameter
has that memory only once a graph has taken it as an input, and loses it to `set_data`; `HostMemory`, a compiled
graph over Parameters, gives each one its memory before they are written.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

_NUMPY = {ms.float32: np.dtype(np.float32), ms.float16: np.dtype(np.float16), ms.float64: np.dtype(np.float64)}


def host_view(tensor: Tensor) -> np.ndarray:
    """The flat contents of a CPU tensor as a numpy array over the same memory (read it before the tensor changes).

    A view (a slice or split piece, as the ZeRO collectives hand out) starts `storage_offset()` elements into the
    memory `data_ptr()` points at; a strided view is copied."""
    dtype = _NUMPY[tensor.dtype]
    size = int(tensor.size)
    if size == 0:
        return np.zeros(0, dtype)
    if not tensor.is_contiguous():
        return tensor.asnumpy().reshape(-1)
    address = tensor.data_ptr() + int(tensor.storage_offset()) * dtype.itemsize
    return np.frombuffer((ctypes.c_char * (size * dtype.itemsize)).from_address(address), dtype=dtype)


class _Prepare(nn.Cell):
    """A graph over the Parameters: running it gives each one its device memory (the graph prepares its inputs)."""

    def __init__(self, params: Sequence[Parameter]) -> None:
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)

    def construct(self):
        return ops.depend(ops.zeros((), ms.float32), self.params)


class HostMemory:
    """Numpy views of `params`' memory, valid until the next graph or `set_data` changes them: `views()`."""

    def __init__(self, params: Sequence[Parameter]) -> None:
        self.params = list(params)
        self._prepare = ms.jit(_Prepare(self.params).construct) if self.params else None

    def views(self) -> list[np.ndarray]:
        """Each parameter's flat contents, in its own memory (the graphs that wrote them have finished)."""
        if self._prepare is None:
            return []
        self._prepare()
        ms.runtime.synchronize()
        return [host_view(p) for p in self.params]
