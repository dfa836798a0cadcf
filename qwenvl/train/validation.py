"""Flag validation before anything loads: a bad value is a one-line `FlagError`, never a late crash.

Without it a negative learning rate trains uphill, `--save_steps 0` saves every step, batch size 0
divides by zero deep in the loader, and `--eval_strategy steps` without an eval set silently never
evaluates. `validate_flags` checks every training flag; `validate_data_args` the data flags alone
(check_data.py and pack_data.py take those too, with the same verdict).
"""

from __future__ import annotations

import math
from pathlib import Path

from qwenvl.data.arguments import DataArguments
from qwenvl.data.buckets import ShapeBuckets
from qwenvl.data.image_processing import DECODE_MAX_PIXELS_CEILING
from qwenvl.errors import FlagError
from qwenvl.family import read_model_type
from qwenvl.train.schedule import schedule_options


def _require(ok: bool, flag: str, value: object, allowed: str) -> None:
    if not ok:
        raise FlagError(f"--{flag} {value}: {allowed}")


def _at_least(args: object, names: tuple[str, ...], low: float) -> None:
    for name in names:
        value = getattr(args, name)
        _require(value is None or value >= low, name, value, f"must be at least {low:g}")


def _bounds(args: object, low_name: str, high_name: str) -> None:
    low, high = getattr(args, low_name), getattr(args, high_name)
    _require(low <= high, low_name, low, f"must not exceed --{high_name} {high}")


def _interval(args: object, name: str) -> None:
    """HF convention: below 1 a fraction of the total steps, above 1 a whole number of steps."""
    value = getattr(args, name)
    if value is None:
        return
    ok = math.isfinite(value) and value > 0 and (value < 1 or float(value).is_integer())
    _require(ok, name, value, "must be a positive whole number of steps, or a fraction of the run below 1")


def validate_data_args(data_args: DataArguments) -> None:
    """Pixel, frame and decoding bounds: positive, and each minimum at most its maximum."""
    pixel_flags = ("min_pixels", "max_pixels", "video_min_frame_pixels", "video_max_frame_pixels",
                   "video_min_pixels", "video_max_pixels", "video_min_frames", "video_max_frames",
                   "base_interval", "decode_max_pixels")  # fmt: skip
    _at_least(data_args, pixel_flags, 1)
    _bounds(data_args, "min_pixels", "max_pixels")
    _bounds(data_args, "video_min_frame_pixels", "video_max_frame_pixels")
    _bounds(data_args, "video_min_pixels", "video_max_pixels")
    _bounds(data_args, "video_min_frames", "video_max_frames")
    fps = data_args.video_fps
    _require(math.isfinite(fps) and fps > 0, "video_fps", fps, "must be a positive number of frames per second")
    ceiling = DECODE_MAX_PIXELS_CEILING
    _require(data_args.decode_max_pixels <= ceiling, "decode_max_pixels", data_args.decode_max_pixels,
             f"PIL refuses to open images over {ceiling} pixels whatever this flag says")  # fmt: skip
    try:
        ShapeBuckets.from_flag(data_args.length_buckets, 1, 1)
    except ValueError as exc:
        raise FlagError(str(exc)) from None


def validate_model_folder(path: str | Path, weights: bool = True) -> None:
    """A local folder with a config.json naming a Qwen-VL family, a tokenizer and (for training) weights."""
    flag = "--model_name_or_path"
    if not path:
        raise FlagError(f"{flag} is required: a local model folder (config.json, safetensors, tokenizer)")
    folder = Path(path)
    if not folder.is_dir():
        raise FlagError(f"{flag} {folder}: no such folder (models load from local folders only, never downloaded: "
                        "download a Hub model first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR`)")
    try:
        read_model_type(folder)
    except ValueError as exc:  # missing or unreadable config.json, or not a Qwen-VL model_type
        raise FlagError(f"{flag} {folder}: {' '.join(str(exc).split())}") from exc
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise FlagError(f"{flag} {folder}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    if weights and not any(folder.glob("*.safetensors")):
        raise FlagError(f"{flag} {folder}: no *.safetensors weights")


def validate_training_args(training_args) -> None:
    """Every `TrainingArguments` value against what the trainer can do with it."""
    t = training_args
    for name in ("learning_rate", "mm_projector_lr", "vision_tower_lr", "weight_decay", "max_grad_norm"):
        value = getattr(t, name)
        ok = value is None or (math.isfinite(value) and value >= 0)
        _require(ok, name, value, "must be a finite number >= 0 (a negative rate climbs the loss)")
    for name in ("adam_beta1", "adam_beta2"):
        _require(0 <= getattr(t, name) < 1, name, getattr(t, name), "must be in [0, 1)")
    _require(t.adam_epsilon > 0, "adam_epsilon", t.adam_epsilon, "must be > 0")
    _at_least(t, ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                  "model_max_length", "save_total_limit"), 1)  # fmt: skip
    _at_least(t, ("dataloader_num_workers", "warmup_steps", "num_train_epochs"), 0)
    if t.max_steps <= 0:
        _require(t.num_train_epochs > 0, "num_train_epochs", t.num_train_epochs,
                 "must be > 0 unless --max_steps is positive: nothing would train")  # fmt: skip
    _require(0 <= t.warmup_ratio <= 1, "warmup_ratio", t.warmup_ratio, "must be in [0, 1]")
    for name in ("logging_steps", "save_steps", "eval_steps"):
        _interval(t, name)
    _require(0 <= t.seed < 2**32, "seed", t.seed, "must be in [0, 2**32)")
    if t.bf16 and t.fp16:
        raise FlagError("--bf16 and --fp16 are exclusive: pick one compute type")
    _at_least(t, ("lora_r",), 1)
    _require(t.lora_alpha > 0, "lora_alpha", t.lora_alpha, "must be > 0")
    _require(0 <= t.lora_dropout < 1, "lora_dropout", t.lora_dropout, "must be in [0, 1)")
    targets = [m for m in t.lora_target_modules.split(",") if m.strip()]
    _require(targets or not t.lora_enable, "lora_target_modules", repr(t.lora_target_modules), "names no module")
    output = Path(t.output_dir)
    _require(not output.exists() or output.is_dir(), "output_dir", output, "exists and is not a folder")
    schedule_options(t.lr_scheduler_type, t.lr_scheduler_kwargs, t.learning_rate)


def validate_flags(model_args, data_args: DataArguments, training_args) -> None:
    """All flags of train_qwen.py, before any model or data is loaded (the model folder first)."""
    validate_model_folder(model_args.model_name_or_path)
    tuned = model_args.tune_mm_llm or model_args.tune_mm_mlp or model_args.tune_mm_vision or training_args.lora_enable
    if not tuned:
        raise FlagError("nothing would train: set --tune_mm_llm, --tune_mm_mlp or --tune_mm_vision, or --lora_enable")
    _require(bool(data_args.dataset_use.strip()), "dataset_use", repr(data_args.dataset_use),
             "names no dataset (a comma list of registered names or .json/.jsonl paths)")  # fmt: skip
    if training_args.eval_strategy != "no" and not data_args.eval_dataset_use.strip():
        raise FlagError(f"--eval_strategy {training_args.eval_strategy} needs --eval_dataset_use (data to evaluate)")
    if data_args.eval_dataset_use.strip() and training_args.eval_strategy == "no":
        raise FlagError("--eval_dataset_use is set but --eval_strategy is 'no': pass --eval_strategy steps or epoch")
    validate_data_args(data_args)
    validate_training_args(training_args)
