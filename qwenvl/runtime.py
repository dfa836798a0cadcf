"""How every entry point (training, inference, evaluation, benchmarks) sets MindSpore up.

Device: `QWENVL_DEVICE` when set, else Ascend when its runtime is present, else CPU. Mode: compiled steps
run in graph mode; called from PyNative mode the same compiled step had a bimodal 30-300 ms step time
on 2 CPU cores, against a steady ~26 ms in graph mode (BENCHMARKS.md).

No persistent compile cache is enabled, on purpose. MindSpore 2.7.0's cache (`enable_compile_cache=True` with
`compile_cache_path`, or `MS_COMPILER_CACHE_ENABLE=1` with `MS_COMPILER_CACHE_PATH`) makes a second process load
its graphs (toy train step, first call 0.95 s -> 0.12 s) but, on the CPU backend, a graph compiled through
`ms.jit(ms.value_and_grad(...))` comes back wrong: the toy train step's first loss 3.8712 instead of 3.8159, no
update between steps 1 and 2; a plain two-layer `nn.Dense` loss 0.0 instead of 0.1107 and all-zero gradients.
Only a Cell called as the top graph reloaded correctly (0.22 -> 0.14 s). The train step, the gradient norm and
the optimizer are `ms.jit` functions, so the cache stays off until it reloads them with the same results.
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
    if target == "CPU":
        _two_launch_threads(ms)
    return target


LAUNCH_THREADS = 2


def _two_launch_threads(ms) -> None:
    """At least two of MindSpore's runtime (actor) threads, which launch the kernels, on a CPU host.

    Unconfigured, MindSpore takes floor(0.18 x cores) of them, at least one: a single thread launching every
    kernel below 12 cores, and a step of many small kernels waits on it (2 cores, side by side: tiny text512
    step 27 -> 21 ms, 120 M text512 1.47 -> 1.43 s; one launch thread with two kernel threads changes nothing).
    Configuring the number also keeps the kernel threads at the core count. Set once per process, before the
    first graph runs; a value configured earlier (by the caller) is kept."""
    from mindspore._c_expression import RuntimeConf

    if RuntimeConf.get_instance().is_dispatch_threads_num_configured():
        return
    if int(0.18 * (os.cpu_count() or 1)) >= LAUNCH_THREADS:
        return
    ms.runtime.dispatch_threads_num(LAUNCH_THREADS)


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
