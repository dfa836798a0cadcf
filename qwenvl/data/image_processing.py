"""Image preprocessing in numpy + PIL, equal to Hugging Face's `Qwen2VLImageProcessor` (no torch).

Steps: `smart_resize` to multiples of patch*merge within the pixel bounds, bicubic resize (PIL), rescale
by 1/255 (through float64, as HF does), normalise in float32, repeat to `temporal_patch_size` frames and
cut into patches `(t*h*w, C*T*P*P)` in the merge-window order the vision tower expects. `VisionSettings`
holds every number that changes pixels or token counts, so training and tools share one source.

Decoding is guarded and explicit: a file whose header announces more than `decode_max_pixels`
(width x height, default `DECODE_MAX_PIXELS`) is refused before any pixel is decompressed, and pixel
modes are converted as HF's `convert_to_rgb` does (`image.convert("RGB")`: alpha dropped, not composited)
except 16-bit grey (`I;16*`, `I`), which PIL would clip to white and is scaled to 8 bits here; modes
with no defined RGB meaning are refused by name. Every refusal is a `SampleError` naming the file.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from qwenvl.data.errors import SampleError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
MAX_ASPECT_RATIO = 200
# PIL's own decompression-bomb threshold (it warns above it and refuses above twice it): ~9459 x 9459.
DECODE_MAX_PIXELS = 89_478_485
# PIL refuses to open anything larger whatever we allow, so --decode_max_pixels cannot go above it.
DECODE_MAX_PIXELS_CEILING = 2 * DECODE_MAX_PIXELS
# Modes that `convert("RGB")` maps to their meaning; 16-bit grey is scaled by `_sixteen_bit_to_rgb`.
RGB_CONVERTIBLE_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "1", "P", "PA", "CMYK", "YCbCr")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# PIL errors while decoding untrusted bytes: the file is bad, not the program.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class VisionSettings:
    """Patch geometry of the model plus the pixel/frame limits of the training flags."""

    family: str
    patch_size: int
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    min_pixels: int = 16 * 28 * 28
    max_pixels: int = 576 * 28 * 28
    video_min_frames: int = 4
    video_max_frames: int = 8
    video_min_frame_pixels: int = 4 * 28 * 28
    video_max_frame_pixels: int = 32 * 28 * 28
    video_min_pixels: int = 256 * 28 * 28
    video_max_pixels: int = 1024 * 28 * 28
    video_fps: float = 2.0
    base_interval: int = 2
    decode_max_pixels: int = DECODE_MAX_PIXELS

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this: 28 for Qwen2/2.5, 32 for Qwen3."""
        return self.patch_size * self.merge_size

    @property
    def frame_patch_bound(self) -> int:
        """Most patches one frame (an image, or one temporal patch of a video) gets under these limits: images
        and Qwen2/2.5 video frames are resized within their own pixel limit, a Qwen3 clip of at least
        `temporal_patch_size` frames within `video_max_pixels`. (smart_resize may round a frame of a tiny
        picture just past its minimum; a batch with such a frame says so itself.)"""
        if self.family == "qwen3vl":
            video = self.video_max_pixels // self.temporal_patch_size
        else:
            video = self.video_max_frame_pixels
        return max(self.max_pixels, video) // self.patch_size**2

    @classmethod
    def for_family(cls, family: str, **overrides) -> "VisionSettings":
        """Defaults of the published checkpoints of a family (Qwen3: patch 16, mean/std 0.5)."""
        if family == "qwen3vl":
            base = cls(family=family, patch_size=16, image_mean=HALF, image_std=HALF)
        elif family in ("qwen2vl", "qwen2.5vl"):
            base = cls(family=family, patch_size=14)
        else:
            raise ValueError(f"unknown model family {family!r}")
        return replace(base, **overrides)

    @classmethod
    def from_preprocessor_config(cls, model_dir: str | Path, family: str, **overrides) -> "VisionSettings":
        """Geometry and normalisation from `preprocessor_config.json` when present; limits from `overrides`."""
        path = Path(model_dir) / "preprocessor_config.json"
        found = {}
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            for key in ("patch_size", "merge_size", "temporal_patch_size"):
                if key in config:
                    found[key] = int(config[key])
            for key in ("image_mean", "image_std"):
                if key in config:
                    found[key] = tuple(float(x) for x in config[key])
        return cls.for_family(family, **found, **overrides)


