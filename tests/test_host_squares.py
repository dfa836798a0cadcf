"""The CPU gradient sum of squares read in place (`qwenvl.train.host_squares`) against float64 numpy, and against the
compiled norm graph other devices use."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from qwenvl.runtime import graph_mode
from qwenvl.model.host_memory import host_view
from qwenvl.train.host_squares import host_squared_sum
from qwenvl.train.train_step import _SquaredSum


def _graph_outputs(arrays: list[np.ndarray]) -> list[Tensor]:
    """The arrays doubled by a compiled graph: tensors in MindSpore's device memory, as gradients are."""

    def double(*xs):
        return tuple(x * 2 for x in xs)

    with graph_mode():
        return list(ms.jit(double)(*(Tensor(a) for a in arrays)))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sum_of_squares_of_graph_outputs_equals_float64_numpy(dtype):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(0, 1, shape).astype(dtype) for shape in ((3000, 1024), (7,), (5, 3, 2), (1,))]
    tensors = _graph_outputs(arrays)
    expected = sum(float(((2 * a.astype(np.float64)) ** 2).sum()) for a in arrays)
    assert host_squared_sum(tensors) == pytest.approx(expected, rel=1e-6)
    for tensor, array in zip(tensors, arrays):
        view = host_view(tensor)
        assert view.ctypes.data == tensor.data_ptr()  # the tensor's own memory, not a copy
        np.testing.assert_array_equal(view, (2 * array).reshape(-1))


def test_equals_the_compiled_norm_graph_of_other_devices():
    rng = np.random.default_rng(1)
    arrays = [rng.normal(0, 1, size).astype(np.float32) for size in (2**18 + 5, 300, 1000, 2**12)]
    tensors = _graph_outputs(arrays)
    with graph_mode():
        compiled = float(ms.jit(_SquaredSum([a.size for a in arrays]).construct)(*tensors))
    assert host_squared_sum(tensors) == pytest.approx(compiled, rel=1e-6)


def test_views_are_read_from_their_own_offset():
    """Slices and split pieces (the ZeRO collectives' outputs) share their base's memory at an offset."""
    base = _graph_outputs([np.arange(24, dtype=np.float32)])[0]  # 0, 2, 4, ..., 46
    views = [base[3:6], ops.split(base, [8, 16])[1], base.reshape(4, 6)[2], base.reshape(4, 6)[:, 1]]
    expected = [np.arange(24, dtype=np.float64)[sel] * 2 for sel in (slice(3, 6), slice(8, 24), slice(12, 18),
                                                                       slice(1, 24, 6))]  # fmt: skip
    for view, want in zip(views, expected):
        np.testing.assert_array_equal(host_view(view), want)
    assert host_squared_sum(views) == sum(float((w**2).sum()) for w in expected)


def test_empty_tensor_counts_zero():
    assert host_squared_sum([Tensor(np.zeros((0, 4), np.float32)), Tensor(np.ones(3, np.float32))]) == 3.0
