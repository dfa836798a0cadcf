"""Sample -> tokens, pixels, positions: the per-item work of the data pipeline (pure numpy).

`SampleEncoder` turns one normalised `Sample` into an `EncodedSample`; `SupervisedDataset` indexes the
annotation records of every dataset in `--dataset_use` and encodes one record (a sample, or a
pre-packed list of samples) per item. Errors are `SampleError`s that name file and sample index;
upstream's silent "retry, then use the next sample" is gone: the trainer decides to stop or skip.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from qwenvl.data.annotations import AnnotationRecord, Sample, parse_record
from qwenvl.data.chat_format import (
    DEFAULT_SYSTEM_PROMPT,
    TEMPLATE_MODES,
    SpecialTokens,
    VisualTokens,
    encode_chat_template,
    encode_minimal,
)
from qwenvl.data.errors import SampleError
from qwenvl.data.image_processing import VisionSettings, image_grid, image_size, load_image, preprocess_images
from qwenvl.data.rope2d import rope_index_fn
from qwenvl.data.video_processing import (
    group_timestamps,
    preprocess_video,
    read_video,
    read_video_meta,
    sample_frames,
    video_grid,
)


class SampleTooLong(SampleError):
    """Longer than `model_max_length` and cannot be cut without breaking a vision block or all labels."""

    def __init__(self, reason: str, file=None, index=None, line=None, kind: str = "too_long"):
        super().__init__(reason, file, index, line, kind)


@dataclass
class EncodedSample:
    """Everything the collators need for one item; `seq_lens` has one entry per packed sub-sample."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    seq_lens: list[int]
    pixel_values: np.ndarray | None = None
    image_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    second_per_grid_ts: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(len(self.input_ids))


@dataclass
class _Media:
    """Processed media of one sample, in tag order within each modality."""

    visuals: list[VisualTokens] = field(default_factory=list)
    pixel_values: list[np.ndarray] = field(default_factory=list)
    image_grids: list[np.ndarray] = field(default_factory=list)
    video_pixels: list[np.ndarray] = field(default_factory=list)
    video_grids: list[np.ndarray] = field(default_factory=list)
    second_per_grid_ts: list[float] = field(default_factory=list)


