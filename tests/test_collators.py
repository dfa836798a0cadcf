"""Collators: padded, flattened and packed layouts against hand-written expected arrays."""

from __future__ import annotations

import numpy as np

from qwenvl.data.buckets import ShapeBuckets
from qwenvl.data.collators import collate_flattened, collate_padded
from qwenvl.data.dataset import EncodedSample

X = -100


def sample(ids, labels, positions=None, seq_lens=None, pixels=None, grid=None):
    ids = np.array(ids, dtype=np.int64)
    positions = np.tile(np.arange(len(ids)), (3, 1)) if positions is None else np.array(positions)
    return EncodedSample(
        input_ids=ids,
        labels=np.array(labels, dtype=np.int64),
        position_ids=positions,
        seq_lens=seq_lens or [len(ids)],
        pixel_values=pixels,
        image_grid_thw=grid,
    )


def test_padded_layout():
    a = sample([5, 6, 7], [X, 6, 7], positions=[[0, 1, 2], [0, 1, 3], [0, 2, 2]])
    b = sample([8, 9], [X, 9], pixels=np.ones((4, 2), np.float32), grid=np.array([[1, 2, 2]]))
    batch = collate_padded([a, b], pad_token_id=0)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7], [8, 9, 0]])
    np.testing.assert_array_equal(batch["labels"], [[X, 6, 7], [X, 9, X]])
    np.testing.assert_array_equal(batch["attention_mask"], [[True, True, True], [True, True, False]])
    np.testing.assert_array_equal(
        batch["position_ids"], [[[0, 1, 2], [0, 1, 1]], [[0, 1, 3], [0, 1, 1]], [[0, 2, 2], [0, 1, 1]]]
    )
    assert batch["pixel_values"].shape == (4, 2)
    np.testing.assert_array_equal(batch["image_grid_thw"], [[1, 2, 2]])
    assert batch["pixel_values_videos"] is None and batch["video_grid_thw"] is None


def test_padded_rounds_length_up():
    batch = collate_padded([sample([1, 2, 3, 4, 5], [X] * 5)], pad_token_id=9, buckets=ShapeBuckets((4, 8)))
    np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, 4, 5, 9, 9, 9]])
    np.testing.assert_array_equal(batch["position_ids"][0, 0], [0, 1, 2, 3, 4, 1, 1, 1])


def test_flattened_layout_and_cu_seqlens():
    a = sample([5, 6, 7], [X, 6, 7])
    b = sample([8, 9], [X, 9])
    batch = collate_flattened([a, b], pad_token_id=0)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(batch["labels"], [[X, 6, 7, X, 9]])
    np.testing.assert_array_equal(batch["position_ids"], np.tile([0, 1, 2, 0, 1], (3, 1, 1)))
    assert batch["cu_seqlens"].dtype == np.int32
    np.testing.assert_array_equal(batch["cu_seqlens"], [0, 3, 5])
    assert "attention_mask" not in batch


def test_packed_items_keep_every_sub_sample_segment_and_pad_segment():
    packed = sample([1, 2, 3, 4, 5], [X, 2, X, 4, 5], positions=np.tile([0, 1, 0, 1, 2], (3, 1)), seq_lens=[2, 3])
    single = sample([6, 7, 8, 9], [X, 7, 8, 9])
    batch = collate_flattened([packed, single], pad_token_id=0, buckets=ShapeBuckets((4, 12)))
    np.testing.assert_array_equal(batch["cu_seqlens"], [0, 2, 5, 9, 12])
    np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]])
    np.testing.assert_array_equal(batch["labels"][0, 9:], [X, X, X])
    np.testing.assert_array_equal(batch["position_ids"][1, 0], [0, 1, 0, 1, 2, 0, 1, 2, 3, 1, 1, 1])
