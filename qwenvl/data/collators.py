"""Batches of encoded samples -> model inputs (numpy), in upstream's three layouts.

- padded: `(B, L)` ids padded with the pad id, labels with IGNORE_INDEX, positions `(3, B, L)` with 1,
  and a boolean attention mask.
- flattened (`data_flatten`) and packed (`data_packing`): one row `(1, sum L)`, positions restart per
  sub-sample, `cu_seqlens` int32 `[0, L1, L1+L2, ...]` over every sub-sample so attention never crosses
  a sample.

`pad_to_multiple_of` rounds the sequence length up so a compiled step sees few distinct shapes; in the
flattened layout the padding is one extra segment that no real token attends to and nothing learns from.
Truncation is per sample, in the dataset, so it can refuse to cut through a vision block.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qwenvl.constants import IGNORE_INDEX
from qwenvl.data.dataset import EncodedSample, cat_optional

POSITION_PAD = 1


def _round_up(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


def _vision_fields(samples: Sequence[EncodedSample]) -> dict[str, np.ndarray | None]:
    """Concatenate pixels and grids across the batch along dim 0; None where no sample has the modality."""

    names = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return {name: cat_optional([getattr(s, name) for s in samples]) for name in names}


def collate_padded(
    samples: Sequence[EncodedSample], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, np.ndarray | None]:
    """Right-pad to the longest sample (rounded up to `pad_to_multiple_of`)."""
    length = _round_up(max(len(s.input_ids) for s in samples), pad_to_multiple_of)
    batch = len(samples)
    input_ids = np.full((batch, length), pad_token_id, dtype=np.int64)
    labels = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.full((3, batch, length), POSITION_PAD, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=bool)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = sample.input_ids
        labels[row, :n] = sample.labels
        position_ids[:, row, :n] = sample.position_ids
        attention_mask[row, :n] = True
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        **_vision_fields(samples),
    }


def collate_flattened(
    samples: Sequence[EncodedSample], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, np.ndarray | None]:
    """Concatenate the micro-batch into one row with cu_seqlens over every (sub-)sample.

    Packed items carry several `seq_lens`; plain samples one. This one function is both upstream's
    flattened and packed collator, which were identical.
    """
    seq_lens = [n for s in samples for n in s.seq_lens]
    total = sum(seq_lens)
    length = _round_up(total, pad_to_multiple_of)
    pad = length - total
    input_ids = np.concatenate([s.input_ids for s in samples] + [np.full(pad, pad_token_id, np.int64)])
    labels = np.concatenate([s.labels for s in samples] + [np.full(pad, IGNORE_INDEX, np.int64)])
    position_ids = np.concatenate(
        [s.position_ids for s in samples] + [np.full((3, pad), POSITION_PAD, np.int64)], axis=1
    )
    if pad:
        seq_lens.append(pad)
    cu_seqlens = np.concatenate([[0], np.cumsum(seq_lens)]).astype(np.int32)
    return {
        "input_ids": input_ids[None, :],
        "labels": labels[None, :],
        "position_ids": position_ids[:, None, :],
        "cu_seqlens": cu_seqlens,
        **_vision_fields(samples),
    }
