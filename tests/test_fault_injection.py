"""Fault injection on train_qwen.py (tiny Qwen2.5-VL, child processes): kill -9 while a checkpoint is written,
during rotation and during the final save; SIGTERM mid-run (to the whole process group, data workers
included), SIGINT during a save, two signals during a save; one msrun worker killed. After every fault the
output folder holds only whole files and intact checkpoints, and the restarted run ends bitwise on the
weights of an uninterrupted run.

The faults are monkeypatches inside the child (tests/fault_child.py); product code has no test hooks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from qwenvl.train.checkpoint import checkpoint_folders, checkpoint_problem, complete_checkpoints
from tests.msrun import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _flags(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_use", "demo_images%25", "--output_dir", str(out),
            "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", "2", "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "2",
            "--logging_steps", "1", "--model_max_length", "256", *extra]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOG_v": "3"}
    for key in ("MS_ROLE", "MS_WORKER_NUM", "RANK_ID", "RANK_SIZE"):
        env.pop(key, None)
    return env


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.05)


def _run(
    tiny: Path, out: Path, fault: str = "none", *extra: str, signal_at: tuple[int, int] | None = None
) -> tuple[int, str]:
    """(exit status, output) of one child run; `signal_at=(step, signum)` signals the child's process group
    (the trainer and its data workers, like Ctrl-C in a terminal or a scheduler) while it waits after `step`."""
    command = [sys.executable, str(ROOT / "tests" / "fault_child.py"), fault, "--", *_flags(tiny, out, *extra)]
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        if signal_at is not None:
            _wait_for(out / f"ready-{signal_at[0]}", proc)
            os.killpg(proc.pid, signal_at[1])
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, output


def _assert_only_whole_files(out: Path) -> None:
    """Every `checkpoint-N` matches its manifest, and no file outside temporary folders is empty."""
    assert [p.name for p in out.glob("*.tmp*") if p.is_file()] == []  # stray temporary files
    for folder in checkpoint_folders(out):
        assert checkpoint_problem(folder) is None, f"{folder.name}: {checkpoint_problem(folder)}"
    for path in out.rglob("*"):
        if path.is_file() and not any(part.startswith(".tmp-") for part in path.relative_to(out).parts):
            assert path.stat().st_size > 0, f"empty file {path}"


def _names(out: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(out)]


def _assert_same_weights(got: Path, want: Path) -> None:
    a, b = load_file(str(got)), load_file(str(want))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen2.5vl")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """The uninterrupted run's final weights."""
    out = tmp_path_factory.mktemp("reference")
    code, output = _run(tiny, out)
    assert code == 0, output[-3000:]
    return out / "model.safetensors"


def test_kill_9_while_writing_rotating_and_saving_the_final_model(tiny, reference, tmp_path):
    out = tmp_path / "out"
    # 1. killed halfway through checkpoint-4's optimizer file: no checkpoint-4, checkpoint-2 whole
    code, output = _run(tiny, out, "kill-in-write:4")
    assert code == -signal.SIGKILL, output[-3000:]
    assert _names(out) == ["checkpoint-2"] and (out / ".tmp-checkpoint-4").is_dir()
    _assert_only_whole_files(out)
    # 2. resumes from 2 (the temporary folder removed); killed while rotation deletes checkpoint-2
    code, output = _run(tiny, out, "kill-in-rotation")
    assert code == -signal.SIGKILL, output[-3000:]
    assert "resumed from" in output and "checkpoint-2 at step 2" in output
    assert _names(out) == ["checkpoint-4", "checkpoint-6"] and not (out / "checkpoint-2").exists()
    _assert_only_whole_files(out)
    # 3. nothing left to train; killed after two files of the final model were moved into place
    code, output = _run(tiny, out, "kill-in-final-save:2")
    assert code == -signal.SIGKILL, output[-3000:]
    assert not (out / ".tmp-checkpoint-2.deleting").exists() and not (out / "train_summary.json").exists()
    _assert_only_whole_files(out)
    # 4. the final save again, whole this time; the weights are the uninterrupted run's
    code, output = _run(tiny, out)
    assert code == 0, output[-3000:]
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp")] == []
    _assert_only_whole_files(out)
    _assert_same_weights(out / "model.safetensors", reference)


