"""Video frame sampling (decord) and preprocessing in numpy, by family.

- Qwen2/2.5 (upstream v2.5 rule): one frame every `base_interval` seconds, clamped to
  [video_min_frames, video_max_frames], indices `unique(linspace(0, n-1, k))` truncated; every frame
  resized alone within [video_min_frame_pixels, video_max_frame_pixels]; `second_per_grid_t` =
  temporal_patch_size / effective sampling fps.
- Qwen3 (HF `Qwen3VLVideoProcessor` rule): `video_fps` frames per second, clamped, indices rounded;
  the pixel bounds apply to the whole clip; each temporal group gets a timestamp (mean time of its
  frames) that the chat template writes as text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenvl.data.image_processing import VisionSettings, normalize, patchify, resize_rgb, smart_resize


@dataclass
class VideoMeta:
    """What sampling needs, read without decoding frames."""

    total_frames: int
    fps: float
    height: int
    width: int


@dataclass
class VideoClip:
    """Sampled frames (T, H, W, 3) uint8 with their source indices."""

    frames: np.ndarray
    indices: np.ndarray
    meta: VideoMeta


@dataclass
class ProcessedVideo:
    pixel_values: np.ndarray
    grid_thw: np.ndarray
    second_per_grid_t: float
    timestamps: tuple[float, ...]


def _open(path: str | Path):
    """A decord reader; any failure becomes a ValueError naming the file (decord raises its own types)."""
    import decord

    if not Path(path).is_file():
        raise ValueError(f"video file not found: {path}")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord.DECORDError and RuntimeError, depending on the failure
        raise ValueError(f"cannot open video {path}: {exc}") from exc


def _meta(reader, path: str | Path) -> VideoMeta:
    """Frame count, fps and size; a first frame that does not decode is a ValueError naming the file."""
    try:
        height, width = reader[0].shape[:2]
        return VideoMeta(total_frames=len(reader), fps=float(reader.get_avg_fps()), height=height, width=width)
    except Exception as exc:  # decord raises its own error types on truncated or corrupt files
        raise ValueError(f"cannot decode the first frame of video {path}: {exc}") from exc


def read_video_meta(path: str | Path) -> VideoMeta:
    """Frame count, fps and frame size (decodes at most one frame)."""
    return _meta(_open(path), path)


def sample_frames_qwen25(meta: VideoMeta, settings: VisionSettings) -> np.ndarray:
    """Upstream v2.5: round(duration / base_interval) frames, clamped, `linspace(..., dtype=int)` (floor)."""
    duration = meta.total_frames / meta.fps
    wanted = round(duration / settings.base_interval)
    count = min(max(wanted, settings.video_min_frames), settings.video_max_frames)
    return np.unique(np.linspace(0, meta.total_frames - 1, count, dtype=int))


def sample_frames_qwen3(meta: VideoMeta, settings: VisionSettings) -> np.ndarray:
    """HF Qwen3-VL: int(duration * video_fps) frames, clamped and at most total, indices rounded."""
    count = int(meta.total_frames / meta.fps * settings.video_fps)
    count = min(min(max(count, settings.video_min_frames), settings.video_max_frames), meta.total_frames)
    return np.linspace(0, meta.total_frames - 1, count).round().astype(int)


def sample_frames(meta: VideoMeta, settings: VisionSettings) -> np.ndarray:
    if settings.family == "qwen3vl":
        return sample_frames_qwen3(meta, settings)
    return sample_frames_qwen25(meta, settings)


def read_video(path: str | Path, settings: VisionSettings) -> VideoClip:
    """Decode only the sampled frames."""
    reader = _open(path)
    meta = _meta(reader, path)
    indices = sample_frames(meta, settings)
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as exc:  # a truncated file fails here, not at open
        raise ValueError(f"cannot decode frames {indices.tolist()} of video {path}: {exc}") from exc
    return VideoClip(frames=frames, indices=indices, meta=meta)


def frame_size(n_frames: int, height: int, width: int, settings: VisionSettings) -> tuple[int, int]:
    """Resized (height, width) of every frame: per-frame bounds for Qwen2/2.5, per-clip for Qwen3."""
    if settings.family == "qwen3vl":
        return smart_resize(
            height,
            width,
            settings.factor,
            settings.video_min_pixels,
            settings.video_max_pixels,
            frames=n_frames,
            temporal_factor=settings.temporal_patch_size,
        )
    return smart_resize(height, width, settings.factor, settings.video_min_frame_pixels, settings.video_max_frame_pixels)


def group_timestamps(indices: np.ndarray, fps: float, temporal_patch_size: int) -> tuple[float, ...]:
    """Mean time in seconds of the frames of each temporal group (last index repeated to fill a group)."""
    idx = list(int(i) for i in indices)
    if len(idx) % temporal_patch_size:
        idx += [idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size)
    groups = np.asarray(idx, dtype=np.float64).reshape(-1, temporal_patch_size)
    return tuple(float(t) for t in groups.mean(axis=1) / fps)


def second_per_grid(indices: np.ndarray, meta: VideoMeta, settings: VisionSettings) -> float:
    """Seconds one temporal patch spans: from the effective sampling fps (2/2.5), the configured fps (3)."""
    if settings.family == "qwen3vl":
        return settings.temporal_patch_size / settings.video_fps
    effective_fps = len(indices) / (meta.total_frames / meta.fps)
    return settings.temporal_patch_size / effective_fps


def video_grid(meta: VideoMeta, settings: VisionSettings) -> np.ndarray:
    """The (t, h, w) grid a video gets, from metadata only (token counting)."""
    n_frames = len(sample_frames(meta, settings))
    height, width = frame_size(n_frames, meta.height, meta.width, settings)
    tp = settings.temporal_patch_size
    return np.array([-(-n_frames // tp), height // settings.patch_size, width // settings.patch_size], dtype=np.int64)


def preprocess_video(clip: VideoClip, settings: VisionSettings) -> ProcessedVideo:
    """Sampled frames -> patches, grid, seconds per temporal patch and per-group timestamps."""
    height, width = frame_size(len(clip.frames), clip.meta.height, clip.meta.width, settings)
    resized = np.stack([resize_rgb(frame, height, width) for frame in clip.frames])
    pixels, grid = patchify(normalize(resized, settings), settings)
    return ProcessedVideo(
        pixel_values=pixels,
        grid_thw=grid,
        second_per_grid_t=second_per_grid(clip.indices, clip.meta, settings),
        timestamps=group_timestamps(clip.indices, clip.meta.fps, settings.temporal_patch_size),
    )
