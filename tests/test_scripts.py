"""Launch scripts: the msrun command line they build, checked with a stand-in `msrun` on PATH."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qwenvl.train.argument import parse_args

ROOT = Path(__file__).resolve().parents[1]
MODEL_SCRIPTS = sorted((ROOT / "scripts").glob("sft_qwen*.sh"))


def _launch(script: Path, tmp_path: Path, *args: str, **env: str) -> list[str]:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "msrun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (fake / "msrun").chmod(0o755)
    run_env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", **env}
    out = subprocess.run(["bash", str(script), *args], env=run_env, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_there_is_a_script_per_upstream_recipe():
    names = {p.name for p in MODEL_SCRIPTS}
    assert {"sft_qwen2.5vl_3b.sh", "sft_qwen2.5vl_7b.sh", "sft_qwen3vl_4b.sh", "sft_qwen3vl_8b.sh",
            "sft_qwen3vl_30b_a3b_lora.sh"} <= names  # fmt: skip


@pytest.mark.parametrize("script", MODEL_SCRIPTS, ids=lambda p: p.name)
def test_multi_node_msrun_line_and_flags_parse(script, tmp_path):
    argv = _launch(script, tmp_path, NNODES="2", NPROC_PER_NODE="8", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    assert argv[:7] == ["--worker_num=16", "--local_worker_num=8", "--master_addr=10.0.0.1", "--master_port=8118",
                        "--node_rank=1", f"--log_dir={ROOT}/logs/train", "--join=True"]  # fmt: skip
    assert argv[7] == "qwenvl/train/train_qwen.py"
    model_args, _, training = parse_args(argv[8:])  # every flag is one train_qwen.py accepts
    assert training.bf16 and training.gradient_checkpointing and training.optim == "adamw_zero1_mindspore"
    assert training.per_device_eval_batch_size == 2 * training.per_device_train_batch_size
    if "lora" in script.name:
        assert training.lora_enable and not model_args.tune_mm_llm
    else:
        assert model_args.tune_mm_llm and model_args.tune_mm_mlp and not model_args.tune_mm_vision


def test_single_node_defaults_and_extra_flags_win(tmp_path):
    argv = _launch(ROOT / "scripts" / "sft_qwen3vl_4b.sh", tmp_path, "--learning_rate", "3e-6", NPROC_PER_NODE="4")
    assert argv[0] == "--worker_num=4" and "--node_rank=0" in argv
    _, data, training = parse_args(argv[8:])
    assert training.learning_rate == 3e-6 and data.max_pixels == 256 * 32 * 32
