"""Model folders laid out as Hugging Face ships them: the chat template is read as a processor reads it
(`chat_template.jinja`, then the legacy `chat_template.json`, then the tokenizer's own), with the real Qwen BPE
files, whose tokenizer_config.json carries Qwen3's text-only template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwenvl.data.annotations import parse_sample
from qwenvl.data.arguments import DataArguments
from qwenvl.data.chat_templates import QWEN3_VL_CHAT_TEMPLATE
from qwenvl.data.errors import SampleError
from qwenvl.data.pipeline import build_encoder
from qwenvl.data.processor_files import processor_chat_template

DEMO = Path(__file__).resolve().parents[1] / "demo"
SAMPLE = {"image": "images/red_circle_0.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red circle."}]}  # fmt: skip


def _hf_layout(ours: Path, qwen_tokenizer_dir: Path, out: Path, template_files: dict[str, str]) -> Path:
    """A copy of a folder we wrote, with the tokenizer files as shipped and the given template files instead."""
    shutil.copytree(ours, out)
    (out / "chat_template.jinja").unlink()
    shutil.copyfile(qwen_tokenizer_dir / "tokenizer_config.json", out / "tokenizer_config.json")
    for name, text in template_files.items():
        (out / name).write_text(text, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def ours(processor_dir_factory) -> Path:
    return processor_dir_factory("qwen3vl")


def _encode(folder: Path):
    return build_encoder(folder, DataArguments()).encode(parse_sample(SAMPLE, str(DEMO), "test.json", 7))


def test_shipped_tokenizer_config_holds_a_text_only_template(qwen_tokenizer_dir):
    template = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert "image" not in template and ".startswith(" in template  # why the VL file must win


def test_chat_template_json_folder_encodes_like_our_layout(ours, qwen_tokenizer_dir, tmp_path):
    hf = _hf_layout(ours, qwen_tokenizer_dir, tmp_path / "hf",
                    {"chat_template.json": json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE})})  # fmt: skip
    assert processor_chat_template(hf) == QWEN3_VL_CHAT_TEMPLATE
    expected, got = _encode(ours), _encode(hf)
    np.testing.assert_array_equal(got.input_ids, expected.input_ids)
    np.testing.assert_array_equal(got.labels, expected.labels)


def test_jinja_wins_over_json_and_the_tokenizer_template_is_the_last_resort(ours, qwen_tokenizer_dir, tmp_path):
    both = _hf_layout(ours, qwen_tokenizer_dir, tmp_path / "both", {"chat_template.jinja": "JINJA",
                      "chat_template.json": json.dumps({"chat_template": "JSON"})})  # fmt: skip
    assert processor_chat_template(both) == "JINJA"
    named = _hf_layout(ours, qwen_tokenizer_dir, tmp_path / "named", {"chat_template.json": json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})})  # fmt: skip
    assert processor_chat_template(named) == "D"
    bare = _hf_layout(ours, qwen_tokenizer_dir, tmp_path / "bare", {})
    assert processor_chat_template(bare) is None
    with pytest.raises(SampleError, match=r"^file test\.json, sample 7: the model's chat template failed on this "
                                          r"sample \(UndefinedError: .*startswith"):  # fmt: skip
        _encode(bare)  # the text template on a vision sample: a located error, not a raw jinja traceback
