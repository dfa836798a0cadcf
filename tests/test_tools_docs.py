"""docs/tools.md documents every tool in tools/: a section per tool with an example command line and every
flag of the tool's own parser (training's data flags may be named once for all, as "the data flags")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl.data.arguments import DataArguments

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted(p.name for p in (ROOT / "tools").glob("*.py"))
# training's pixel, video and prompt flags (add_data_flags: every DataArguments field but the dataset selection)
DATA_FLAGS = {f"--{name}" for name in DataArguments.__dataclass_fields__} - {
    "--dataset_use", "--eval_dataset_use", "--dataset_registry", "--data_flatten", "--data_packing"}


def _section(tool: str) -> str:
    text = (ROOT / "docs" / "tools.md").read_text(encoding="utf-8")
    match = re.search(rf"^### {re.escape(tool)}:.*?(?=^### |\Z)", text, re.S | re.M)
    assert match, f"docs/tools.md has no '### {tool}: ...' section"
    return match.group(0)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_has_a_section_with_its_flags_and_an_example(tool):
    section = _section(tool)
    assert re.search(rf"```bash\npython tools/{re.escape(tool)} ", section), f"{tool}: no example command"
    help_text = subprocess.run([sys.executable, str(ROOT / "tools" / tool), "--help"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    flags = set(re.findall(r"^\s+(?:-\w, )?(--\w+)", help_text, re.M)) - {"--help"}
    if "the data flags" in section:
        assert DATA_FLAGS <= flags, f"{tool}: says it takes the data flags, but does not take them all"
        flags -= DATA_FLAGS
    missing = sorted(f for f in flags if f"`{f}`" not in section)
    assert not missing, f"{tool}: flags not documented in docs/tools.md: {missing}"
