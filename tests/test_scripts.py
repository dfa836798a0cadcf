"""Launch scripts: the msrun command line they build, checked with a stand-in `msrun` that records its argv,
its working directory and its PATH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qwenvl.train.argument import parse_args

ROOT = Path(__file__).resolve().parents[1]
MODEL_SCRIPTS = sorted((ROOT / "scripts").glob("sft_qwen*.sh"))
TRAIN_SCRIPT = str(ROOT / "qwenvl/train/train_qwen.py")
FAKE_MSRUN = ('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n'
              'echo "$PWD" > "$MSRUN_RECORD/cwd"\necho "$PATH" > "$MSRUN_RECORD/path"\n')
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def _fake_msrun(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "msrun").write_text(FAKE_MSRUN)
    (folder / "msrun").chmod(0o755)
    return folder


def _run(script: Path, tmp_path: Path, *args: str, path: str | None = None, cwd: Path | None = None, **env: str):
    fake = _fake_msrun(tmp_path / "bin")
    run_env = {**os.environ, "MSRUN_RECORD": str(tmp_path), "PATH": path or f"{fake}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(script), *args], env=run_env, capture_output=True, text=True, cwd=cwd)


def _launch(script: Path, tmp_path: Path, *args: str, **env: str) -> list[str]:
    proc = _run(script, tmp_path, *args, **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _train_flags(argv: list[str]) -> list[str]:
    return argv[argv.index(TRAIN_SCRIPT) + 1 :]


def test_there_is_a_script_per_upstream_recipe():
    names = {p.name for p in MODEL_SCRIPTS}
    assert {"sft_qwen2.5vl_3b.sh", "sft_qwen2.5vl_7b.sh", "sft_qwen3vl_4b.sh", "sft_qwen3vl_8b.sh",
            "sft_qwen3vl_30b_a3b_lora.sh"} <= names  # fmt: skip


@pytest.mark.parametrize("script", MODEL_SCRIPTS, ids=lambda p: p.name)
def test_multi_node_msrun_line_and_flags_parse(script, tmp_path):
    argv = _launch(script, tmp_path, NNODES="2", NPROC_PER_NODE="8", NODE_RANK="1", MASTER_ADDR="10.0.0.1",
                   QWENVL_DEVICE="Ascend")  # fmt: skip
    assert argv[:7] == ["--worker_num=16", "--local_worker_num=8", "--master_addr=10.0.0.1", "--master_port=8118",
                        "--node_rank=1", f"--log_dir={ROOT}/logs/train", "--join=True"]  # fmt: skip
    assert argv[7] == TRAIN_SCRIPT
    model_args, _, training = parse_args(argv[8:])  # every flag is one train_qwen.py accepts
    assert training.bf16 and training.gradient_checkpointing and training.zero_stage in (1, 2, 3)
    assert training.per_device_eval_batch_size == 2 * training.per_device_train_batch_size
    if "lora" in script.name:
        assert training.lora_enable and not model_args.tune_mm_llm
    else:
        assert model_args.tune_mm_llm and model_args.tune_mm_mlp and not model_args.tune_mm_vision


def test_single_node_defaults_and_extra_flags_win(tmp_path):
    argv = _launch(ROOT / "scripts" / "sft_qwen3vl_4b.sh", tmp_path, "--learning_rate", "3e-6", NPROC_PER_NODE="4")
    assert argv[0] == "--worker_num=4" and "--node_rank=0" in argv
    _, data, training = parse_args(_train_flags(argv))
    assert training.learning_rate == 3e-6 and data.max_pixels == 256 * 32 * 32


@pytest.mark.parametrize("script", MODEL_SCRIPTS, ids=lambda p: p.name)
def test_lr_batch_accum_from_the_environment_are_used(script, tmp_path):
    argv = _launch(script, tmp_path, LR="3e-4", BATCH="3", ACCUM="5", DATASETS="a%50,b", OUTPUT_DIR="out/x")
    model_args, data, training = parse_args(_train_flags(argv))
    assert training.learning_rate == 3e-4 and training.per_device_train_batch_size == 3
    assert training.gradient_accumulation_steps == 5
    assert training.per_device_eval_batch_size == 6 and data.dataset_use == "a%50,b" and training.output_dir == "out/x"


def test_relative_paths_are_the_callers_and_msrun_flags_pass_through(tmp_path):
    caller = tmp_path / "work"
    caller.mkdir()
    msrun_args = ["--cluster_time_out", "600", "--bind_core", "True", "--tail_worker_log", "0"]
    argv = _run(ROOT / "scripts" / "sft_qwen2.5vl_3b.sh", tmp_path, cwd=caller, MODEL_PATH="models/m",
                MSRUN_ARGS=" ".join(msrun_args)).stdout.splitlines()
    assert (tmp_path / "cwd").read_text().strip() == str(caller)  # msrun and its workers start where the user is
    model_args, _, training = parse_args(_train_flags(argv))
    assert model_args.model_name_or_path == "models/m" and training.output_dir == "./output/m"
    script_at = argv.index(TRAIN_SCRIPT)
    assert argv[script_at - 6 : script_at] == msrun_args


def test_msrun_is_found_in_the_project_venv_when_not_on_path(tmp_path):
    venv = tmp_path / "venv"
    _fake_msrun(venv / "bin")
    proc = _run(ROOT / "scripts" / "launch_msrun.sh", tmp_path, "--max_steps", "1", path=SYSTEM_PATH,
                QWENVL_VENV=str(venv), NPROC_PER_NODE="2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["--max_steps", "1"]
    assert (tmp_path / "path").read_text().startswith(f"{venv}/bin:")  # the venv's python runs the workers
    missing = _run(ROOT / "scripts" / "launch_msrun.sh", tmp_path, path=SYSTEM_PATH, QWENVL_VENV=str(tmp_path / "none"))
    assert missing.returncode == 127 and missing.stdout == ""
    assert missing.stderr.startswith("[launch] error: msrun not found on PATH nor in ")
    assert "install.sh" in missing.stderr


@pytest.mark.parametrize("env, flag, message", [
    ({"QWENVL_DEVICE": "CPU"}, None, "no Ascend device: training in float32"),
    ({"QWENVL_DEVICE": "CPU", "DTYPE": "fp16"}, "fp16", ""),
    ({"QWENVL_DEVICE": "Ascend"}, "bf16", ""),
    ({"DTYPE": "fp32"}, None, ""),
])  # fmt: skip
def test_compute_dtype_follows_the_device_or_dtype(tmp_path, env, flag, message):
    proc = _run(ROOT / "scripts" / "sft_qwen2.5vl_7b.sh", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    _, _, training = parse_args(_train_flags(proc.stdout.splitlines()))
    assert (training.bf16, training.fp16) == (flag == "bf16", flag == "fp16")
    assert message in proc.stderr and (message or "[sft]" not in proc.stderr)
    bad = _run(ROOT / "scripts" / "sft_qwen2.5vl_7b.sh", tmp_path, DTYPE="bfloat")
    assert bad.returncode == 2 and "DTYPE=bfloat: expected bf16, fp16 or fp32" in bad.stderr
