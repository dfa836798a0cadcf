"""Wiring of the data pipeline from flags: model folder + `DataArguments` -> encoder, dataset, collator.

Training (`train_qwen.py`) and the tools (`pack_data.py`, `check_data.py`) build it the same way, so a
token count or a check always reflects exactly what training will see.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Callable

from qwenvl.cli_args import add_dataclass_args
from qwenvl.data import data_list, load_registry_file
from qwenvl.data.annotations import load_records
from qwenvl.data.arguments import DataArguments
from qwenvl.data.buckets import ShapeBuckets
from qwenvl.data.collators import collate_flattened, collate_padded
from qwenvl.data.dataset import SampleEncoder, SupervisedDataset
from qwenvl.data.image_processing import VisionSettings
from qwenvl.data.processor_files import load_tokenizer
from qwenvl.family import model_family


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """The pixel and video flags that change token counts (dataset selection flags excluded)."""
    add_dataclass_args(parser, DataArguments, skip=("dataset_use", "eval_dataset_use", "dataset_registry", "data_flatten", "data_packing"))


def vision_settings(model_path: str | Path | None, family: str, data_args: DataArguments) -> VisionSettings:
    """Patch geometry from the model's preprocessor_config.json (the family's defaults without a model),
    pixel, video and decoding limits from the flags."""
    limits = dict(
        min_pixels=data_args.min_pixels,
        max_pixels=data_args.max_pixels,
        video_min_frames=data_args.video_min_frames,
        video_max_frames=data_args.video_max_frames,
        video_min_frame_pixels=data_args.video_min_frame_pixels,
        video_max_frame_pixels=data_args.video_max_frame_pixels,
        video_min_pixels=data_args.video_min_pixels,
        video_max_pixels=data_args.video_max_pixels,
        video_fps=data_args.video_fps,
        base_interval=data_args.base_interval,
        decode_max_pixels=data_args.decode_max_pixels,
    )
    if model_path is None:
        return VisionSettings.for_family(family, **limits)
    return VisionSettings.from_preprocessor_config(model_path, family, **limits)


def build_encoder(
    model_path: str | Path, data_args: DataArguments, model_max_length: int | None = None, tokenizer=None
) -> SampleEncoder:
    family = model_family(model_path)
    tokenizer = tokenizer or load_tokenizer(model_path, model_max_length)
    settings = vision_settings(model_path, family, data_args)
    return SampleEncoder(tokenizer, settings, family, model_max_length, data_args.system_prompt)


def dataset_configs(data_args: DataArguments, names: str | None = None) -> list[dict]:
    """`dataset_use` (or `names`, same syntax) resolved through the built-in and the user's registry."""
    registry = load_registry_file(data_args.dataset_registry) if data_args.dataset_registry else None
    return data_list(data_args.dataset_use if names is None else names, registry)


def build_dataset(
    encoder: SampleEncoder, data_args: DataArguments, seed: int, names: str | None = None, skip_bad: bool = False
) -> SupervisedDataset:
    """The training datasets (`dataset_use`), or `names` in the same syntax (evaluation sets).

    A malformed JSONL line stops here unless `skip_bad` (`--skip_bad_samples`): then it stays in the
    dataset as a bad sample that training skips, counts and lists. A dataset selecting nothing stops here.
    """
    records = load_records(dataset_configs(data_args, names), seed, skip_bad)
    return SupervisedDataset(records, encoder)


def build_collator(encoder: SampleEncoder, data_args: DataArguments, buckets: ShapeBuckets | None = None,
                   rows: int | None = None) -> Callable:  # fmt: skip
    """Flattened layout for `data_flatten` or `data_packing` (as upstream's 3-era code), padded otherwise;
    micro-batches of `rows` samples padded to `buckets`."""
    collate = collate_flattened if (data_args.data_flatten or data_args.data_packing) else collate_padded
    return partial(collate, pad_token_id=encoder.special.pad, buckets=buckets, rows=rows)