def cat_optional(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    """Concatenate along dim 0 what is present; None when nothing is (a modality absent from a batch)."""
    present = [a for a in arrays if a is not None and len(a)]
    return np.concatenate(present, axis=0) if present else None


@contextmanager
def _located(sample: Sample) -> Iterator[None]:
    """Re-raise any ValueError of media decoding or templating as a SampleError naming file and index."""
    try:
        yield
    except SampleError as exc:
        raise exc.located(sample.file, sample.index) from exc
    except ValueError as exc:  # a template or tokenizer refusing the text
        raise SampleError(str(exc), sample.file, sample.index, kind="encoding") from exc


class SampleEncoder:
    """Encodes samples for one model family with fixed tokenizer and vision settings.

    Without a tokenizer only `media` works: check_data uses that to check media without a model folder.
    """

    def __init__(
        self,
        tokenizer,
        settings: VisionSettings,
        family: str,
        model_max_length: int | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ):
        if family not in TEMPLATE_MODES:
            raise ValueError(f"unknown model family {family!r}; expected one of {sorted(TEMPLATE_MODES)}")
        self.tokenizer = tokenizer
        self.settings = settings
        self.family = family
        self.model_max_length = model_max_length
        self.system_prompt = system_prompt
        self.special = SpecialTokens.from_tokenizer(tokenizer) if tokenizer is not None else None
        self.rope_index = rope_index_fn(family)

    def _image_tokens(self, grid: np.ndarray) -> VisualTokens:
        return VisualTokens("image", (int(np.prod(grid)) // self.settings.merge_size**2,))

    def _video_tokens(self, grid: np.ndarray, timestamps: tuple[float, ...]) -> VisualTokens:
        """One block per video (Qwen2/2.5), or one timestamped block per temporal group (Qwen3)."""
        t, h, w = (int(x) for x in grid)
        per_group = h * w // self.settings.merge_size**2
        if self.family == "qwen3vl":
            return VisualTokens("video", (per_group,) * t, tuple(timestamps))
        return VisualTokens("video", (t * per_group,))

    def media(self, sample: Sample) -> _Media:
        """Decode and preprocess every image and video of a sample, in tag order."""
        media = _Media()
        limit = self.settings.decode_max_pixels
        if sample.images:
            pixels, grids = preprocess_images([load_image(path, limit) for path in sample.images], self.settings)
            media.pixel_values.append(pixels)
            media.image_grids.extend(grids)
            media.visuals.extend(self._image_tokens(g) for g in grids)
        for path in sample.videos:
            video = preprocess_video(read_video(path, self.settings), self.settings)
            media.video_pixels.append(video.pixel_values)
            media.video_grids.append(np.asarray(video.grid_thw, dtype=np.int64))
            media.second_per_grid_ts.append(float(video.second_per_grid_t))
            media.visuals.append(self._video_tokens(video.grid_thw, video.timestamps))
        return media

    def _visuals_from_headers(self, sample: Sample) -> list[VisualTokens]:
        """The vision blocks of a sample from image headers and video metadata, no pixel work."""
        limit = self.settings.decode_max_pixels
        visuals = [self._image_tokens(image_grid(*image_size(path, limit), self.settings)) for path in sample.images]
        for path in sample.videos:
            meta = read_video_meta(path, limit)
            stamps = group_timestamps(sample_frames(meta, self.settings), meta.fps, self.settings.temporal_patch_size)
            visuals.append(self._video_tokens(video_grid(meta, self.settings), stamps))
        return visuals

    def count_tokens(self, sample: Sample) -> int:
        """Exactly `len(encode(sample).input_ids)` before truncation, without decoding pixels (for packing)."""
        return self.count_tokens_and_patches(sample)[0]

    def count_tokens_and_patches(self, sample: Sample) -> tuple[int, int]:
        """(tokens before truncation, vision patches) of `encode(sample)`, from headers (for length grouping)."""
        with _located(sample):
            visuals = self._visuals_from_headers(sample)
            input_ids, _ = self._tokens(sample, visuals)
        patches = sum(sum(v.blocks) for v in visuals) * self.settings.merge_size**2
        return len(input_ids), patches

    def _tokens(self, sample: Sample, visuals: list[VisualTokens]) -> tuple[np.ndarray, np.ndarray]:
        if TEMPLATE_MODES[self.family] == "minimal":
            return encode_minimal(self.tokenizer, self.special, sample.messages, visuals, self.system_prompt)
        return encode_chat_template(self.tokenizer, self.special, sample.messages, visuals)

    def _truncate(self, sample: Sample, input_ids: np.ndarray, labels: np.ndarray):
        """Cut the text tail past `model_max_length`; refuse when the cut would split vision or drop all labels."""
        limit = self.model_max_length
        if limit is None or len(input_ids) <= limit:
            return input_ids, labels
        vision_ends = np.flatnonzero(input_ids == self.special.vision_end)
        if len(vision_ends) and vision_ends[-1] >= limit:
            raise SampleTooLong(
                f"{len(input_ids)} tokens exceed model_max_length={limit} and the cut would split a vision block "
                "(raise --model_max_length or lower --max_pixels)",
                sample.file,
                sample.index,
            )
        if not np.any(labels[:limit] != -100):
            raise SampleTooLong(
                f"{len(input_ids)} tokens exceed model_max_length={limit} and no answer token is left after the cut",
                sample.file,
                sample.index,
            )
        return input_ids[:limit], labels[:limit]

    def encode(self, sample: Sample) -> EncodedSample:
        """Tokens, labels, pixels and 3-D positions of one sample."""
        with _located(sample):
            media = self.media(sample)
            input_ids, labels = self._tokens(sample, media.visuals)
        input_ids, labels = self._truncate(sample, input_ids, labels)
        image_grid = np.stack(media.image_grids).astype(np.int64) if media.image_grids else None
        video_grid = np.stack(media.video_grids).astype(np.int64) if media.video_grids else None
        seconds = np.asarray(media.second_per_grid_ts, dtype=np.float32) if media.video_grids else None
        kwargs = {"second_per_grid_ts": seconds} if self.family == "qwen2.5vl" else {}
        positions, _ = self.rope_index(
            self.settings.merge_size,
            input_ids[None, :],
            image_grid,
            video_grid,
            image_token_id=self.special.image_pad,
            video_token_id=self.special.video_pad,
            vision_start_token_id=self.special.vision_start,
            **kwargs,
        )
        return EncodedSample(
            input_ids=input_ids,
            labels=labels,
            position_ids=positions[:, 0, :],
            seq_lens=[len(input_ids)],
            pixel_values=cat_optional(media.pixel_values),
            image_grid_thw=image_grid,
            pixel_values_videos=cat_optional(media.video_pixels),
            video_grid_thw=video_grid,
            second_per_grid_ts=seconds,
        )


def concat_encoded(parts: list[EncodedSample]) -> EncodedSample:
    """A pre-packed item: sub-samples side by side, each keeping its own positions and segment."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> np.ndarray | None:
        return cat_optional([getattr(p, name) for p in parts])

    return EncodedSample(
        input_ids=np.concatenate([p.input_ids for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        position_ids=np.concatenate([p.position_ids for p in parts], axis=1),
        seq_lens=[n for p in parts for n in p.seq_lens],
        pixel_values=cat("pixel_values"),
        image_grid_thw=cat("image_grid_thw"),
        pixel_values_videos=cat("pixel_values_videos"),
        video_grid_thw=cat("video_grid_thw"),
        second_per_grid_ts=cat("second_per_grid_ts"),
    )


class SupervisedDataset:
    """Map-style dataset over annotation records; item i is record i encoded (packs concatenated)."""

    def __init__(self, records: list[AnnotationRecord], encoder: SampleEncoder):
        self.records = records
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.records)

    def samples(self, i: int) -> list[Sample]:
        return parse_record(self.records[i])

    @contextmanager
    def _record(self, i: int) -> Iterator[list[Sample]]:
        """The samples of record i; any SampleError inside names the record's file, index and line."""
        record = self.records[i]
        try:
            yield self.samples(i)
        except SampleError as exc:
            raise exc.located(record.file, record.index, record.line) from None

    def __getitem__(self, i: int) -> EncodedSample:
        with self._record(i) as samples:
            return concat_encoded([self.encoder.encode(sample) for sample in samples])

    def sizes(self, i: int) -> tuple[int, int]:
        """(tokens, vision patches) of item i without decoding pixels; (0, 0) for a bad item (met when loaded)."""
        try:
            with self._record(i) as samples:
                counts = [self.encoder.count_tokens_and_patches(sample) for sample in samples]
        except (SampleError, OSError, ValueError):
            return 0, 0
        limit = self.encoder.model_max_length
        return sum(min(t, limit) if limit else t for t, _ in counts), sum(p for _, p in counts)

    def check_media(self, i: int) -> None:
        """What `__getitem__` checks short of tokenising: structure, then every media file decoded."""
        with self._record(i) as samples:
            for sample in samples:
                with _located(sample):
                    self.encoder.media(sample)
