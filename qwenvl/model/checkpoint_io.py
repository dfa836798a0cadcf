"""Safetensors checkpoints in Hugging Face layout, read and written one tensor at a time.

Reading parses the safetensors header and reads one tensor at a time, block by block into the dtype asked
for (a range of it for a ZeRO-3 chunk), so bfloat16 checkpoints (which the safetensors numpy API cannot
return) load too and the RAM peak stays near one tensor in the target dtype. Writing
builds each file's header from the tensors' shapes and dtypes first, then streams their bytes, so no
more than one tensor (one ZeRO-3 gather) is held at a time.

Names: our parameters carry the transformers 4.57 in-memory names (`model.visual.*`,
`model.language_model.*`, `lm_head.weight`). Qwen2-VL and Qwen2.5-VL checkpoints on disk use the legacy
names (`visual.*`, `model.*`), which 4.57's `save_pretrained` still writes (it reverses
`_checkpoint_conversion_mapping`); Qwen3-VL has no mapping, so its disk names are the in-memory ones.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

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


READ_BLOCK_BYTES = 2**26  # stored bytes read and converted at a time


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: its name, dtype tag, shape and where its bytes start."""

    path: Path
    name: str
    tag: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, dtype: type = np.float32, begin: int = 0, end: int | None = None) -> np.ndarray:
        """Flattened values [begin, end) in `dtype`, read and converted one block at a time straight into the
        result: beside the result only one block exists (a whole float32 copy of a 545 M-value embedding, and
        the bytes it came from, would be 4 GB more per rank), and a ZeRO-3 rank reads only its chunk."""
        if self.tag != "BF16" and self.tag not in _NUMPY_DTYPES:
            raise ValueError(f"unsupported safetensors dtype {self.tag}")
        end = self.numel if end is None else end
        width = 2 if self.tag == "BF16" else np.dtype(_NUMPY_DTYPES[self.tag]).itemsize
        out = np.empty(end - begin, dtype)
        step = max(1, READ_BLOCK_BYTES // width)
        with open(self.path, "rb") as f:
            for lo in range(begin, end, step):
                hi = min(end, lo + step)
                f.seek(self.offset + lo * width)
                raw = np.frombuffer(f.read((hi - lo) * width), dtype=np.uint8)
                out[lo - begin : hi - begin] = _as_float32(raw, self.tag, [hi - lo])
        return out


def stored_tensors(path: Path) -> list[StoredTensor]:
    """The tensors of one file, in header order; nothing is read but the header (no mapping of the whole file,
    whose pages would count towards the process's resident memory)."""
    header, start = _read_header(path)
    return [StoredTensor(Path(path), name, info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0])
            for name, info in header.items()]  # fmt: skip


def iter_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor of one file, each read on its own."""
    for stored in stored_tensors(path):
        yield stored.name, stored.read().reshape(stored.shape)


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


_TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32"}
_TAG_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4}


def safetensors_tag(dtype_name: str) -> str:
    """The safetensors dtype tag of a numpy / MindSpore dtype name ("float16", "Float16", "bfloat16" ...)."""
    tag = _TAGS.get(str(dtype_name).lower())
    if tag is None:
        raise ValueError(f"no safetensors dtype for {dtype_name}")
    return tag


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its name on disk, shape and safetensors dtype tag, known before its values."""

    name: str
    shape: tuple[int, ...]
    tag: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _TAG_BYTES[self.tag]


def _header(plans: Sequence[TensorPlan], metadata: Mapping[str, str] | None = None) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for plan in plans:
        entries[plan.name] = {"dtype": plan.tag, "shape": list(plan.shape), "data_offsets": [offset, offset + plan.nbytes]}
        offset += plan.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def _shards(plans: Sequence[TensorPlan], max_shard_size: int) -> list[list[int]]:
    groups, size = [[]], 0
    for index, plan in enumerate(plans):
        if groups[-1] and size + plan.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(index)
        size += plan.nbytes
    return groups


def _write_file(target: Path | None, plans: Sequence[TensorPlan], indices: Sequence[int],
                read: Callable[[int], np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """One safetensors file of `plans[i]` for `i` in `indices`, each tensor read, written and dropped in turn,
    under a temporary name replaced at the end (a crash leaves no half-written file); `target` None only reads."""
    handle = None
    if target is not None:
        header = _header([plans[i] for i in indices], metadata)
        handle = open(target.with_name(f".{target.name}.tmp"), "wb")
        handle.write(struct.pack("<Q", len(header)) + header)
    try:
        for i in indices:
            value = np.ascontiguousarray(read(i))
            if handle is not None:
                if value.nbytes != plans[i].nbytes:
                    raise ValueError(f"{plans[i].name}: {value.nbytes} bytes read, {plans[i].nbytes} planned")
                handle.write(value)  # the array's own buffer: no bytes copy of it
            del value  # before the next read
    finally:
        if handle is not None:
            handle.close()
    if target is not None:
        target.with_name(f".{target.name}.tmp").replace(target)


def write_safetensors(
    plans: Sequence[TensorPlan], read: Callable[[int], np.ndarray], out_dir: Path | None, max_shard_size: int
) -> list[str]:
    """Write `read(i)` for every plan, one tensor at a time, as one file or shards plus an index.

    Headers are built from the plans, so no tensor is held longer than its own write; `out_dir` None
    still calls every `read` (a rank taking part in collective reads) and writes nothing.
    """
    groups = _shards(plans, max_shard_size)
    names = [SINGLE_FILE] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                                                    for i in range(len(groups))]  # fmt: skip
    for file_name, group in zip(names, groups):
        _write_file(out_dir / file_name if out_dir is not None else None, plans, group, read)
    if out_dir is not None and len(groups) > 1:
        weight_map = {plans[i].name: name for name, group in zip(names, groups) for i in group}
        index = {"metadata": {"total_size": sum(p.nbytes for p in plans)}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return names


class LazyTensors(Mapping[str, np.ndarray]):
    """Named tensors whose shapes and dtypes are known up front and whose values are read only when asked for
    (each read is a fresh array), so `write_tensor_file` holds one of them at a time."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, ...], str, Callable[[], np.ndarray]]] = {}

    def add(self, name: str, shape: Sequence[int], dtype_name: str, read: Callable[[], np.ndarray]) -> None:
        self._entries[name] = (tuple(int(n) for n in shape), str(dtype_name), read)

    def put(self, name: str, value: np.ndarray) -> None:
        """A value already at hand (a scalar, a small array)."""
        value = np.asarray(value)
        self.add(name, value.shape, str(value.dtype), lambda: value)

    def plan(self, name: str) -> TensorPlan:
        shape, dtype_name, _ = self._entries[name]
        return TensorPlan(name, shape, safetensors_tag(dtype_name))

    def __getitem__(self, name: str) -> np.ndarray:
        return self._entries[name][2]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def write_tensor_file(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """One safetensors file of `tensors` (a `LazyTensors` streams; other mappings are written as they are)."""
    if not isinstance(tensors, LazyTensors):
        lazy = LazyTensors()
        for name, value in tensors.items():
            lazy.put(name, value)
        tensors = lazy
    names = list(tensors)
    _write_file(Path(path), [tensors.plan(n) for n in names], range(len(names)), lambda i: tensors[names[i]],
                metadata)
