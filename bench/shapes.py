"""How many distinct training-step shapes (compiled graphs) a realistic dataset needs, simulated over 10k steps.

    python bench/shapes.py                          # the sft.sh recipe and default pixel limits, every policy
    python bench/shapes.py --steps 10000 --samples 20000 --seed 0

No pixels are read: a synthetic dataset of realistic samples is described by sizes only, and each sample's
token and patch counts come from the training pipeline's own rules (`image_grid`, `video_grid`, the Qwen2.5
family). The mix (documented in `synthetic_dataset`): 30% text-only, 45% one photo, 15% two to four photos,
10% one video; text lengths log-normal; photos of ordinary sizes (120 px to 4000 px, common aspect ratios);
videos 5 s to 2 min at 24-30 fps, 360p to 1080p. Micro-batches follow the recipe's layout (flattened rows of
`batch` samples for sft.sh) in a seeded shuffle per epoch, with or without length grouping; a step's shape is
what `ShapeBuckets` pads it to (`qwenvl.data.buckets`, `--length_buckets auto`), or `off` (lengths to a multiple
of 64, patches to a multiple of 256: the policy before buckets) for comparison. Reported: distinct shapes (each
a compiled train-step graph) per policy and the padding they cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl.data.buckets import ShapeBuckets  # noqa: E402
from qwenvl.data.grouping import grouped_order  # noqa: E402
from qwenvl.data.image_processing import VisionSettings, image_grid  # noqa: E402
from qwenvl.data.video_processing import VideoMeta, video_grid  # noqa: E402

TEMPLATE_TOKENS = 21  # system prompt and chat markup of one turn pair (Qwen2.5 template)
PHOTO_SIDES = (120, 240, 320, 480, 640, 800, 1024, 1280, 1600, 2048, 2400, 3000, 4000)
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 9 / 16, 2.0)
VIDEO_SIZES = ((640, 360), (854, 480), (1280, 720), (1920, 1080))
RECIPES = {  # name: (flatten, batch, max_pixels, model_max_length)
    "sft.sh": (True, 4, 50176, 8192),
    "default pixels": (True, 4, 28 * 28 * 576, 8192),
    "padded rows": (False, 4, 28 * 28 * 576, 8192),  # upstream's default layout (no --data_flatten)
}


def synthetic_dataset(n: int, settings: VisionSettings, max_length: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(tokens, patches, has_vision) per sample of the documented mix."""
    rng = np.random.default_rng(seed)
    tokens, patches = np.zeros(n, np.int64), np.zeros(n, np.int64)
    kinds = rng.choice(4, n, p=[0.30, 0.45, 0.15, 0.10])
    for i, kind in enumerate(kinds):
        text = int(np.clip(rng.lognormal(np.log(120), 0.9), 8, 4000)) + TEMPLATE_TOKENS
        vision = 0
        if kind in (1, 2):
            for _ in range(1 if kind == 1 else int(rng.integers(2, 5))):
                side = int(rng.choice(PHOTO_SIDES))
                aspect = float(rng.choice(ASPECTS))
                grid = image_grid(max(28, int(side / np.sqrt(aspect))), max(28, int(side * np.sqrt(aspect))), settings)
                vision += int(grid.prod())
        elif kind == 3:
            width, height = VIDEO_SIZES[int(rng.integers(len(VIDEO_SIZES)))]
            fps = float(rng.choice((24.0, 25.0, 30.0)))
            seconds = float(rng.uniform(5, 120))
            grid = video_grid(VideoMeta(int(seconds * fps), fps, height, width), settings)
            vision += int(grid.prod())
        tokens[i] = min(text + vision // settings.merge_size**2 + 2 * (kind > 0), max_length)
        patches[i] = vision
    return tokens, patches, patches > 0


def count_shapes(tokens, patches, has_vision, recipe: str, steps: int, accumulation: int, seed: int,
                 policy: str, group: bool) -> tuple[int, float, float]:  # fmt: skip
    """(distinct shapes, padded / real tokens, padded / real patches) over `steps` optimizer steps of one rank."""
    flatten, batch, _, max_length = RECIPES[recipe]
    buckets = ShapeBuckets.from_flag(policy, batch, max_length)
    shapes, real, padded, real_patches, padded_patches, micro, epoch = set(), 0, 0, 0, 0, 0, 0
    needed = steps * accumulation
    while micro < needed:
        order = grouped_order(tokens, has_vision, batch, seed, epoch) if group else \
            np.random.default_rng(seed + epoch).permutation(len(tokens))  # fmt: skip
        for start in range(0, len(order) - batch + 1, batch):
            chosen = order[start : start + batch]
            rows = 1 if flatten else batch
            length = buckets.token_count(int(tokens[chosen].sum())) if flatten else \
                buckets.row_length(batch, int(tokens[chosen].max()))  # fmt: skip
            n_patches = int(patches[chosen].sum())
            key = (rows, length, buckets.patch_count(n_patches, rows * length))
            shapes.add(key)
            real, padded = real + int(tokens[chosen].sum()), padded + rows * length
            real_patches, padded_patches = real_patches + n_patches, padded_patches + key[2]
            micro += 1
            if micro == needed:
                break
        epoch += 1
    return len(shapes), padded / real, padded_patches / max(real_patches, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000, help="optimizer steps simulated")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per step (sft.sh: 4)")
    parser.add_argument("--samples", type=int, default=20_000, help="size of the synthetic dataset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{args.steps} steps x {args.accumulation} micro-batches of one rank, {args.samples} synthetic samples\n")
    print(f"{'recipe':<16}{'policy':<44}{'shapes':>8}{'tokens padded/real':>20}{'patches padded/real':>21}")
    for recipe, (_, _, max_pixels, max_length) in RECIPES.items():
        settings = VisionSettings.for_family("qwen2.5vl", max_pixels=max_pixels)
        data = synthetic_dataset(args.samples, settings, max_length, args.seed)
        for policy, group, label in (("off", False, "--length_buckets off (multiples of 64 / 256)"),
                                     ("auto", False, "--length_buckets auto (default)"),
                                     ("auto", True, "auto + --group_by_modality_length")):  # fmt: skip
            count, tokens, patches = count_shapes(*data, recipe, args.steps, args.accumulation, args.seed, policy,
                                                  group)  # fmt: skip
            print(f"{recipe:<16}{label:<44}{count:>8}{tokens:>20.2f}{patches:>21.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
