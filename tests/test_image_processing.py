"""Image preprocessing against hand-worked sizes and Hugging Face's Qwen2VLImageProcessor (numpy path)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qwenvl.data.errors import SampleError
from qwenvl.data.image_processing import (
    VisionSettings,
    image_grid,
    image_size,
    load_image,
    preprocess_image,
    preprocess_images,
    smart_resize,
)
from tests.bad_media import mode_images, write_bilevel_png, write_truncated_jpeg

transformers = pytest.importorskip("transformers")
from transformers import Qwen2VLImageProcessor  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402

REAL_IMAGES = ("10095.png", "10149.png", "COCO_train2014_000000580957.jpg")


@pytest.mark.parametrize(
    ("factor", "min_pixels", "max_pixels", "expected"),
    [
        (28, 16 * 28 * 28, 576 * 28 * 28, (588, 728)),  # training defaults: grid (1, 42, 52), 546 tokens
        (28, 784, 50176, (196, 224)),  # the upstream scripts' limits
        (32, 784, 50176, (192, 224)),  # Qwen3 factor with the same limits
    ],
)
def test_smart_resize_worked_examples(factor, min_pixels, max_pixels, expected):
    assert smart_resize(800, 1000, factor, min_pixels, max_pixels) == expected


def test_smart_resize_upscales_small_and_rejects_extreme_aspect():
    # 10x10 -> beta = sqrt(12544/100) = 11.2; ceil(112/28)*28 = 112
    assert smart_resize(10, 10, 28, 12544, 451584) == (112, 112)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010, 28, 12544, 451584)


def test_smart_resize_matches_hf_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(x) for x in rng.integers(20, 3000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        factor = int(rng.choice([28, 32]))
        low = int(rng.integers(1, 64)) * factor * factor
        high = low + int(rng.integers(0, 2000)) * factor * factor
        assert smart_resize(h, w, factor, low, high) == hf_smart_resize(h, w, factor, low, high)


def test_clip_bounds_apply_to_all_frames():
    # 8 frames 480x640, Qwen3 factor 32, 802816 px per clip: beta = sqrt(8*480*640/802816)
    assert smart_resize(480, 640, 32, 0, 802816, frames=8, temporal_factor=2) == (256, 352)


def _hf_processor(settings: VisionSettings) -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor(
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
        patch_size=settings.patch_size,
        merge_size=settings.merge_size,
        temporal_patch_size=settings.temporal_patch_size,
        image_mean=list(settings.image_mean),
        image_std=list(settings.image_std),
    )


def _assert_same_as_hf(image: Image.Image, settings: VisionSettings) -> None:
    pixels, grid = preprocess_image(image, settings)
    expected = _hf_processor(settings)(images=[image], return_tensors="np")
    assert pixels.shape == expected["pixel_values"].shape
    assert grid.tolist() == expected["image_grid_thw"][0].tolist()
    np.testing.assert_allclose(pixels, expected["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2.5vl", "qwen3vl"])
def test_real_images_equal_hf_processor(media_dir, family):
    settings = VisionSettings.for_family(family)
    for name in REAL_IMAGES:
        _assert_same_as_hf(load_image(media_dir / name), settings)


@pytest.mark.parametrize("family", ["qwen2vl", "qwen3vl"])
def test_random_images_and_limits_equal_hf_processor(family):
    rng = np.random.default_rng(1)
    for _ in range(6):
        h, w = (int(x) for x in rng.integers(30, 700, size=2))
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        factor = 32 if family == "qwen3vl" else 28
        low = int(rng.integers(4, 20)) * factor * factor
        settings = VisionSettings.for_family(family, min_pixels=low, max_pixels=low + 200 * factor * factor)
        _assert_same_as_hf(image, settings)


def test_patch_layout_by_hand():
    """A 56x56 image (grid 1x4x4, merge 2): patch k holds the pixels of its merge-window position."""
    settings = VisionSettings.for_family("qwen2vl", min_pixels=56 * 56, max_pixels=56 * 56)
    # each 14x14 patch filled with a distinct grey level: value = 10 * row + col of the patch
    frame = np.zeros((56, 56, 3), dtype=np.uint8)
    for r in range(4):
        for c in range(4):
            frame[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = 10 * r + c
    pixels, grid = preprocess_image(Image.fromarray(frame), settings)
    assert grid.tolist() == [1, 4, 4]
    assert pixels.shape == (16, 3 * 2 * 14 * 14)
    # merge windows in row-major order, patches row-major inside a window
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3),
             (2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (2, 3), (3, 2), (3, 3)]  # fmt: skip
    red = (np.array([10 * r + c for r, c in order]) / 255 - settings.image_mean[0]) / settings.image_std[0]
    np.testing.assert_allclose(pixels[:, 0], red, atol=1e-5)  # first value: red channel, frame 0
    np.testing.assert_allclose(pixels[:, 14 * 14 * 2 - 1], red, atol=1e-5)  # last red value: frame 1 (copy)


def test_header_only_size_and_grid_match_decoding(media_dir):
    settings = VisionSettings.for_family("qwen2.5vl")
    path = media_dir / "COCO_train2014_000000580957.jpg"
    height, width = image_size(path)
    _, grid = preprocess_image(load_image(path), settings)
    assert image_grid(height, width, settings).tolist() == grid.tolist()


def test_several_images_concatenate_in_order():
    rng = np.random.default_rng(2)
    settings = VisionSettings.for_family("qwen2.5vl")
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((60, 90), (120, 40))]
    pixels, grids = preprocess_images(images, settings)
    parts = [preprocess_image(image, settings)[0] for image in images]
    assert [g.tolist() for g in grids] == [preprocess_image(i, settings)[1].tolist() for i in images]
    np.testing.assert_array_equal(pixels, np.concatenate(parts))


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(ValueError, match="missing.png"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("mode", list(mode_images()))
def test_every_pil_mode_converts_to_hand_computed_rgb(mode, tmp_path):
    """16-bit grey is scaled (PIL alone clips it to 99.6% white), CMYK uses PIL's multiplicative rule, and
    alpha / palette transparency is dropped as HF's `convert_to_rgb` drops it (no compositing)."""
    image, suffix, expected = mode_images()[mode]
    path = tmp_path / f"image{suffix}"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == image.mode  # the file really holds this mode
    np.testing.assert_array_equal(np.asarray(load_image(path)), expected)
    assert image_size(path) == (1, 2)


