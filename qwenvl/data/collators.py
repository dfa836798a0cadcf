"""Batches of encoded samples -> model inputs (numpy), in upstream's three layouts.

- padded: `(B, L)` ids padded with the pad id, labels with IGNORE_INDEX, positions `(3, B, L)` with 1,
  and a boolean attention mask.
- flattened (`data_flatten`) and packed (`data_packing`): one row `(1, sum L)`, positions restart per
  sub-sample, `cu_seqlens` int32 `[0, L1, L1+L2, ...]` over every sub-sample so attention never crosses
  a sample.

`buckets` (`qwenvl.data.buckets`) pads the tokens, and in the padded layout the rows, of every micro-batch to
one of a few shapes, so a compiled step sees few distinct shapes; `vision_patches` then tells the model how
many patches to pad the vision input to. In the flattened layout the padding is one extra segment that no
real token attends to and nothing learns from; padded rows are all padding.
Truncation is per sample, in the dataset, so it can refuse to cut through a vision block.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qwenvl.constants import IGNORE_INDEX
from qwenvl.data.buckets import ShapeBuckets
from qwenvl.data.dataset import EncodedSample, cat_optional

POSITION_PAD = 1


def _vision_fields(samples: Sequence[EncodedSample], buckets: ShapeBuckets | None, tokens: int) -> dict:
    """Concatenate pixels and grids across the batch along dim 0; None where no sample has the modality.

    With buckets, `vision_patches` is the patch count the model pads the vision input to, and
    `vision_frame_patches` the run's bound on the patches of one frame (see `ShapeBuckets`)."""

    names = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    fields = {name: cat_optional([getattr(s, name) for s in samples]) for name in names}
    if buckets is not None:
        patches = sum(len(fields[key]) for key in ("pixel_values", "pixel_values_videos") if fields[key] is not None)
        fields["vision_patches"] = buckets.patch_count(patches, tokens)
        if patches and buckets.frame_patches:
            fields["vision_frame_patches"] = buckets.frame_patches
    return fields


def collate_padded(
    samples: Sequence[EncodedSample], pad_token_id: int, buckets: ShapeBuckets | None = None, rows: int | None = None
) -> dict[str, np.ndarray | None]:
    """Right-pad to the longest sample (to its bucket), with all-padding rows up to `rows`."""
    batch = max(len(samples), rows or 0)
    longest = max(len(s.input_ids) for s in samples)
    length = buckets.row_length(batch, longest) if buckets is not None else longest
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
        **_vision_fields(samples, buckets, batch * length),
    }


def collate_flattened(
    samples: Sequence[EncodedSample], pad_token_id: int, buckets: ShapeBuckets | None = None, rows: int | None = None
) -> dict[str, np.ndarray | None]:
    """Concatenate the micro-batch into one row with cu_seqlens over every (sub-)sample.

    Packed items carry several `seq_lens`; plain samples one. This one function is both upstream's
    flattened and packed collator, which were identical. `rows` is accepted for a common signature: the
    layout always has one row.
    """
    seq_lens = [n for s in samples for n in s.seq_lens]
    total = sum(seq_lens)
    length = buckets.token_count(total) if buckets is not None else total
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
        **_vision_fields(samples, buckets, length),
    }
