"""Turn COCO-style detection annotations into grounding samples for Qwen2-VL, Qwen2.5-VL or Qwen3-VL.

    python tools/convert_detection.py --annotations instances_train.json --image_root train2017/ \\
        --family qwen2.5vl --output grounding_train.json

Each image becomes one question (`--prompt`, `{categories}` replaced by the category names asked about)
and one answer in the JSON form Qwen2.5-VL's grounding outputs use:

    ```json
    [
    \t{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}
    ]
    ```

Coordinates follow what each family was trained on:
- qwen2.5vl: ABSOLUTE pixels on the image the model sees, i.e. after `smart_resize` with the training
  `--min_pixels/--max_pixels` and factor 28; pass the same values as to training.
- qwen2vl and qwen3vl: RELATIVE integers 0..1000 (x / width * 1000), independent of resizing.
COCO boxes `[x, y, w, h]` are clipped to the image first; boxes empty after clipping and crowd boxes
(unless `--keep_crowd`) are dropped. Images with no box are left out unless `--keep_empty` (answer `[]`).
`--ask present` (default) names the categories present in the image; images without boxes, and every
image with `--ask all`, are asked about all categories. Image paths in the output are COCO's
`file_name`, relative to --image_root; like convert_imagefolder.py, the tool registers the output in
`registry.json` beside it (entry `--name`, default the output's stem, with `data_path` = the image root
relative to the registry; entries already there are kept), ready for
`train_qwen.py --dataset_registry <dir>/registry.json --dataset_use <name>`.
Exit code: 0 done, 1 done but some annotations or images were skipped (listed), 2 nothing written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl.cli_args import parse_int  # noqa: E402
from qwenvl.constants import IMAGE_TAG  # noqa: E402
from qwenvl.data.arguments import DataArguments  # noqa: E402
from qwenvl.data.image_processing import VisionSettings, image_size, smart_resize  # noqa: E402

FAMILIES = ("qwen2vl", "qwen2.5vl", "qwen3vl")
ABSOLUTE_FAMILIES = ("qwen2.5vl",)
RELATIVE_SCALE = 1000
DEFAULT_PROMPT = "Locate every {categories} in the image and output bbox coordinates in JSON format."


class ConversionError(ValueError):
    """An input that leaves nothing to convert; shown as one message, exit code 2."""


@dataclass
class CocoImage:
    id: int
    file_name: str
    width: int
    height: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--annotations", required=True, help="COCO-style JSON: images, annotations (bbox [x,y,w,h]), categories"
    )
    parser.add_argument(
        "--image_root", default=None, help="folder of the images' file_name (default: the JSON's folder)"
    )
    parser.add_argument(
        "--family", required=True, choices=FAMILIES, help="target model family: decides the coordinate system"
    )
    parser.add_argument(
        "--output", default=None, help="output JSON (default: <stem>_grounding_<family>.json beside the input)"
    )
    parser.add_argument(
        "--name", default=None, help="dataset name in the output folder's registry.json (default: the output's stem)"
    )
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"question; {{categories}} is replaced (default: {DEFAULT_PROMPT!r})"
    )
    parser.add_argument(
        "--ask",
        choices=("present", "all"),
        default="present",
        help="categories named in the question (default: present)",
    )
    parser.add_argument("--keep_empty", action="store_true", help="keep images without boxes (answer: [])")
    parser.add_argument("--keep_crowd", action="store_true", help="keep COCO iscrowd=1 boxes (default: dropped)")
    defaults = DataArguments()
    parser.add_argument(
        "--min_pixels",
        type=parse_int,
        default=defaults.min_pixels,
        help=f"as training, qwen2.5vl only (default: {defaults.min_pixels})",
    )
    parser.add_argument(
        "--max_pixels",
        type=parse_int,
        default=defaults.max_pixels,
        help=f"as training, qwen2.5vl only (default: {defaults.max_pixels})",
    )
    return parser.parse_args(argv)


def _nearest(value: float) -> int:
    """Round half up (Python's round() goes to even, which is surprising in hand-checked coordinates)."""
    return int(math.floor(value + 0.5))


def clip_box(bbox: list[float], width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO [x, y, w, h] -> (x1, y1, x2, y2) inside the image; None when nothing is left."""
    x, y, w, h = bbox
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def box_scale(family: str, width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[float, float, int, int]:
    """(x factor, y factor, x max, y max) mapping original pixels to the family's coordinates."""
    if family in ABSOLUTE_FAMILIES:
        factor = VisionSettings.for_family(family).factor
        resized_h, resized_w = smart_resize(height, width, factor, min_pixels, max_pixels)
        return resized_w / width, resized_h / height, resized_w, resized_h
    return RELATIVE_SCALE / width, RELATIVE_SCALE / height, RELATIVE_SCALE, RELATIVE_SCALE


def convert_box(box: tuple[float, float, float, float], scale: tuple[float, float, int, int]) -> list[int]:
    sx, sy, max_x, max_y = scale
    x1, y1, x2, y2 = box
    return [
        min(_nearest(x1 * sx), max_x),
        min(_nearest(y1 * sy), max_y),
        min(_nearest(x2 * sx), max_x),
        min(_nearest(y2 * sy), max_y),
    ]


def render_answer(objects: list[dict]) -> str:
    """The fenced JSON list, one object per tab-indented line as Qwen2.5-VL writes it."""
    if not objects:
        return "```json\n[]\n```"
    return "```json\n[\n" + ",\n".join(f"\t{json.dumps(o, ensure_ascii=False)}" for o in objects) + "\n]\n```"


def load_coco(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"--annotations {path}: file not found")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ConversionError(f"--annotations {path}: malformed JSON at {where}: {exc.msg}") from exc
    keys = ("images", "annotations", "categories")
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in keys):
        raise ConversionError(f"--annotations {path}: expected an object with {', '.join(map(repr, keys))} lists")
    return coco


def _categories(coco: dict) -> dict[int, str]:
    names = {}
    for entry in coco["categories"]:
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("name"), str):
            raise ConversionError(f"category {entry!r} needs an 'id' and a 'name'")
        names[entry["id"]] = entry["name"]
    return names


