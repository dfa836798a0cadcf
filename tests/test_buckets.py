"""Shape buckets (qwenvl.data.buckets), their use by the collators, and length-grouped order (grouping)."""

from __future__ import annotations

import numpy as np
import pytest

from qwenvl.constants import IGNORE_INDEX
from qwenvl.data.buckets import ShapeBuckets, default_ladder
from qwenvl.data.collators import collate_flattened, collate_padded
from qwenvl.data.dataset import EncodedSample
from qwenvl.data.grouping import MEGA, grouped_order
from qwenvl.train.data_loader import epoch_plan


def sample(n: int, patches: int = 0) -> EncodedSample:
    pixels = np.ones((patches, 6), np.float32) if patches else None
    grid = np.array([[1, 2, patches // 2]], np.int64) if patches else None
    ids = np.arange(1, n + 1)
    return EncodedSample(input_ids=ids, labels=ids.copy(), position_ids=np.zeros((3, n), np.int64), seq_lens=[n],
                         pixel_values=pixels, image_grid_thw=grid)  # fmt: skip


def test_default_ladder_halves_down_from_the_largest_micro_batch():
    assert default_ladder(4 * 8192) == (1024, 2048, 4096, 8192, 16384, 32768)
    assert default_ladder(100) == (64, 128)  # multiples of 64, no repeats
    assert ShapeBuckets.from_flag("auto", 2, 512).tokens == (64, 128, 256, 512, 1024)


def test_tokens_pad_to_the_next_bucket_and_past_the_top_to_its_multiples():
    buckets = ShapeBuckets((1024, 2048))
    assert [buckets.token_count(n) for n in (1, 1024, 1025, 2048, 5000)] == [1024, 1024, 2048, 2048, 6144]
    assert buckets.row_length(3, 300) == 344  # 900 tokens -> 1024 -> 342 per row -> multiple of 8
    assert ShapeBuckets(None).token_count(65) == 128


def test_patches_are_none_the_tokens_or_four_times_the_tokens():
    buckets = ShapeBuckets((1024,))
    assert [buckets.patch_count(n, 1024) for n in (0, 1, 1024, 1025, 4096, 5000)] == [0, 1024, 1024, 4096, 4096, 8192]
    assert ShapeBuckets(None).patch_count(300, 64) == 512
    assert ShapeBuckets((1024, 2048)).graphs() == 6 and ShapeBuckets(None).graphs() is None


@pytest.mark.parametrize("flag", ["", "0,64", "a,b", "-5"])
def test_bad_bucket_flags_are_refused(flag):
    with pytest.raises(ValueError, match="--length_buckets"):
        ShapeBuckets.from_flag(flag or ",", 1, 8)


def test_explicit_ladder_is_sorted_and_deduplicated():
    assert ShapeBuckets.from_flag("4096, 1024,1024", 4, 8192).tokens == (1024, 4096)
    assert ShapeBuckets.from_flag("OFF", 4, 8192).tokens is None


def test_padded_layout_pads_rows_and_length_and_names_the_patch_bucket():
    batch = collate_padded([sample(5, patches=8), sample(3)], pad_token_id=0, buckets=ShapeBuckets((16, 64)), rows=4)
    assert batch["input_ids"].shape == (4, 16)  # 4 rows x 5 -> 20 tokens -> bucket 64 -> 16 per row
    assert not batch["attention_mask"][2:].any() and (batch["labels"][2:] == IGNORE_INDEX).all()
    assert batch["vision_patches"] == 64  # 8 patches <= 64 tokens
    assert "vision_patches" not in collate_padded([sample(5)], pad_token_id=0)


def test_flattened_layout_pads_to_the_bucket_with_one_padding_segment():
    batch = collate_flattened([sample(5, patches=40), sample(3)], pad_token_id=0, buckets=ShapeBuckets((16, 64)))
    assert batch["input_ids"].shape == (1, 16)
    np.testing.assert_array_equal(batch["cu_seqlens"], [0, 5, 8, 16])
    assert batch["vision_patches"] == 64  # 40 patches > 16 tokens -> 4 x 16


def test_the_frame_bound_travels_with_vision_batches_only():
    buckets = ShapeBuckets.from_flag("auto", 2, 64, frame_patches=2304)
    assert collate_padded([sample(5, patches=8)], 0, buckets, 2)["vision_frame_patches"] == 2304
    assert collate_flattened([sample(5, patches=8)], 0, buckets)["vision_frame_patches"] == 2304
    assert "vision_frame_patches" not in collate_padded([sample(5)], 0, buckets, 2)
    assert "vision_frame_patches" not in collate_padded([sample(5, patches=8)], 0, ShapeBuckets((64,)), 2)


def _lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(10, 5000, n), rng.random(n) < 0.6


def test_grouped_order_is_a_seeded_permutation_of_one_modality_groups():
    lengths, vision = _lengths(103)
    order = grouped_order(lengths, vision, 4, seed=1, epoch=0)
    assert sorted(order.tolist()) == list(range(103))
    assert order.tolist() == grouped_order(lengths, vision, 4, seed=1, epoch=0).tolist()
    assert order.tolist() != grouped_order(lengths, vision, 4, seed=1, epoch=1).tolist()
    whole = (int(vision.sum()) // 4 + int((~vision).sum()) // 4) * 4  # full groups come first, leftovers last
    for start in range(0, whole, 4):
        assert len(set(vision[order[start : start + 4]].tolist())) == 1


def test_groups_of_one_mega_batch_hold_neighbouring_lengths():
    """With fewer than MEGA groups per modality the groups partition the sorted lengths: their ranges never overlap."""
    lengths, vision = _lengths(4 * MEGA - 8)
    order = grouped_order(lengths, vision, 4, seed=3, epoch=0)
    for modality in (True, False):
        groups = [order[s : s + 4] for s in range(0, len(order) - 3, 4) if vision[order[s]] == modality
                  and len(set(vision[order[s : s + 4]].tolist())) == 1]  # fmt: skip
        ranges = sorted((int(lengths[g].min()), int(lengths[g].max())) for g in groups)
        assert all(high <= low for (_, high), (low, _) in zip(ranges, ranges[1:]))


def test_grouped_epoch_plans_give_each_rank_one_modality_per_micro_batch():
    lengths, vision = _lengths(64, seed=5)
    plans = [epoch_plan(64, rank, 2, 7, 0, 4, 1, sizes=(lengths, vision.astype(int) * 100)) for rank in range(2)]
    seen = sorted(int(i) for plan in plans for step in plan for micro in step for i in micro)
    assert seen == list(range(64))
    for plan in plans:
        for step in plan[:-1]:
            for micro in step:
                assert len(set(vision[micro].tolist())) == 1
