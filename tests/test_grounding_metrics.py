"""Box parsing, IoU matching and the evaluation metrics, against hand-computed values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qwenvl.data.image_processing import VisionSettings
from qwenvl.infer.grounding import Box, grounding_metrics, iou, match_ious, parse_boxes, pixel_scale

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from evaluate import classification_metrics  # noqa: E402


def test_parse_fenced_json_plain_json_and_qwen2_tokens():
    fenced = 'Here:\n```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}, {"bbox_2d": [1, 2, 3, 4]}]\n```'
    assert parse_boxes(fenced) == [Box(10, 20, 30, 40, "cat"), Box(1, 2, 3, 4, "")]
    assert parse_boxes('{"bbox_2d": [5, 6, 7, 8], "label": "dog"} trailing') == [Box(5, 6, 7, 8, "dog")]
    qwen2 = "<|object_ref_start|>car<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
    assert parse_boxes(qwen2) == [Box(100, 200, 300, 400, "car")]
    assert parse_boxes("no boxes here") == [] and parse_boxes('[{"bbox_2d": [1, 2]}]') == []
    assert parse_boxes("```json\n[{\"bbox_2d\": [1, 2, 3,") == []  # truncated generation: a miss, no exception


def test_iou_and_one_to_one_matching():
    a, b = Box(0, 0, 10, 10), Box(5, 0, 15, 10)
    assert iou(a, b) == pytest.approx(50 / 150)
    assert iou(a, Box(20, 20, 30, 30)) == 0.0
    # two predictions near the first reference: only the better one is used; the second reference is missed
    refs = [Box(0, 0, 10, 10), Box(100, 100, 110, 110)]
    preds = [Box(0, 0, 10, 8), Box(0, 0, 10, 10)]
    assert match_ious(preds, refs) == [1.0, 0.0]


def test_grounding_metrics_hand_computed():
    m = grounding_metrics([1.0, 0.6, 0.0, 0.8])
    assert m == {"boxes": 4, "mean_iou": pytest.approx(0.6), "median_iou": pytest.approx(0.7),
                 "detection_rate": 0.75, "iou>0.5": 0.75, "iou>0.7": 0.5}  # fmt: skip


def test_classification_accuracy_normalises_case_and_final_period():
    m = classification_metrics([("A red circle.", "a red circle"), ("blue", "Red"), ("Red", "red")])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["per_class_accuracy"] == {"a red circle": 1.0, "red": 0.5}


def test_pixel_scale_per_family():
    settings = VisionSettings.for_family("qwen2.5vl", min_pixels=56 * 56, max_pixels=28 * 28 * 100)
    # 400x300 (h x w) -> smart_resize keeps <= 100 patches of 28: 308 x 224 -> scale 300/224, 400/308
    sx, sy = pixel_scale("qwen2.5vl", 300, 400, settings)
    assert (sx, sy) == (pytest.approx(300 / 224), pytest.approx(400 / 308))
    assert pixel_scale("qwen3vl", 300, 400, settings) == (0.3, 0.4)
