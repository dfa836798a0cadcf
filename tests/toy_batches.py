"""Collated toy-model batches: samples with one image and a chosen number of supervised tokens."""

from __future__ import annotations

import numpy as np

from qwenvl.constants import IGNORE_INDEX
from tests.toy_model import ToyConfig

CFG = ToyConfig(num_layers=1, vision_depth=1)  # the smallest graph keeps compile time down
PATCHES = np.array([[1, 2, 2]])  # one image of 4 patches -> 1 merged token


def make_sample(rng: np.random.Generator, length: int, supervised: int) -> dict[str, np.ndarray]:
    """A text sample with one image token at position 1 and its last `supervised` labels kept."""
    ids = rng.integers(5, CFG.vocab_size, length)
    ids[1] = CFG.image_token_id
    labels = np.full(length, IGNORE_INDEX)
    labels[length - supervised :] = ids[length - supervised :]
    pixels = rng.normal(0, 1, (int(PATCHES.prod()), CFG.patch_dim)).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def collate(samples: list[dict[str, np.ndarray]], length: int = 12) -> dict[str, np.ndarray]:
    """Right-padded batch with an attention mask; images concatenated in sample order.

    One padded length for every batch keeps the compiled step to one shape per batch size.
    """
    ids = np.zeros((len(samples), length), np.int64)
    labels = np.full((len(samples), length), IGNORE_INDEX, np.int64)
    mask = np.zeros((len(samples), length), bool)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], True
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": np.concatenate([s["pixel_values"] for s in samples]),
        "image_grid_thw": np.repeat(PATCHES, len(samples), 0),
    }


def samples(seed: int = 0, shapes: tuple[tuple[int, int], ...] = ((9, 2), (6, 5), (12, 8))) -> list[dict[str, np.ndarray]]:
    """Samples of (length, supervised tokens) given by `shapes`."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, length, sup) for length, sup in shapes]
