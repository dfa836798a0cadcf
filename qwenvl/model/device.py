"""Which device the compiled graph runs on, as compile-time constants (fused Ascend kernels or CPU twins)."""

from __future__ import annotations

import mindspore as ms
from mindspore.ops import constexpr


@constexpr
def on_ascend() -> bool:
    """True when the fused Ascend kernels can be used (a compile-time constant inside `mindspore.jit`)."""
    return ms.get_context("device_target") == "Ascend"


@constexpr
def on_cpu() -> bool:
    return ms.get_context("device_target") == "CPU"
