"""How every entry point (training, inference, evaluation, benchmarks) sets MindSpore up.

Device: `QWENVL_DEVICE` when set, else Ascend when its runtime is present, else CPU. Mode: compiled steps
run in graph mode; called from PyNative mode the same compiled step had a bimodal 30-300 ms step time
on 2 CPU cores, against a steady ~26 ms in graph mode (BENCHMARKS.md).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


def select_device() -> str:
    """Set and return the device target; keeps it when this process's runtime already started."""
    import mindspore as ms

    target = os.environ.get("QWENVL_DEVICE")
    if not target:
        from mindspore.device_context.ascend import is_available

        target = "Ascend" if is_available() else "CPU"
    try:
        ms.set_device(target)
    except RuntimeError:  # the runtime already started in this process (an embedding caller, tests)
        if ms.get_context("device_target") != target:
            raise
    return target


@contextmanager
def graph_mode() -> Iterator[None]:
    """MindSpore graph mode inside the block, the caller's mode restored afterwards."""
    import mindspore as ms

    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=previous)
