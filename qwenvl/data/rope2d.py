"""3-D mRoPE position ids (temporal, height, width) computed in numpy inside the data pipeline.

Same results as the models' own `get_rope_index` in `transformers` 4.57 (Qwen2-VL, Qwen2.5-VL, Qwen3-VL),
so the model can take `position_ids` as given. All three share one walk over the row; they differ only
in the temporal index of a vision block:

- Qwen2-VL: `t` (the temporal grid index);
- Qwen2.5-VL: `int(t * second_per_grid_t * tokens_per_second)`, 0 seconds for images;
- Qwen3-VL: each video temporal group is its own `(1, h, w)` block (timestamps text in between), so 0.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

TOKENS_PER_SECOND = 2

RopeIndexFn = Callable[..., tuple[np.ndarray, np.ndarray]]


def _text_only(input_ids: np.ndarray, attention_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    batch, length = input_ids.shape
    if attention_mask is None:
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (3, batch, length)).copy()
        return positions, np.zeros((batch, 1), dtype=np.int64)
    mask = attention_mask.astype(bool)
    row = np.where(mask, np.cumsum(mask, axis=-1) - 1, 1).astype(np.int64)
    deltas = row.max(axis=-1, keepdims=True) + 1 - length
    return np.broadcast_to(row, (3, batch, length)).copy(), deltas


def _vision_block(grid: np.ndarray, merge: int, seconds: float | None) -> np.ndarray:
    """(3, t*h*w) offsets of one block in (t, h, w) row-major order; `seconds` selects the Qwen2.5 rule."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    if seconds is None:
        t_index = np.arange(t, dtype=np.int64)
    else:
        scaled = np.arange(t, dtype=np.float32) * np.float32(seconds) * np.float32(TOKENS_PER_SECOND)
        t_index = scaled.astype(np.int64)
    tt = np.repeat(t_index, h * w)
    hh = np.tile(np.repeat(np.arange(h, dtype=np.int64), w), t)
    ww = np.tile(np.arange(w, dtype=np.int64), t * h)
    return np.stack([tt, hh, ww])


def _row_positions(
    tokens: np.ndarray,
    images: list[np.ndarray],
    videos: list[np.ndarray],
    merge: int,
    video_seconds: list[float] | None,
    ids: tuple[int, int, int],
) -> np.ndarray:
    """Positions of one unpadded row; consumes grids from `images`/`videos` in order of appearance."""
    image_id, video_id, start_id = ids
    starts = np.flatnonzero(tokens[:-1] == start_id) + 1
    n_images = int(np.sum(tokens[starts] == image_id))
    n_videos = int(np.sum(tokens[starts] == video_id))
    image_at = np.flatnonzero(tokens == image_id)
    video_at = np.flatnonzero(tokens == video_id)
    pieces: list[np.ndarray] = []
    next_pos, st = 0, 0
    for _ in range(n_images + n_videos):
        ed_image = _first_at_or_after(image_at, st) if n_images else len(tokens) + 1
        ed_video = _first_at_or_after(video_at, st) if n_videos else len(tokens) + 1
        if ed_image < ed_video:
            grid, seconds, ed = images.pop(0), (0.0 if video_seconds is not None else None), ed_image
            n_images -= 1
        else:
            grid, ed = videos.pop(0), ed_video
            seconds = video_seconds.pop(0) if video_seconds is not None else None
            n_videos -= 1
        text = ed - st
        pieces.append(np.broadcast_to(np.arange(text, dtype=np.int64) + next_pos, (3, text)))
        block = _vision_block(grid, merge, seconds) + text + next_pos
        pieces.append(block)
        next_pos = int(block.max()) + 1
        st = ed + block.shape[1]
    if st < len(tokens):
        text = len(tokens) - st
        pieces.append(np.broadcast_to(np.arange(text, dtype=np.int64) + next_pos, (3, text)))
    return np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)


def _first_at_or_after(positions: np.ndarray, st: int) -> int:
    i = int(np.searchsorted(positions, st))
    return int(positions[i]) if i < len(positions) else 1 << 62


def _rope_index(
    spatial_merge_size: int,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    second_per_grid_ts: np.ndarray | None,
    attention_mask: np.ndarray | None,
    ids: tuple[int, int, int],
    temporal_seconds: bool,
) -> tuple[np.ndarray, np.ndarray]:
    input_ids = np.asarray(input_ids)
    if image_grid_thw is None and video_grid_thw is None:
        return _text_only(input_ids, attention_mask)
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    images = [np.asarray(g) for g in image_grid_thw] if image_grid_thw is not None else []
    videos = [np.asarray(g) for g in video_grid_thw] if video_grid_thw is not None else []
    seconds: list[float] | None = None
    if temporal_seconds:
        seconds = (
            [float(s) for s in np.asarray(second_per_grid_ts, dtype=np.float32)]
            if second_per_grid_ts is not None
            else [1.0] * len(videos)
        )
    positions = np.ones((3, batch, length), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    for b in range(batch):
        row = _row_positions(input_ids[b][mask[b]], images, videos, spatial_merge_size, seconds, ids)
        positions[:, b, mask[b]] = row
        deltas[b, 0] = (int(row.max()) + 1 if row.size else 0) - length
    return positions, deltas


def get_rope_index_2(
    spatial_merge_size: int,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2-VL: `(position_ids (3, B, L), mrope_deltas (B, 1))`."""
    ids = (image_token_id, video_token_id, vision_start_token_id)
    return _rope_index(spatial_merge_size, input_ids, image_grid_thw, video_grid_thw, None, attention_mask, ids, False)


def get_rope_index_25(
    spatial_merge_size: int,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL: temporal positions follow real time (`second_per_grid_ts`, one entry per video)."""
    ids = (image_token_id, video_token_id, vision_start_token_id)
    return _rope_index(
        spatial_merge_size, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask, ids, True
    )


def get_rope_index_3(
    spatial_merge_size: int,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL: each video temporal group is a separate `(1, h, w)` block."""
    if video_grid_thw is not None:
        grids = np.asarray(video_grid_thw)
        video_grid_thw = np.repeat(grids, grids[:, 0], axis=0)
        video_grid_thw[:, 0] = 1
    ids = (image_token_id, video_token_id, vision_start_token_id)
    return _rope_index(spatial_merge_size, input_ids, image_grid_thw, video_grid_thw, None, attention_mask, ids, False)


ROPE_INDEX = {"qwen2vl": get_rope_index_2, "qwen2.5vl": get_rope_index_25, "qwen3vl": get_rope_index_3}


def rope_index_fn(family: str) -> RopeIndexFn:
    """The position function of a model family ("qwen2vl", "qwen2.5vl", "qwen3vl")."""
    if family not in ROPE_INDEX:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(ROPE_INDEX)}")
    return ROPE_INDEX[family]