def _images(coco: dict, image_root: Path, problems: list[str]) -> tuple[dict[int, CocoImage], set]:
    """Images with their sizes (from the JSON, else the file header), and the ids of unusable ones (in `problems`)."""
    images = {}
    unusable = set()
    for position, entry in enumerate(coco["images"]):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            problems.append(f"images[{position}]: needs an 'id' and a 'file_name'")
            continue
        width, height = entry.get("width"), entry.get("height")
        sized = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in (width, height))
        if sized:
            width, height = int(width), int(height)
        else:
            try:
                height, width = image_size(image_root / entry["file_name"])
            except ValueError as exc:
                problems.append(f"image {entry['id']}: no width/height in the JSON and {exc}")
                unusable.add(entry["id"])
                continue
        images[entry["id"]] = CocoImage(entry["id"], entry["file_name"], width, height)
    return images, unusable


def _valid_bbox(bbox: object) -> bool:
    return isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)


def convert(coco: dict, image_root: Path, args: argparse.Namespace) -> tuple[list[dict], list[str], dict[str, int]]:
    """Grounding samples, the problems met, and counts of what was kept and dropped."""
    problems: list[str] = []
    categories = _categories(coco)
    images, unusable = _images(coco, image_root, problems)
    boxes: dict[int, list[tuple[tuple[float, float, float, float], int]]] = {i: [] for i in images}
    counts = {"boxes": 0, "crowd dropped": 0, "empty after clipping": 0, "images without boxes": 0}
    for position, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict):
            problems.append(f"annotations[{position}]: not an object")
            continue
        if ann.get("image_id") not in images:
            if ann.get("image_id") not in unusable:  # an unusable image is reported once, above
                problems.append(f"annotations[{position}]: unknown image_id {ann.get('image_id')!r}")
            continue
        if ann.get("category_id") not in categories:
            problems.append(f"annotations[{position}]: unknown category_id {ann.get('category_id')!r}")
            continue
        if not _valid_bbox(ann.get("bbox")):
            problems.append(f"annotations[{position}]: bbox must be [x, y, w, h] numbers, got {ann.get('bbox')!r}")
            continue
        if ann.get("iscrowd") and not args.keep_crowd:
            counts["crowd dropped"] += 1
            continue
        image = images[ann["image_id"]]
        box = clip_box(ann["bbox"], image.width, image.height)
        if box is None:
            counts["empty after clipping"] += 1
            continue
        boxes[image.id].append((box, ann["category_id"]))
        counts["boxes"] += 1
    samples = []
    for image in images.values():
        found = boxes[image.id]
        if not found and not args.keep_empty:
            counts["images without boxes"] += 1
            continue
        scale = box_scale(args.family, image.width, image.height, args.min_pixels, args.max_pixels)
        objects = [{"bbox_2d": convert_box(box, scale), "label": categories[cat]} for box, cat in found]
        present = {cat for _, cat in found}
        asked = [name for cat, name in categories.items() if args.ask == "all" or not present or cat in present]
        question = args.prompt.replace("{categories}", ", ".join(asked))
        samples.append(
            {
                "image": image.file_name,
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_TAG}\n{question}"},
                    {"from": "gpt", "value": render_answer(objects)},
                ],
            }
        )
    return samples, problems, counts


def register(output: Path, image_root: Path, name: str) -> Path:
    """Add `name` -> the output and its image root to `registry.json` beside the output (paths relative to it)."""
    registry_path = output.parent / "registry.json"
    registry = json.loads(registry_path.read_text(encoding="utf-8")) if registry_path.is_file() else {}
    data_path = os.path.relpath(image_root.resolve(), output.parent.resolve())
    registry[name] = {"annotation_path": output.name, "data_path": data_path}
    registry_path.write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    return registry_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.annotations)
    image_root = Path(args.image_root) if args.image_root else path.resolve().parent
    try:
        samples, problems, counts = convert(load_coco(path), image_root, args)
    except ConversionError as exc:
        print(f"[convert_detection] error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"[convert_detection] skipped {problem}", file=sys.stderr)
    if not samples:
        reason = "no sample to write (no image with a usable box; see --keep_empty)"
        print(f"[convert_detection] error: {reason}", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else path.with_name(f"{path.stem}_grounding_{args.family}.json")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        name = args.name or output.stem
        registry = register(output, image_root, name)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"[convert_detection] error: cannot write {output}: {exc}", file=sys.stderr)
        return 2
    print(
        f"[convert_detection] {len(samples)} samples ({args.family}, "
        f"{'absolute resized pixels' if args.family in ABSOLUTE_FAMILIES else 'relative 0..1000'}) -> {output}; "
        f"{', '.join(f'{k} {v}' for k, v in counts.items())}; problems {len(problems)}; registry {registry}: {name}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
