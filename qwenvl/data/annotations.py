"""Annotation files -> normalised samples.

Reads the qwen-vl-finetune JSON / JSONL format and accepts both spellings users have in their data:
`image`/`images`, `video`/`videos`, turns with `from`/`value` or `role`/`content`. Every problem is a
`SampleError` naming the file and the sample index.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwenvl.constants import IMAGE_TAG, VIDEO_TAG
from qwenvl.data.errors import SampleError

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    """One conversation with its media resolved to paths, in the order their tags appear."""

    messages: list[tuple[str, str]]
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    file: str | None = None
    index: int | None = None

    def error(self, reason: str) -> SampleError:
        return SampleError(reason, self.file, self.index)


@dataclass
class AnnotationRecord:
    """A raw annotation item (a sample dict, or a list of them for a pre-packed item) and where it came from."""

    item: dict | list
    data_path: str
    file: str
    index: int


def read_annotation_file(path: str | Path) -> list:
    """Load a JSON list or a JSONL file; a malformed line names the file and its 0-based sample index."""
    path = Path(path)
    if not path.is_file():
        raise SampleError("annotation file not found", str(path))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = []
        for line_no, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SampleError(f"malformed JSON on line {line_no + 1}: {exc.msg}", str(path), len(items)) from exc
        return items
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SampleError(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", str(path)) from exc
    if not isinstance(items, list):
        raise SampleError("a JSON annotation file must hold a list of samples", str(path))
    return items


def sample_indices(n: int, rate: float, seed: int, name: str) -> np.ndarray:
    """Indices realising a `%N` rate, identical on every rank for the same seed.

    rate < 1: `int(n*rate)` indices without replacement (upstream's count). rate > 1: `int(rate)` whole
    copies plus `int(n*frac)` extra distinct samples. The RNG is seeded from the training seed and the
    dataset name, so two datasets with the same rate get independent subsets.
    """
    if rate == 1.0 or n == 0:
        return np.arange(n)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])
    copies, frac = divmod(rate, 1.0)
    extra = rng.choice(n, size=int(n * frac), replace=False)
    return np.concatenate([np.tile(np.arange(n), int(copies)), np.sort(extra)])


def load_records(configs: list[dict], seed: int) -> list[AnnotationRecord]:
    """Read every dataset of `data_list(...)`, apply its sampling rate, and concatenate in order.

    No shuffling here: the sampler shuffles with the training seed, the same way on every rank.
    """
    records = []
    for config in configs:
        file = str(config["annotation_path"])
        items = read_annotation_file(file)
        keep = sample_indices(len(items), float(config.get("sampling_rate", 1.0)), seed, str(config.get("name", file)))
        data_path = str(config.get("data_path", "") or "")
        records.extend(AnnotationRecord(items[i], data_path, file, int(i)) for i in keep)
    return records


def _as_list(value: object, key: str, file: str | None, index: int | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise SampleError(f"'{key}' must be a path or a list of paths, got {type(value).__name__}", file, index)


def _media(item: dict, singular: str, plural: str, file: str | None, index: int | None) -> list[str]:
    if singular in item and plural in item:
        raise SampleError(f"both '{singular}' and '{plural}' are set; use one of them", file, index)
    key = singular if singular in item else plural
    return _as_list(item.get(key), key, file, index)


def _resolve(paths: list[str], data_path: str) -> list[str]:
    """Join relative media paths to the dataset's folder; absolute paths win, as in upstream."""
    return [str(Path(data_path) / p) if data_path else p for p in paths]


def _turns(item: dict, file: str | None, index: int | None) -> list[tuple[str, str]]:
    conversations = item.get("conversations", item.get("messages"))
    if not isinstance(conversations, list) or not conversations:
        raise SampleError("missing or empty 'conversations' list", file, index)
    turns = []
    for turn_no, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise SampleError(f"turn {turn_no} is not an object", file, index)
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in ROLE_NAMES:
            raise SampleError(
                f"turn {turn_no} has role {role!r}; expected one of {sorted(ROLE_NAMES)}", file, index
            )
        if not isinstance(text, str):
            raise SampleError(f"turn {turn_no} has no text ('value' or 'content' string)", file, index)
        turns.append((ROLE_NAMES[role], text))
    if not any(role == "assistant" for role, _ in turns):
        raise SampleError("no assistant ('gpt') turn: nothing to train on", file, index)
    return turns


def _check_tags(turns: list[tuple[str, str]], n_images: int, n_videos: int, file: str | None, index: int | None):
    """Tags in prompts must match the media lists one to one (upstream mis-aligns or crashes otherwise)."""
    prompt = "".join(text for role, text in turns if role != "assistant")
    for tag, count, key in ((IMAGE_TAG, n_images, "image"), (VIDEO_TAG, n_videos, "video")):
        tags = prompt.count(tag)
        if tags != count:
            raise SampleError(f"{tags} {tag} tag(s) in the prompt but {count} {key} file(s)", file, index)


def parse_sample(item: object, data_path: str = "", file: str | None = None, index: int | None = None) -> Sample:
    """Validate one raw sample dict and normalise it; media paths are resolved against `data_path`."""
    if not isinstance(item, dict):
        raise SampleError(f"a sample must be an object, got {type(item).__name__}", file, index)
    images = _resolve(_media(item, "image", "images", file, index), data_path)
    videos = _resolve(_media(item, "video", "videos", file, index), data_path)
    turns = _turns(item, file, index)
    _check_tags(turns, len(images), len(videos), file, index)
    return Sample(messages=turns, images=images, videos=videos, file=file, index=index)


def parse_record(record: AnnotationRecord) -> list[Sample]:
    """A record is one sample, or a pre-packed list of samples (from tools/pack_data.py)."""
    items = record.item if isinstance(record.item, list) else [record.item]
    if not items:
        raise SampleError("empty pack", record.file, record.index)
    return [parse_sample(item, record.data_path, record.file, record.index) for item in items]
