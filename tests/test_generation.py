"""Generation: greedy tokens equal transformers' `generate` (KV cache, its own positions) on the same
weights; the infer and evaluate CLIs on a tiny model, bad inputs reported without a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl.data.annotations import parse_sample
from qwenvl.data.arguments import DataArguments
from qwenvl.infer.generate import GenerationConfig, encode_prompt, load_generator, pick_token
from qwenvl.infer.grounding import Box, draw_boxes
from tests.hf_child import run_child

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
sys.path.insert(0, str(ROOT / "tools"))
import evaluate  # noqa: E402
import infer  # noqa: E402


def _item(image: str, answer: str = "") -> dict:
    return {"image": image, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                              {"from": "gpt", "value": answer}]}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen2.5vl")


def test_prompt_is_the_training_context_up_to_the_reply(tiny):
    generator = load_generator(str(tiny), DataArguments())
    sample = parse_sample(_item("images/red_circle_0.png", "A red circle."), str(DEMO))
    full = generator.encoder.encode(sample)
    prompt = encode_prompt(generator.encoder, sample)
    n = len(prompt.input_ids)
    np.testing.assert_array_equal(prompt.input_ids, full.input_ids[:n])
    np.testing.assert_array_equal(prompt.position_ids, full.position_ids[:, :n])
    assert full.labels[n - 1] == -100 and full.labels[n] != -100  # the reply starts right after the prompt
    header = generator.encoder.tokenizer.decode(prompt.input_ids)
    assert header.endswith("<|im_start|>assistant\n")


def test_greedy_tokens_equal_transformers_generate(tiny, tmp_path):
    generator = load_generator(str(tiny), DataArguments())
    prompt = encode_prompt(generator.encoder, parse_sample(_item("images/red_circle_0.png"), str(DEMO)))
    ours = generator.generate(prompt, GenerationConfig(max_new_tokens=6))
    special = generator.encoder.special
    inputs = {"input_ids": prompt.input_ids[None], "attention_mask": np.ones((1, len(prompt.input_ids)), np.int64),
              "pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw}  # fmt: skip
    request = {"task": "generate", "base": str(tiny), "max_new_tokens": 6,
               "eos_token_ids": [special.im_end, special.pad], "pad_token_id": special.pad}  # fmt: skip
    ref = [int(t) for t in run_child(tmp_path, request, inputs)["tokens"] if t not in (special.im_end, special.pad)]
    assert len(ours) > 0 and ours == ref


def test_sampling_respects_top_k_and_seed():
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    rng = np.random.default_rng(0)
    picks = {pick_token(logits, GenerationConfig(do_sample=True, top_k=2), rng) for _ in range(200)}
    assert picks == {1, 2}
    same = [pick_token(logits, GenerationConfig(do_sample=True, seed=1), np.random.default_rng(1)) for _ in range(2)]
    assert same[0] == same[1]
    assert pick_token(logits, GenerationConfig(), rng) == 1


def test_infer_cli_answers_and_reports_missing_files(tiny, capsys):
    assert infer.main(["--model", str(tiny), "--image", str(DEMO / "images/red_circle_0.png"),
                       "--prompt", "What is it?", "--max_new_tokens", "3"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()
    assert infer.main(["--model", str(tiny), "--image", "nowhere.png", "--prompt", "x"]) == 2
    assert "file not found: nowhere.png" in capsys.readouterr().err


def test_draw_boxes_outlines_the_box(tmp_path):
    Image.new("RGB", (100, 80), (255, 255, 255)).save(tmp_path / "white.png")
    out = draw_boxes(tmp_path / "white.png", [Box(100, 100, 500, 500, "x")], tmp_path / "boxes.png", (0.1, 0.1))
    pixels = np.asarray(Image.open(out))
    assert (pixels[10, 10:50] != 255).any(axis=-1).all()  # top edge at y=10 from x=10 to 50
    assert (pixels[30, 20] == 255).all() and (pixels[70, 70] == 255).all()  # inside and outside untouched


def test_evaluate_cli_scores_and_counts_unreadable_samples(tiny, tmp_path, capsys):
    items = [_item(str(DEMO / "images/red_circle_0.png"), "A red circle."), _item("missing.png", "x"),
             _item(str(DEMO / "images/red_circle_1.png"), "A red circle.")]  # fmt: skip
    (tmp_path / "test.json").write_text(json.dumps(items), encoding="utf-8")
    out = tmp_path / "results.json"
    code = evaluate.main(["--model", str(tiny), "--dataset_use", str(tmp_path / "test.json"),
                          "--max_new_tokens", "3", "--output", str(out)])  # fmt: skip
    assert code == 0
    results = json.loads(out.read_text())
    assert results["task"] == "classification" and results["metrics"]["samples"] == 2
    assert results["metrics"]["unreadable_samples"] == 1
    assert results["problems"][0]["index"] == 1 and "missing.png" in results["problems"][0]["reason"]
    hits = [p["prediction"].strip().lower().rstrip(".") == "a red circle" for p in results["predictions"]]
    assert results["metrics"]["accuracy"] == pytest.approx(sum(hits) / 2)
    assert "missing.png" in capsys.readouterr().err
