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

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenvl.data.errors import SampleError
from qwenvl.data.image_processing import VisionSettings, normalize, patchify, resize_rgb, smart_resize

_DECORD_LOCATION = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")  # "[09:49:08] src/x.cc:292: " in decord messages


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


def _decoder_message(exc: Exception) -> str:
    """The first line of a decord error without its source location, or the error type when it is empty."""
    lines = _DECORD_LOCATION.sub("", str(exc)).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _undecodable(path: str | Path, exc: Exception) -> SampleError:
    """One wording whichever frame fails: decord's decoding thread meets a broken packet at a varying point."""
    return SampleError(f"cannot decode video {path}: {_decoder_message(exc)}", kind="corrupt_media")


def _open(path: str | Path):
    """A decord reader; any failure becomes a SampleError naming the file (decord raises its own types)."""
    import decord

    if not Path(path).is_file():
        raise SampleError(f"video not found: {path}", kind="missing_media")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord.DECORDError and RuntimeError, depending on the failure
        raise SampleError(f"cannot open video {path}: {_decoder_message(exc)}", kind="corrupt_media") from exc


def _meta(reader, path: str | Path) -> VideoMeta:
    """Frame count, fps and size; no frame, or a first frame that does not decode, is a SampleError."""
    if len(reader) == 0:
        raise SampleError(f"video {path} has no frames", kind="corrupt_media")
    try:
        height, width = reader[0].shape[:2]
        fps = float(reader.get_avg_fps())
    except Exception as exc:  # decord raises its own error types on truncated or corrupt files
        raise _undecodable(path, exc) from exc
    if not fps > 0:
        raise SampleError(f"video {path} has no valid frame rate ({fps})", kind="corrupt_media")
    return VideoMeta(total_frames=len(reader), fps=fps, height=height, width=width)


def _within_limit(meta: VideoMeta, path: str | Path, decode_max_pixels: int | None) -> VideoMeta:
    if decode_max_pixels is not None and meta.height * meta.width > decode_max_pixels:
        raise SampleError(
            f"video {path} has {meta.width}x{meta.height} frames, over the decoding limit of {decode_max_pixels} "
            "pixels: downscale the file, or raise --decode_max_pixels",
            kind="too_large",
        )
    return meta


def read_video_meta(path: str | Path, decode_max_pixels: int | None = None) -> VideoMeta:
    """Frame count, fps and frame size (decodes at most one frame); frames over the decoding limit are refused."""
    return _within_limit(_meta(_open(path), path), path, decode_max_pixels)


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
    meta = _within_limit(_meta(reader, path), path, settings.decode_max_pixels)
    indices = sample_frames(meta, settings)
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as exc:  # a truncated file fails here or at the first frame, depending on decord's threads
        raise _undecodable(path, exc) from exc
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
