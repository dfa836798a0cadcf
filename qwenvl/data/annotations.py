"""Annotation files -> normalised samples.

Reads the qwen-vl-finetune JSON / JSONL format and accepts both spellings users have in their data:
`image`/`images`, `video`/`videos`, turns with `from`/`value` or `role`/`content`. Every problem is a
`SampleError` naming the file and the sample index (and the line, for JSONL); a problem with a whole
file or dataset is a `DatasetError`. Files are UTF-8, with or without a byte-order mark.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwenvl.constants import IMAGE_TAG, VIDEO_TAG
from qwenvl.data.errors import DatasetError, SampleError

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
    """A raw annotation item (a sample dict, or a list of them for a pre-packed item) and where it came from.

    A JSONL line that is not valid UTF-8 JSON, kept with `--skip_bad_samples`, is a record with `error`
    set: it fails like any bad sample, so training skips, counts and lists it.
    """

    item: dict | list | None
    data_path: str
    file: str
    index: int
    line: int | None = None
    error: SampleError | None = None


_BOM = b"\xef\xbb\xbf"


def _jsonl_lines(data: bytes, file: str, skip_bad: bool) -> list[Line]:
    """(item, line number, error) per non-blank line; a bad line raises unless `skip_bad`.

    Lines are split on b"\\n" before decoding, so a U+2028 inside a JSON string does not split a sample.
    """
    out: list[Line] = []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            out.append((json.loads(raw.decode("utf-8")), line_no, None))
            continue
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 text at column {exc.start + 1} (byte 0x{raw[exc.start]:02x})"
        except json.JSONDecodeError as exc:
            reason = f"malformed JSON: {exc.msg} at column {exc.colno}"
        error = SampleError(reason, file, len(out), line_no, kind="malformed_json")
        if not skip_bad:
            raise error
        out.append((None, line_no, error))
    return out


Line = tuple[object, "int | None", "SampleError | None"]  # (item, JSONL line number, error of a bad line)


def read_annotation_lines(path: str | Path, skip_bad: bool = False) -> list[Line]:
    """(item, JSONL line or None, error or None) for every sample of a JSON list or JSONL file.

    A JSONL line that does not parse is an error naming file, sample index and line; with `skip_bad`
    it is returned as an error entry instead, and the other lines still load. A JSON list file is one
    document: when it does not parse, the whole file is a `DatasetError` whatever `skip_bad` says.
    """
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise DatasetError("annotation file not found", file, kind="annotation_file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read the annotation file: {exc.strerror}", file, kind="annotation_file") from exc
    data = data.removeprefix(_BOM)
    if path.suffix == ".jsonl":
        return _jsonl_lines(data, file, skip_bad)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        reason = f"not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} (save the file as UTF-8)"
        raise DatasetError(reason, file, kind="annotation_file") from exc
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one sample per line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        reason = f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}{hint}"
        raise DatasetError(reason, file, kind="malformed_json") from exc
    if not isinstance(items, list):
        raise DatasetError("a JSON annotation file must hold a list of samples", file, kind="annotation_file")
    return [(item, None, None) for item in items]


def read_annotation_file(path: str | Path) -> list:
    """The samples of a JSON list or a JSONL file; the first malformed line raises, naming file, index and line."""
    return [item for item, _, _ in read_annotation_lines(path)]


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


def read_dataset(config: dict, skip_bad: bool = False) -> list[AnnotationRecord]:
    """Every sample of one `data_list(...)` entry as records (rate not applied)."""
    file = str(config["annotation_path"])
    data_path = str(config.get("data_path", "") or "")
    lines = read_annotation_lines(file, skip_bad)
    return [AnnotationRecord(item, data_path, file, i, line, error) for i, (item, line, error) in enumerate(lines)]


def apply_rate(records: list[AnnotationRecord], config: dict, seed: int) -> list[AnnotationRecord]:
    """The records a `%N` rate keeps; a dataset that keeps none is a `DatasetError` (training would hang on it)."""
    rate = float(config.get("sampling_rate", 1.0))
    name = str(config.get("name", config["annotation_path"]))
    keep = sample_indices(len(records), rate, seed, name)
    if len(keep) == 0:
        held = "holds no samples" if not records else f"holds {len(records)} samples and %{rate * 100:g} keeps none"
        raise DatasetError(f"dataset {name} selects no samples: the file {held}", str(config["annotation_path"]),
                           kind="empty_dataset")  # fmt: skip
    return [records[i] for i in keep]


def load_records(configs: list[dict], seed: int, skip_bad: bool = False) -> list[AnnotationRecord]:
    """Read every dataset of `data_list(...)`, apply its sampling rate, and concatenate in order.

    No shuffling here: the sampler shuffles with the training seed, the same way on every rank.
    """
    return [record for config in configs for record in apply_rate(read_dataset(config, skip_bad), config, seed)]


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


def check_answers(sample: Sample) -> Sample:
    """Training data rules for answers (not applied to inference prompts, whose last answer is empty):
    an answer must say something and must not hold a media tag, which would be trained on as text."""
    for turn_no, (role, text) in enumerate(sample.messages):
        if role != "assistant":
            continue
        if not text.strip():
            raise sample.error(f"turn {turn_no} (assistant) is empty: nothing to train on")
        tags = [tag for tag in (IMAGE_TAG, VIDEO_TAG) if tag in text]
        if tags:
            raise SampleError(
                f"turn {turn_no} (assistant) contains {' and '.join(tags)}: media tags belong in prompts, "
                "an answer cannot show media",
                sample.file,
                sample.index,
                kind="tag_in_answer",
            )
    return sample


def _check_tags(turns: list[tuple[str, str]], n_images: int, n_videos: int, file: str | None, index: int | None):
    """Tags in prompts must match the media lists one to one (upstream mis-aligns or crashes otherwise)."""
    prompt = "".join(text for role, text in turns if role != "assistant")
    for tag, count, key in ((IMAGE_TAG, n_images, "image"), (VIDEO_TAG, n_videos, "video")):
        tags = prompt.count(tag)
        if tags != count:
            reason = f"{tags} {tag} tag(s) in the prompt but {count} {key} file(s)"
            raise SampleError(reason, file, index, kind="tag_count")


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
    """A record is one sample, or a pre-packed list of samples (from tools/pack_data.py); its answers must
    pass `check_answers`, as it is training (or evaluation) data."""
    if record.error is not None:
        raise record.error
    items = record.item if isinstance(record.item, list) else [record.item]
    if not items:
        raise SampleError("empty pack", record.file, record.index, record.line)
    try:
        return [check_answers(parse_sample(item, record.data_path, record.file, record.index)) for item in items]
    except SampleError as exc:
        raise exc.located(record.file, record.index, record.line) from None
