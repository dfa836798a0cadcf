"""Safetensors checkpoints in Hugging Face layout, read and written one tensor at a time.

Reading parses the safetensors header and reads one tensor at a time, so bfloat16 checkpoints (which the
safetensors numpy API cannot return) load as float32 and the RAM peak stays near one model copy.

Names: our parameters carry the transformers 4.57 in-memory names (`model.visual.*`,
`model.language_model.*`, `lm_head.weight`). Qwen2-VL and Qwen2.5-VL checkpoints on disk use the legacy
names (`visual.*`, `model.*`), which 4.57's `save_pretrained` still writes (it reverses
`_checkpoint_conversion_mapping`); Qwen3-VL has no mapping, so its disk names are the in-memory ones.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors.numpy import save_file

LEGACY_NAME_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def to_memory_name(name: str) -> str:
    """Legacy disk name -> transformers 4.57 in-memory name (identity for names already in that form)."""
    if name.startswith("visual."):
        return "model." + name
    if re.match(r"^model\.(?!(language_model|visual)\.)", name):
        return "model.language_model." + name[len("model.") :]
    return name


def to_disk_name(name: str, model_type: str) -> str:
    """In-memory name -> the name 4.57 `save_pretrained` writes for the family."""
    if model_type not in LEGACY_NAME_FAMILIES:
        return name
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _as_float32(raw: np.ndarray, dtype: str, shape: list[int]) -> np.ndarray:
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {dtype}")
    return raw.view(_NUMPY_DTYPES[dtype]).reshape(shape).astype(np.float32)


def iter_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor of one file, each read on its own (no mapping of the whole file,
    whose pages would count towards the process's resident memory)."""
    header, start = _read_header(path)
    with open(path, "rb") as f:
        for name, info in header.items():
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            raw = np.frombuffer(f.read(end - begin), dtype=np.uint8)
            yield name, _as_float32(raw, info["dtype"], info["shape"])


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the shards named by the index, or the single file."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _write_shard(shard: dict[str, np.ndarray], out_dir: Path, number: int) -> Path:
    path = out_dir / f".shard-{number:05d}.tmp"
    save_file(shard, str(path), metadata={"format": "pt"})
    return path


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], out_dir: Path, max_shard_size: int) -> list[str]:
    """Write named arrays as one file, or as shards of at most `max_shard_size` bytes plus an index.

    Each shard is written as soon as it is full, so at most one shard is held in memory.
    """
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0
    for name, array in tensors:
        if shard and size + array.nbytes > max_shard_size:
            written.append((_write_shard(shard, out_dir, len(written)), list(shard)))
            shard, size = {}, 0
        shard[name] = array
        size += array.nbytes
        total += array.nbytes
    written.append((_write_shard(shard, out_dir, len(written)), list(shard)))
    if len(written) == 1:
        written[0][0].replace(out_dir / SINGLE_FILE)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    weight_map = {}
    for file_name, (path, keys) in zip(names, written):
        path.replace(out_dir / file_name)
        weight_map.update({key: file_name for key in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return names
