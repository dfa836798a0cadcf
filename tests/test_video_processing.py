"""Video frame sampling, resizing, timestamps and patches, against hand-worked numbers and HF's processor."""

from __future__ import annotations

import numpy as np
import pytest

from qwenvl.data.image_processing import VisionSettings, image_grid
from qwenvl.data.video_processing import (
    VideoClip,
    VideoMeta,
    group_timestamps,
    preprocess_video,
    read_video,
    read_video_meta,
    sample_frames_qwen3,
    sample_frames_qwen25,
    video_grid,
)

QWEN25 = VisionSettings.for_family("qwen2.5vl")
QWEN3 = VisionSettings.for_family("qwen3vl")


def test_qwen25_ten_second_video_worked_example():
    """10 s at 30 fps, base_interval 2 -> 5 frames at floor(linspace); 0.5 fps -> 4 s per temporal patch."""
    meta = VideoMeta(total_frames=300, fps=30.0, height=240, width=320)
    indices = sample_frames_qwen25(meta, QWEN25)
    assert indices.tolist() == [0, 74, 149, 224, 299]
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 240, 320, 3), dtype=np.uint8)
    video = preprocess_video(VideoClip(frames, indices, meta), QWEN25)
    assert video.second_per_grid_t == pytest.approx(4.0)
    # per-frame bound 32*28*28: 240x320 -> beta = sqrt(76800/25088); floor(137.2/28)*28=112, floor(182.9/28)*28=168
    assert video.grid_thw.tolist() == [3, 8, 12]  # odd frame count padded: ceil(5/2) groups
    assert video.pixel_values.shape == (3 * 8 * 12, 3 * 2 * 14 * 14)


def test_qwen25_frame_count_is_clamped():
    short = VideoMeta(total_frames=30, fps=30.0, height=64, width=64)  # 1 s -> round(0.5)=0 -> min 4
    long = VideoMeta(total_frames=3000, fps=30.0, height=64, width=64)  # 100 s -> 50 -> max 8
    assert sample_frames_qwen25(short, QWEN25).tolist() == [0, 9, 19, 29]
    assert len(sample_frames_qwen25(long, QWEN25)) == 8


def test_qwen3_sampling_and_timestamps_worked_example():
    """434 frames at 3 fps (the real test video), 2 fps wanted -> 289 -> clamped to 8, indices rounded."""
    meta = VideoMeta(total_frames=434, fps=3.0, height=224, width=398)
    indices = sample_frames_qwen3(meta, QWEN3)
    assert indices.tolist() == [0, 62, 124, 186, 247, 309, 371, 433]
    stamps = group_timestamps(indices, 3.0, 2)
    np.testing.assert_allclose(stamps, [31 / 3, 155 / 3, 278 / 3, 402 / 3])
    # odd count: the last index is repeated to fill the last group
    np.testing.assert_allclose(group_timestamps(np.array([0, 3, 6]), 3.0, 2), [0.5, 2.0])


def test_qwen3_clip_pixel_budget():
    """16 frames, 802816 px per clip: each frame gets at most 802816/16 = 50176 px."""
    meta = VideoMeta(total_frames=160, fps=8.0, height=720, width=1280)
    settings = VisionSettings.for_family("qwen3vl", video_max_frames=16)
    grid = video_grid(meta, settings)
    t, h, w = grid.tolist()
    assert t == 8
    assert (h * 16) * (w * 16) <= 50176
    assert (h % 2, w % 2) == (0, 0)


