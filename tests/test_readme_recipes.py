"""The README's Recipes run as written: every bash block of that section, in order, in a scratch copy of
the project (so `runs/` of the checkout is untouched), with this interpreter's environment; then the
outcomes a user looks at: evaluation with the trained pixel limits, uncut grounding answers, the LoRA
run folder as a model, and a rerun of the finished classification run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def recipe_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Recipes", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def test_recipes_section_has_the_four_walkthroughs():
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Recipes", 1)[1]
    for title in ("Classification fine-tune", "Several datasets at once", "Grounding fine-tune", "LoRA, then merge"):
        assert f"### {title}" in text
    assert len(recipe_blocks()) == 5


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "GLOG_v": "3"}
    script = "set -euo pipefail\n" + script.replace("source ~/.venvs/qwenvl-ms/bin/activate", "")
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)


def _command(block: str, start: str) -> str:
    """The (backslash-continued) command of a recipe block that starts with `start`."""
    return re.search(rf"^{re.escape(start)}.*?[^\\]$", block, re.S | re.M).group(0)


def test_recipes_run(tmp_path):
    for name in ("demo", "tools", "qwenvl"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = _bash("\n".join(recipe_blocks()), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "train 36, val 12" in out  # convert_imagefolder
    assert out.count("[train] done") == 4
    assert "114 samples" in out  # 50% of 36 + 200% of 48
    assert "classification: results written" in out and "grounding: results written" in out
    assert "merged 8 LoRA modules" in out
    assert (tmp_path / "runs/cls/loss.png").is_file() and (tmp_path / "runs/lora_merged/model.safetensors").is_file()
    assert "registry runs/grounding/registry.json: shapes_grounding" in out  # convert_detection registered it
    runs = tmp_path / "runs"

    # evaluate read the trained limits: 112x112 images -> smart_resize(.., 28, 784, 3136) = 56x56 -> 4 tokens
    cls = json.loads((runs / "cls/eval_results.json").read_text())
    assert (cls["settings"]["max_pixels"], cls["settings"]["min_pixels"]) == (3136, 784)
    assert {p["vision_tokens"] for p in cls["predictions"]} == {4} and len(cls["predictions"]) == 12
    assert "data settings of runs/cls (preprocessor_config.json, qwenvl_vision.json, args.json): min_pixels 784" in out

    # grounding: the 42-46-token answers fit in --max_new_tokens 64, none is cut
    from qwenvl.data.processor_files import load_tokenizer

    grounding = json.loads((runs / "grounding/run/eval_results.json").read_text())
    tokenizer = load_tokenizer(runs / "tiny")
    lengths = [len(tokenizer.encode(p["reference"])) for p in grounding["predictions"]]
    assert 42 <= min(lengths) and max(lengths) <= 46 and grounding["settings"]["max_new_tokens"] == 64
    assert grounding["metrics"]["hit_max_new_tokens"] == 0 and "answers reached --max_new_tokens" not in out

    # the LoRA run folder answered as --model (base from its adapter_config.json)
    assert "data settings of runs/lora (" in out

    # rerunning the finished classification training: nothing to do; with another learning rate: an error
    train_cls = _command(recipe_blocks()[1], "python qwenvl/train/train_qwen.py")
    rerun = _bash(train_cls, tmp_path)
    assert rerun.returncode == 0 and "[train] nothing to do: runs/cls already holds this run" in rerun.stdout
    changed = _bash(train_cls + " --learning_rate 1e-3", tmp_path)
    assert changed.returncode == 2 and "--learning_rate 0.002 -> 0.001" in changed.stderr