def test_signals_stop_at_a_step_boundary_with_a_checkpoint_and_resume_exactly(tiny, reference, tmp_path):
    out = tmp_path / "out"
    # 1. Ctrl-C (SIGINT to the process group: trainer and a data worker) after step 3: checkpoint-3, exit 130
    code, output = _run(tiny, out, "wait-at-step:3", "--dataloader_num_workers", "1", signal_at=(3, signal.SIGINT))
    assert code == 130, output[-3000:]
    assert f"[train] stopped by SIGINT after step 3 of 6; checkpoint {out / 'checkpoint-3'} written; run the same " \
           "command again to resume" in output  # fmt: skip
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert _names(out) == ["checkpoint-2", "checkpoint-3"]
    # 2. SIGTERM while checkpoint-4 is written: the save finishes, the run stops there, exit 143
    code, output = _run(tiny, out, "signal-in-save:TERM:4:1")
    assert code == 143, output[-3000:]
    assert "stopped by SIGTERM after step 4 of 6" in output and _names(out) == ["checkpoint-3", "checkpoint-4"]
    _assert_only_whole_files(out)
    # 3. two SIGINTs while checkpoint-6 is written: the second ends the process at once, the others stay whole
    code, output = _run(tiny, out, "signal-in-save:INT:6:2")
    assert code == -signal.SIGINT, output[-3000:]
    assert "send it again to exit at once" in output
    assert _names(out) == ["checkpoint-3", "checkpoint-4"]
    _assert_only_whole_files(out)
    # 4. the restart resumes from checkpoint-4 and ends on the uninterrupted weights
    code, output = _run(tiny, out)
    assert code == 0 and "checkpoint-4 at step 4" in output, output[-3000:]
    _assert_same_weights(out / "model.safetensors", reference)


def _msrun(tiny: Path, out: Path, logs: Path, fault: str) -> tuple[int, str]:
    msrun = Path(sys.executable).with_name("msrun")
    env = {**_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
               f"--log_dir={logs}", "python", str(ROOT / "tests" / "fault_child.py"), fault, "--",
               *_flags(tiny, out, "--per_device_train_batch_size", "1")]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    tails = [f"--- {p.name}\n{p.read_text(errors='replace')[-8000:]}" for p in sorted(logs.glob("worker_*.log"))]
    return proc.returncode, "\n".join(tails)


def test_msrun_ranks_agree_on_a_signal_and_a_killed_worker_stops_the_job(tiny, tmp_path):
    """2 workers x batch 1 = the single run's global batch of 2. SIGTERM reaches rank 1 only: both ranks stop
    after the same step with one checkpoint; then rank 1 is killed -9: the job stops; the restart resumes and
    ends on the weights of an uninterrupted 2-worker run."""
    full, out = tmp_path / "full", tmp_path / "out"
    code, logs = _msrun(tiny, full, tmp_path / "logs-full", "none")
    assert code == 0, logs
    code, logs = _msrun(tiny, out, tmp_path / "logs-1", "signal-at-step:TERM:3@1")
    assert code != 0 and "stopped by SIGTERM after step 3 of 6" in logs, logs
    assert _names(out) == ["checkpoint-2", "checkpoint-3"]
    code, logs = _msrun(tiny, out, tmp_path / "logs-2", "kill-at-step:5@1")
    assert code != 0, logs
    assert _names(out) == ["checkpoint-3", "checkpoint-4"]
    _assert_only_whole_files(out)
    code, logs = _msrun(tiny, out, tmp_path / "logs-3", "none")
    assert code == 0 and "checkpoint-4 at step 4" in logs, logs
    _assert_same_weights(out / "model.safetensors", full / "model.safetensors")
