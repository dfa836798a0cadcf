"""Grounding answers: parse `bbox_2d` boxes from model text, match them to references, draw them.

Qwen2.5-VL and Qwen3-VL answer grounding prompts with a JSON list (often in a ```json fence) of
`{"bbox_2d": [x1, y1, x2, y2], "label": ...}`; Qwen2-VL writes `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`.
Both are read here; text that is not a box list gives no boxes (a miss), never an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
_QWEN2_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>)?\s*"
    r"<\|box_start\|>\((?P<x1>-?\d+(?:\.\d+)?),\s*(?P<y1>-?\d+(?:\.\d+)?)\),\s*"
    r"\((?P<x2>-?\d+(?:\.\d+)?),\s*(?P<y2>-?\d+(?:\.\d+)?)\)<\|box_end\|>"
)


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


def _boxes_from_json(value) -> list[Box]:
    items = value if isinstance(value, list) else [value]
    boxes = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("bbox_2d"), (list, tuple)) and len(item["bbox_2d"]) == 4:
            try:
                x1, y1, x2, y2 = (float(v) for v in item["bbox_2d"])
            except (TypeError, ValueError):
                continue
            boxes.append(Box(x1, y1, x2, y2, str(item.get("label", ""))))
    return boxes


def parse_boxes(text: str) -> list[Box]:
    """Every box in a model answer (JSON `bbox_2d` list, fenced or not, or Qwen2-VL box tokens)."""
    qwen2 = [
        Box(float(m["x1"]), float(m["y1"]), float(m["x2"]), float(m["y2"]), (m["label"] or "").strip())
        for m in _QWEN2_BOX.finditer(text)
    ]
    if qwen2:
        return qwen2
    fenced = _FENCE.search(text)
    candidate = fenced.group(1) if fenced else text
    start = min((i for i in (candidate.find("["), candidate.find("{")) if i >= 0), default=-1)
    if start < 0:
        return []
    for end in range(len(candidate), start, -1):
        if candidate[end - 1] not in "]}":
            continue
        try:
            return _boxes_from_json(json.loads(candidate[start:end]))
        except json.JSONDecodeError:
            continue
    return []


def iou(a: Box, b: Box) -> float:
    w = min(a.x2, b.x2) - max(a.x1, b.x1)
    h = min(a.y2, b.y2) - max(a.y1, b.y1)
    inter = max(0.0, w) * max(0.0, h)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def match_ious(predicted: list[Box], reference: list[Box]) -> list[float]:
    """One IoU per reference box: greedy one-to-one matching by highest IoU; unmatched references get 0."""
    pairs = sorted(
        ((iou(p, r), i, j) for i, p in enumerate(predicted) for j, r in enumerate(reference)), reverse=True
    )
    used_p, result = set(), [0.0] * len(reference)
    used_r = set()
    for value, i, j in pairs:
        if value <= 0 or i in used_p or j in used_r:
            continue
        used_p.add(i)
        used_r.add(j)
        result[j] = value
    return result


def grounding_metrics(ious: list[float]) -> dict[str, float]:
    """Detection-fine-tune figures over all reference boxes."""
    values = np.asarray(ious, dtype=np.float64)
    if values.size == 0:
        return {"boxes": 0, "mean_iou": 0.0, "median_iou": 0.0, "detection_rate": 0.0, "iou>0.5": 0.0, "iou>0.7": 0.0}
    return {
        "boxes": int(values.size),
        "mean_iou": float(values.mean()),
        "median_iou": float(np.median(values)),
        "detection_rate": float((values > 0).mean()),
        "iou>0.5": float((values > 0.5).mean()),
        "iou>0.7": float((values > 0.7).mean()),
    }


def draw_boxes(image_path: str | Path, boxes: list[Box], out_path: str | Path, scale: tuple[float, float] = (1, 1)) -> Path:
    """The image with each box outlined and labelled, saved as PNG; `scale` maps box units to pixels."""
    from PIL import Image, ImageDraw

    image = Image.open(image_path).convert("RGB")
    draw = ImageDraw.Draw(image)
    sx, sy = scale
    for k, box in enumerate(boxes):
        color = ((53 * k + 200) % 256, (97 * k + 40) % 256, (151 * k + 90) % 256)
        xy = (box.x1 * sx, box.y1 * sy, box.x2 * sx, box.y2 * sy)
        draw.rectangle(xy, outline=color, width=max(1, round(min(image.size) / 150)))
        if box.label:
            draw.text((xy[0] + 2, xy[1] + 2), box.label, fill=color)
    out = Path(out_path)
    image.save(out, format="PNG")
    return out


def pixel_scale(family: str, width: int, height: int, settings) -> tuple[float, float]:
    """Box units -> original-image pixels: Qwen2.5-VL boxes are absolute on the smart-resized image,
    Qwen2-VL and Qwen3-VL boxes are relative in 0..1000."""
    from qwenvl.data.image_processing import smart_resize

    if family == "qwen2.5vl":
        resized_h, resized_w = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
        return width / resized_w, height / resized_h
    return width / 1000.0, height / 1000.0
