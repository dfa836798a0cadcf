"""A minimal Motion-JPEG AVI writer for tests: real video files from numpy frames, with no encoder package.

The RIFF layout is the classic AVI 1.0 one: `hdrl` (main header, one video stream header and its
BITMAPINFOHEADER), `movi` with one `00dc` chunk of JPEG bytes per frame, and the `idx1` index that
demuxers use to find the frames.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

_KEYFRAME = 0x10
_HAS_INDEX = 0x10


def _chunk(fourcc: bytes, payload: bytes) -> bytes:
    pad = b"\0" if len(payload) % 2 else b""
    return fourcc + struct.pack("<I", len(payload)) + payload + pad


def _list(kind: bytes, payload: bytes) -> bytes:
    return _chunk(b"LIST", kind + payload)


def write_mjpeg_avi(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """Write (T, H, W, 3) uint8 frames as an MJPEG AVI at an integer frame rate."""
    count, height, width = frames.shape[:3]
    jpegs = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    largest = max((len(j) for j in jpegs), default=0)  # a zero-frame file is a valid test input
    main_header = struct.pack(
        "<10I4I", 1_000_000 // fps, largest * fps, 0, _HAS_INDEX, count, 0, 1, largest, width, height, 0, 0, 0, 0
    )
    # fccType, fccHandler, flags, priority, language, initial frames, scale, rate (fps = rate / scale), start,
    # length, buffer size, quality (-1: default), sample size, frame rectangle
    stream_header = struct.pack(
        "<4s4sIHHIIIIIIII4h",
        *(b"vids", b"MJPG", 0, 0, 0, 0, 1, fps, 0, count, largest, 0xFFFFFFFF, 0, 0, 0, width, height),
    )
    bitmap = struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
    stream = _list(b"strl", _chunk(b"strh", stream_header) + _chunk(b"strf", bitmap))
    header = _list(b"hdrl", _chunk(b"avih", main_header) + stream)
    movi_chunks = b""
    index = b""
    offset = 4  # idx1 offsets count from the 'movi' fourcc
    for jpeg in jpegs:
        chunk = _chunk(b"00dc", jpeg)
        index += struct.pack("<4sIII", b"00dc", _KEYFRAME, offset, len(jpeg))
        movi_chunks += chunk
        offset += len(chunk)
    body = b"AVI " + header + _list(b"movi", movi_chunks) + _chunk(b"idx1", index)
    path = Path(path)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path
