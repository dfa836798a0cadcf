"""Every tool documents itself: `python tools/X.py --help` exits 0 and names its key inputs and outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "check_data.py": ("_problems.json", "--max_pixels"),
    "convert_imagefolder.py": ("registry.json", "--prompt_template"),
    "convert_detection.py": ("bbox_2d", "--keep_empty"),
    "monitor.py": ("train_log.jsonl", "--watch"),
    "pack_data.py": ("_pack.json", "--oversize"),
    "evaluate.py": ("mean IoU", "--dataset_use"),
    "infer.py": ("--draw", "--top_p"),
    "merge_lora.py": ("lora_alpha", "--adapter"),
    "make_tiny_model.py": ("config.json", "--family"),
    "make_demo_data.py": ("demo dataset", "--copies"),
    "estimate_memory.py": ("config.json", "--recipes"),
}


def test_every_tool_is_listed():
    tools = {p.name for p in (ROOT / "tools").glob("*.py")}
    assert tools == set(EXPECTED)


@pytest.mark.parametrize("tool", sorted(EXPECTED))
def test_help_documents_the_tool(tool):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for text in EXPECTED[tool]:
        assert text in result.stdout, f"{tool} --help does not mention {text!r}"
