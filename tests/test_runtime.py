"""`qwenvl.runtime.select_device` on CPU: the runtime MindSpore starts launches kernels from two threads, read from
MindSpore's own start-up log (its default on a host of under 12 cores is one)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _actor_threads(prelude: str, folder: Path) -> int:
    """Run one small graph in a fresh process after `prelude`; the actor thread count MindSpore logs."""
    code = textwrap.dedent(f"""
        import numpy as np, mindspore as ms
        {prelude}
        ms.set_context(mode=ms.GRAPH_MODE)
        @ms.jit
        def double(x):
            return x * 2
        print(double(ms.Tensor(np.ones(4, np.float32))).asnumpy().sum())
    """)
    env = {**os.environ, "GLOG_v": "1", "GLOG_logtostderr": "1", "QWENVL_DEVICE": "CPU", "PYTHONPATH": str(ROOT)}
    script = folder / "graph.py"  # MindSpore compiles graphs from source files only
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("8.0")
    found = re.findall(r"The actor thread number: (\d+)", done.stderr)
    assert found, done.stderr[-2000:]
    return int(found[-1])


@pytest.mark.skipif(int(0.18 * (os.cpu_count() or 1)) >= 2, reason="MindSpore's default is already >= 2 here")
def test_select_device_gives_the_cpu_runtime_two_launch_threads(tmp_path):
    assert _actor_threads("pass", tmp_path) == 1  # MindSpore's default on this host, which select_device corrects
    assert _actor_threads("from qwenvl.runtime import select_device; select_device()", tmp_path) == 2


def test_select_device_keeps_a_launch_thread_count_the_caller_set(tmp_path):
    prelude = "ms.runtime.dispatch_threads_num(1); from qwenvl.runtime import select_device; select_device()"
    assert _actor_threads(prelude, tmp_path) == 1
