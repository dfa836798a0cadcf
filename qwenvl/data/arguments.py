"""`DataArguments`: upstream's data flags, names and defaults kept (2.5-era and 3-era flags both)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenvl.data.image_processing import DECODE_MAX_PIXELS


def _flag(default, help_text: str, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class DataArguments:
    dataset_use: str = _flag("", "comma list of registered names or .json/.jsonl paths, each with optional %N")
    eval_dataset_use: str = _flag("", "datasets for eval loss/perplexity during training (same syntax as dataset_use)")
    dataset_registry: str | None = _flag(None, "JSON/YAML file mapping names to {annotation_path, data_path}")
    data_flatten: bool = _flag(False, "concatenate each micro-batch into one sequence with cu_seqlens")
    data_packing: bool = _flag(False, "annotations are pre-packed lists (tools/pack_data.py); implies flattening")
    length_buckets: str = _flag("auto", "tokens each micro-batch is padded to (compiled shapes): auto (6 doubling "
                                        "sizes up to batch x model_max_length), off (multiples of 64), or a list "
                                        "like 1024,2048,4096")
    base_interval: int = _flag(2, "Qwen2/2.5 video: seconds between sampled frames")
    max_pixels: int = _flag(28 * 28 * 576, "image: max pixels after smart_resize")
    min_pixels: int = _flag(28 * 28 * 16, "image: min pixels after smart_resize")
    video_max_frames: int = _flag(8, "video: max sampled frames")
    video_min_frames: int = _flag(4, "video: min sampled frames")
    video_max_frame_pixels: int = _flag(32 * 28 * 28, "Qwen2/2.5 video: max pixels per frame")
    video_min_frame_pixels: int = _flag(4 * 28 * 28, "Qwen2/2.5 video: min pixels per frame")
    video_max_pixels: int = _flag(1024 * 28 * 28, "Qwen3 video: max pixels per clip (frames x height x width)")
    video_min_pixels: int = _flag(256 * 28 * 28, "Qwen3 video: min pixels per clip")
    video_fps: float = _flag(2.0, "Qwen3 video: frames sampled per second")
    system_prompt: str = _flag("You are a helpful assistant.", "Qwen2/2.5 default system prompt")
    decode_max_pixels: int = _flag(
        DECODE_MAX_PIXELS, "largest image or video frame (width x height) decoded; larger files are bad samples"
    )
