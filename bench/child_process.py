"""Run one benchmark measurement in its own process: its peak RSS is its own, and a runaway one is stopped.

The child prints its result as the last stdout line (JSON). The parent polls the child's RSS (with its
children) and kills it past a limit, or when the machine's available memory falls below a floor, so an
out-of-memory case is reported instead of waking the kernel's OOM killer on a machine other people's
processes share.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path


def _tree_rss_bytes(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


def _available_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def run_child(cmd: list[str], env: dict, cwd: Path, rss_limit_gb: float, timeout_s: float,
              floor_gb: float = 1.0) -> dict:
    """The child's JSON result, or {"error": why} when it failed, ran out of memory or time; with "wall_s"."""
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, text=True)
        reason = None
        while proc.poll() is None:
            rss_gb = _tree_rss_bytes(proc.pid) / 2**30
            if rss_gb > rss_limit_gb:
                reason = f"out of memory (stopped at RSS > {rss_limit_gb:g} GB)"
            elif _available_gb() < floor_gb:
                reason = f"out of memory (stopped at RSS {rss_gb:.1f} GB: machine below {floor_gb:g} GB available)"
            elif time.monotonic() - start > timeout_s:
                reason = f"timed out after {timeout_s:.0f} s"
            if reason:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if reason is None and proc.returncode == 0 and stdout.strip():
        return {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": time.monotonic() - start}
    if reason is None:
        last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        reason = f"failed (exit {proc.returncode}): {last[0][:200]}"
    return {"error": reason, "wall_s": time.monotonic() - start}
