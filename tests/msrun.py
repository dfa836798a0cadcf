"""Launching a script under msrun with 2 CPU workers from a test: a free port, the venv's msrun, logs kept."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def msrun_env(**extra: str) -> dict[str, str]:
    """The test's environment with the venv first on PATH (msrun starts workers with the `python` it finds),
    the project importable and no msrun variables of an enclosing launch."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "GLOG_v": "3", **extra}  # fmt: skip
    for key in ("MS_ROLE", "MS_WORKER_NUM", "RANK_ID", "RANK_SIZE"):
        env.pop(key, None)
    return env


def worker_logs(logs: Path) -> str:
    """The workers' logs without MindSpore's INFO lines, the tail of each: what a failure message needs."""
    return "\n".join(
        f"--- {p.name}\n" + "\n".join(line for line in p.read_text(errors="replace").splitlines() if "[INFO]" not in line)[-3000:]
        for p in sorted(logs.glob("*.log"))
    )


def run_msrun(args: list[str], logs: Path, timeout: float = 600, workers: int = 2) -> tuple[int, str]:
    """(exit code, workers' logs) of `msrun ... python <args>`; a hang is killed with its whole session."""
    msrun = Path(sys.executable).with_name("msrun")
    command = [str(msrun), f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={free_port()}",
               "--join=True", f"--log_dir={logs}", "python", *args]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=msrun_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    return proc.returncode, output[-2000:] + "\n" + worker_logs(logs)
