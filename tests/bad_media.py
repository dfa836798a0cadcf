"""Hostile media files for tests, written cheaply: huge 1-bit PNGs, a truncated JPEG, every odd PIL mode."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_bilevel_png(path: str | Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG of any size, streamed row by row: 20000 x 20000 is a 50 MB raw image
    that compresses to ~50 kB, a decompression bomb for anything that decodes it to RGB (1.2 GB)."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then packed pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
    path = Path(path)
    path.write_bytes(png)
    return path


def write_truncated_jpeg(path: str | Path, size: tuple[int, int] = (64, 48)) -> Path:
    """A JPEG whose header is intact and whose entropy-coded data stops halfway (opens, then fails to load)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    path = Path(path)
    path.write_bytes(data[: len(data) // 2])
    return path


def mode_images() -> dict[str, tuple[Image.Image, str, np.ndarray]]:
    """Two-pixel images in each PIL mode: (image, file suffix, expected RGB pixels computed by hand).

    16-bit grey v -> round(v * 255 / 65535); CMYK -> (255 - c)(255 - k) / 255 per channel, rounded;
    palette with transparency, LA and RGBA -> colour without alpha (HF's `convert("RGB")`, no compositing);
    1-bit -> 0 / 255 grey.
    """
    images: dict[str, tuple[Image.Image, str, np.ndarray]] = {}
    images["I;16"] = (
        Image.fromarray(np.array([[1000, 32768]], dtype=np.uint16)),
        ".png",
        np.array([[[4, 4, 4], [128, 128, 128]]]),  # 1000*255/65535 = 3.89; 32768*255/65535 = 127.502
    )
    images["I"] = (
        Image.fromarray(np.array([[257, 65535]], dtype=np.int32), mode="I"),
        ".tif",
        np.array([[[1, 1, 1], [255, 255, 255]]]),
    )
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (51, 102, 0, 64))
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    images["CMYK"] = (cmyk, ".tif", np.array([[[153, 115, 191], [0, 0, 0]]]))  # 204*191/255=152.8, 153*191/255=114.6
    palette = Image.new("P", (2, 1))
    palette.putpalette([200, 10, 20, 30, 40, 250])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    images["P+transparency"] = (palette, ".png", np.array([[[200, 10, 20], [30, 40, 250]]]))
    images["LA"] = (
        Image.fromarray(np.array([[[90, 0], [200, 255]]], dtype=np.uint8), mode="LA"),
        ".png",
        np.array([[[90, 90, 90], [200, 200, 200]]]),
    )
    images["RGBA"] = (
        Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 128]]], dtype=np.uint8), mode="RGBA"),
        ".png",
        np.array([[[10, 20, 30], [40, 50, 60]]]),
    )
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    images["1"] = (bilevel, ".png", np.array([[[0, 0, 0], [255, 255, 255]]]))
    return images