def smart_resize(
    height: int,
    width: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    frames: int = 1,
    temporal_factor: int = 1,
) -> tuple[int, int]:
    """Nearest multiples of `factor` keeping the aspect ratio, scaled into [min_pixels, max_pixels] (HF rule).

    With `frames`/`temporal_factor` the bounds apply to the whole clip (frames rounded to the temporal
    factor) x height x width: HF's Qwen3-VL video rule. The defaults give the image rule.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise SampleError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} of a {width}x{height} image exceeds "
            f"{MAX_ASPECT_RATIO}",
            kind="unsupported_media",
        )
    t_bar = max(temporal_factor, round(frames / temporal_factor) * temporal_factor)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _too_large(path: str | Path, limit: int, size: str = "") -> SampleError:
    return SampleError(
        f"image {path}{size} is over the decoding limit of {limit} pixels (a decompression-bomb guard): "
        "downscale the file, or raise --decode_max_pixels",
        kind="too_large",
    )


def _open(path: str | Path, limit: int) -> Image.Image:
    """Open lazily (header only) and refuse a missing file, an oversized image or an unsupported mode."""
    if not Path(path).is_file():
        raise SampleError(f"cannot read image {path}: file not found", kind="missing_media")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            image = Image.open(path)
    except Image.DecompressionBombError as exc:  # beyond PIL's hard ceiling, so beyond ours too
        raise _too_large(path, limit) from exc
    except _DECODE_ERRORS as exc:
        raise SampleError(f"cannot read image {path}: {exc}", kind="corrupt_media") from exc
    width, height = image.size
    if width * height > limit:
        image.close()
        raise _too_large(path, limit, f" ({width}x{height} = {width * height} pixels)")
    if image.mode not in RGB_CONVERTIBLE_MODES + SIXTEEN_BIT_MODES:
        image.close()
        raise SampleError(
            f"image {path} has pixel mode {image.mode}, which has no defined RGB conversion: save it as 8-bit RGB",
            kind="unsupported_media",
        )
    return image


def _sixteen_bit_to_rgb(image: Image.Image, path: str | Path) -> Image.Image:
    """16-bit grey -> 8-bit RGB, v -> round(v * 255 / 65535); PIL's own conversion clips at 255 (all white)."""
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise SampleError(
            f"image {path} is a {image.mode} image with values outside 0..65535: save it as 8- or 16-bit",
            kind="unsupported_media",
        )
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def to_rgb(image: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """Decoded pixels in RGB: HF's `convert("RGB")` for 8-bit modes, scaled 16-bit grey (see module doc)."""
    if image.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "palette images with transparency ...": alpha is dropped
        return image.convert("RGB")


def load_image(path: str | Path, decode_max_pixels: int = DECODE_MAX_PIXELS) -> Image.Image:
    """Decode to RGB; a missing, corrupt, oversized or unsupported file is a SampleError naming the path."""
    with _open(path, decode_max_pixels) as image:
        try:
            image.load()
        except _DECODE_ERRORS as exc:
            raise SampleError(f"cannot decode image {path}: {exc}", kind="corrupt_media") from exc
        return to_rgb(image, path)


def image_size(path: str | Path, decode_max_pixels: int = DECODE_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) from the file header only, for token counting; refuses what `load_image` refuses
    from the header (missing, unreadable, oversized, unsupported mode)."""
    with _open(path, decode_max_pixels) as image:
        width, height = image.size
    return height, width


def resize_rgb(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an (H, W, 3) uint8 frame with PIL, as HF's `resize` does."""
    return np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.Resampling.BICUBIC))


def normalize(frames: np.ndarray, settings: VisionSettings) -> np.ndarray:
    """uint8 (..., H, W, C) -> float32 rescaled and normalised, with HF's float64 rescale then float32 math."""
    scaled = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(settings.image_mean, dtype=np.float32)
    std = np.asarray(settings.image_std, dtype=np.float32)
    return (scaled - mean) / std


def patchify(frames: np.ndarray, settings: VisionSettings) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W, C) normalised frames -> patches (t*h*w, C*T_p*P*P) and grid (t, h, w).

    T is padded to a multiple of `temporal_patch_size` by repeating the last frame; patches are ordered
    by merge window (each 2x2 group of patches is contiguous), channel-major inside a patch.
    """
    tp, p, m = settings.temporal_patch_size, settings.patch_size, settings.merge_size
    if len(frames) % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - len(frames) % tp, axis=0)])
    n_frames, height, width, channels = frames.shape
    grid_t, grid_h, grid_w = n_frames // tp, height // p, width // p
    x = frames.reshape(grid_t, tp, grid_h // m, m, p, grid_w // m, m, p, channels)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    patches = x.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
    return np.ascontiguousarray(patches), np.array([grid_t, grid_h, grid_w], dtype=np.int64)


def image_grid(height: int, width: int, settings: VisionSettings) -> np.ndarray:
    """The (1, h, w) patch grid an image of this size gets, without touching pixels."""
    resized_h, resized_w = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
    return np.array([1, resized_h // settings.patch_size, resized_w // settings.patch_size], dtype=np.int64)


def preprocess_image(image: Image.Image, settings: VisionSettings) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (patches, grid_thw)."""
    frame = np.asarray(to_rgb(image))
    height, width = frame.shape[:2]
    resized_h, resized_w = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
    pixels = normalize(resize_rgb(frame, resized_h, resized_w), settings)
    return patchify(pixels[None], settings)


def preprocess_images(images: list[Image.Image], settings: VisionSettings) -> tuple[np.ndarray, list[np.ndarray]]:
    """Several images of one sample -> concatenated patches and one grid per image, in order."""
    results = [preprocess_image(image, settings) for image in images]
    return np.concatenate([pixels for pixels, _ in results]), [grid for _, grid in results]
