"""The README's Recipes run as written: every bash block of that section, in order, in a scratch copy of
the project (so `runs/` of the checkout is untouched), with this interpreter's environment."""

from __future__ import annotations

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


def test_recipes_run(tmp_path):
    for name in ("demo", "tools", "qwenvl"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    script = "set -euo pipefail\n" + "\n".join(recipe_blocks())
    script = script.replace("source ~/.venvs/qwenvl-ms/bin/activate", "")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "GLOG_v": "3"}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "train 36, val 12" in out  # convert_imagefolder
    assert out.count("[train] done") == 4
    assert "114 samples" in out  # 50% of 36 + 200% of 48
    assert "classification: results written" in out and "grounding: results written" in out
    assert "merged 8 LoRA modules" in out
    assert (tmp_path / "runs/cls/loss.png").is_file() and (tmp_path / "runs/lora_merged/model.safetensors").is_file()