@pytest.mark.parametrize("mode", ["F", "LAB"])
def test_modes_without_an_rgb_meaning_are_refused_by_name(mode, tmp_path):
    path = tmp_path / "odd.tif"
    Image.new(mode, (4, 4)).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    for read in (load_image, image_size):
        with pytest.raises(SampleError, match=f"pixel mode {mode}") as info:
            read(path)
        assert info.value.kind == "unsupported_media" and "odd.tif" in str(info.value)


@pytest.mark.parametrize(("side", "refused"), [(9000, False), (11000, True), (20000, True)])
def test_decoding_limit_is_checked_from_the_header(side, refused, tmp_path):
    """9000^2 is under DECODE_MAX_PIXELS; 11000^2 is over it (PIL itself only warns); 20000^2 is a bomb PIL
    refuses with its own DecompressionBombError. Both refusals are the same SampleError, decoding nothing."""
    path = write_bilevel_png(tmp_path / f"side{side}.png", side, side)
    if not refused:
        assert image_size(path) == (side, side)
        return
    for read in (image_size, load_image):
        with pytest.raises(SampleError, match="over the decoding limit of 89478485 pixels") as info:
            read(path)
        assert info.value.kind == "too_large" and f"side{side}.png" in info.value.reason
    with pytest.raises(SampleError, match="over the decoding limit of 1000 pixels"):
        image_size(write_bilevel_png(tmp_path / "small.png", 40, 40), decode_max_pixels=1000)


def test_truncated_and_empty_files_are_corrupt_media(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    for path in (write_truncated_jpeg(tmp_path / "cut.jpg"), tmp_path / "empty.png"):
        with pytest.raises(SampleError, match=path.name) as info:
            load_image(path)
        assert info.value.kind == "corrupt_media"
