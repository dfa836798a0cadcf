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


def draw_shape(shape: str, color: tuple[int, int, int], rng: random.Random, size: int = 112) -> Image.Image:
    """One shape of one colour on a light, slightly noisy background."""
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
    return image


def make_demo(out: Path, copies: int = 4, seed: int = 0) -> list[dict]:
    """Images under `out/images`, annotations in `out/demo_images.json`; returns the samples."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            for copy in range(copies):
                name = f"images/{color}_{shape}_{copy}.png"
                draw_shape(shape, rgb, rng).save(out / name, optimize=True)
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