def test_qwen25_video_pixels_equal_hf_frame_pipeline():
    """Upstream v2.5 sent sampled frames through Qwen2VLImageProcessor with the per-frame pixel bounds."""
    pytest.importorskip("transformers")
    from transformers import Qwen2VLImageProcessor
    from transformers.image_utils import ChannelDimension

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (5, 90, 150, 3), dtype=np.uint8)
    meta = VideoMeta(total_frames=5, fps=1.0, height=90, width=150)
    video = preprocess_video(VideoClip(frames, np.arange(5), meta), QWEN25)
    processor = Qwen2VLImageProcessor()
    expected, grid = processor._preprocess(
        list(frames),
        do_resize=True,
        size={"shortest_edge": QWEN25.video_min_frame_pixels, "longest_edge": QWEN25.video_max_frame_pixels},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(QWEN25.image_mean),
        image_std=list(QWEN25.image_std),
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        do_convert_rgb=False,
        data_format=ChannelDimension.FIRST,
        input_data_format=ChannelDimension.LAST,
    )
    assert video.grid_thw.tolist() == list(grid)
    assert video.pixel_values.shape == expected.shape
    np.testing.assert_allclose(video.pixel_values, expected, atol=1e-5, rtol=0)


def test_real_video_both_rules(media_dir):
    path = media_dir / "v_rBMQFpHspmo.mp4"
    meta = read_video_meta(path)
    assert (meta.total_frames, meta.fps, meta.height, meta.width) == (434, 3.0, 224, 398)
    clip = read_video(path, QWEN25)
    # 144.67 s / 2 s = 72 frames wanted, clamped to 8, floor(k * 433 / 7)
    assert clip.indices.tolist() == [0, 61, 123, 185, 247, 309, 371, 433]
    assert clip.frames.shape == (8, 224, 398, 3)
    video = preprocess_video(clip, QWEN25)
    assert video.second_per_grid_t == pytest.approx(2 * (434 / 3.0) / 8)
    assert video.grid_thw.tolist() == video_grid(meta, QWEN25).tolist()
    assert video.pixel_values.shape[0] == int(np.prod(video.grid_thw))
    video3 = preprocess_video(read_video(path, QWEN3), QWEN3)
    assert video3.grid_thw[0] == 4 and len(video3.timestamps) == 4
    assert video3.grid_thw.tolist() == video_grid(meta, QWEN3).tolist()


def test_missing_and_truncated_videos_name_the_file(media_dir, tmp_path):
    with pytest.raises(ValueError, match="nothere.mp4"):
        read_video(tmp_path / "nothere.mp4", QWEN25)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((media_dir / "v_rBMQFpHspmo.mp4").read_bytes()[:20000])
    with pytest.raises(ValueError, match="truncated.mp4"):
        read_video(truncated, QWEN25)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_video_is_a_value_error_naming_the_file(tmp_path, keep):
    """decord raises its own error types (sometimes at the first frame): they must surface as ValueError."""
    from tests.avi_writer import write_mjpeg_avi

    frames = np.random.default_rng(0).integers(0, 256, (8, 32, 48, 3), dtype=np.uint8)
    path = tmp_path / "clip.avi"
    write_mjpeg_avi(path, frames, fps=4)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    settings = VisionSettings.for_family("qwen2.5vl")
    with pytest.raises(ValueError, match="clip.avi"):
        read_video_meta(path)
        read_video(path, settings)


def test_frame_patch_bound_by_hand_and_over_random_media():
    """The most patches one frame gets: images within max_pixels, Qwen2.5 frames within video_max_frame_pixels,
    a Qwen3 clip of >= 2 frames within video_max_pixels; no image or video of ordinary size exceeds it."""
    assert QWEN25.frame_patch_bound == 576 * 28 * 28 // 14**2 == 2304
    assert VisionSettings.for_family("qwen2.5vl", video_max_frame_pixels=3000 * 28 * 28).frame_patch_bound == 12000
    assert QWEN3.frame_patch_bound == max(576 * 28 * 28, 1024 * 28 * 28 // 2) // 16**2 == 1764
    assert VisionSettings.for_family("qwen3vl", max_pixels=100 * 32 * 32).frame_patch_bound == 1568
    rng = np.random.default_rng(0)
    for settings in (QWEN25, QWEN3):
        for height, width in rng.integers(60, 4000, (200, 2)):
            _, h, w = image_grid(int(height), int(width), settings)
            assert h * w <= settings.frame_patch_bound
            meta = VideoMeta(total_frames=int(rng.integers(20, 900)), fps=30.0, height=int(height), width=int(width))
            _, h, w = video_grid(meta, settings)
            assert h * w <= settings.frame_patch_bound
