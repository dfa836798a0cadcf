"""Model family from a checkpoint's `config.json`, never from its folder name.

Upstream picks the class by substrings of the path ("qwen2.5" in the path, "a" in the basename for
MoE), which misfires on renamed folders; `model_type` is what Hugging Face itself dispatches on.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = {
    "qwen2_vl": "qwen2vl",
    "qwen2_5_vl": "qwen2.5vl",
    "qwen3_vl": "qwen3vl",
    "qwen3_vl_moe": "qwen3vl",
}


def read_model_type(model_dir: str | Path) -> str:
    """The `model_type` of a local checkpoint folder (ValueError naming the file if absent)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: models load from a local folder with a config.json")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{config_path}: model_type {model_type!r} is not one of {sorted(FAMILIES)}")
    return model_type


def model_family(model_dir: str | Path) -> str:
    """"qwen2vl", "qwen2.5vl" or "qwen3vl": selects the template mode, rope function and vision defaults."""
    return FAMILIES[read_model_type(model_dir)]
