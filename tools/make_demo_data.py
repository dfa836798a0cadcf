"""Write the bundled demo dataset: small shape/colour images and questions about them.

The CPU demo needs real image files and a task a tiny model can learn in minutes, with no download.
Deterministic: the same files every run (`python tools/make_demo_data.py --out demo`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = ("What shape is in the image?", "Describe the object in the picture.", "What do you see?")


def draw_shape(
    shape: str, color: tuple[int, int, int], rng: random.Random, size: int = 112
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One shape of one colour on a light, slightly noisy background, and its box (x1, y1, x2, y2)."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    half = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(half, size - half), rng.randint(half, size - half)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=color)
    return image, box


def make_demo(out: Path, copies: int = 4, seed: int = 0) -> list[dict]:
    """Images under `out/images`, annotations in `out/demo_images.json`, and the shapes' boxes as a COCO
    detection file `out/demo_detection_coco.json` (for the grounding recipe); returns the samples."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    categories = {shape: k + 1 for k, shape in enumerate(SHAPES)}
    coco: dict[str, list] = {"images": [], "annotations": [],
                             "categories": [{"id": i, "name": s} for s, i in categories.items()]}  # fmt: skip
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            for copy in range(copies):
                name = f"images/{color}_{shape}_{copy}.png"
                image, (x1, y1, x2, y2) = draw_shape(shape, rgb, rng)
                image.save(out / name, optimize=True)
                image_id = len(coco["images"]) + 1
                coco["images"].append({"id": image_id, "file_name": name, "width": image.width, "height": image.height})
                coco["annotations"].append({"id": image_id, "image_id": image_id, "category_id": categories[shape],
                                            "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0})  # fmt: skip
                samples.append(
                    {
                        "image": name,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{rng.choice(QUESTIONS)}"},
                            {"from": "gpt", "value": f"A {color} {shape}."},
                        ],
                    }
                )
    (out / "demo_images.json").write_text(json.dumps(samples, indent=1) + "\n", encoding="utf-8")
    (out / "demo_detection_coco.json").write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo", help="output folder (default: demo)")
    parser.add_argument("--copies", type=int, default=4, help="images per colour/shape pair (default: 4)")
    args = parser.parse_args()
    samples = make_demo(Path(args.out), args.copies)
    print(f"wrote {len(samples)} samples to {args.out}/demo_images.json")


if __name__ == "__main__":
    main()
