"""Read and write the Hugging Face processor files of a model folder (pure JSON, no transformers models).

Checkpoints we save must load in `transformers` with the pixel limits used in training (upstream
saves them too), and tests need realistic processor folders built from the real Qwen tokenizer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from qwenvl.data.chat_templates import CHAT_TEMPLATES
from qwenvl.data.image_processing import VisionSettings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
PROCESSOR_CLASSES = {"qwen2vl": "Qwen2VLProcessor", "qwen2.5vl": "Qwen2_5_VLProcessor", "qwen3vl": "Qwen3VLProcessor"}
VIDEO_PROCESSOR_CLASSES = {
    "qwen2vl": "Qwen2VLVideoProcessor",
    "qwen2.5vl": "Qwen2VLVideoProcessor",
    "qwen3vl": "Qwen3VLVideoProcessor",
}


def load_tokenizer(model_dir: str | Path, model_max_length: int | None = None):
    """The fast tokenizer of a local folder, right padding (imports transformers, not mindnlp)."""
    from transformers import AutoTokenizer

    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return AutoTokenizer.from_pretrained(str(model_dir), padding_side="right", use_fast=True, **kwargs)


def _image_config(settings: VisionSettings) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": PROCESSOR_CLASSES[settings.family],
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "resample": 3,
        "image_mean": list(settings.image_mean),
        "image_std": list(settings.image_std),
        "patch_size": settings.patch_size,
        "temporal_patch_size": settings.temporal_patch_size,
        "merge_size": settings.merge_size,
        "min_pixels": settings.min_pixels,
        "max_pixels": settings.max_pixels,
        "size": {"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
    }


def _video_config(settings: VisionSettings) -> dict:
    """Qwen3 bounds are per clip (HF semantics); Qwen2/2.5 bounds are per frame."""
    if settings.family == "qwen3vl":
        low, high = settings.video_min_pixels, settings.video_max_pixels
    else:
        low, high = settings.video_min_frame_pixels, settings.video_max_frame_pixels
    config = _image_config(settings)
    del config["image_processor_type"]
    config.update(
        video_processor_type=VIDEO_PROCESSOR_CLASSES[settings.family],
        min_pixels=low,
        max_pixels=high,
        size={"shortest_edge": low, "longest_edge": high},
        min_frames=settings.video_min_frames,
        max_frames=settings.video_max_frames,
        fps=settings.video_fps,
        do_sample_frames=settings.family == "qwen3vl",
    )
    return config


def write_processor_files(
    out_dir: str | Path, settings: VisionSettings, tokenizer_dir: str | Path | None = None
) -> Path:
    """Write tokenizer (copied), chat template, image and video processor configs into `out_dir`.

    Our own training settings (base_interval, frame bounds) also go to `qwenvl_vision.json`, so a
    checkpoint remembers exactly how its data was preprocessed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
        config_path = out / "tokenizer_config.json"
        if config_path.is_file():
            tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
            tokenizer_config.pop("chat_template", None)
            config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATES[settings.family], encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(_image_config(settings), indent=2), encoding="utf-8")
    (out / "video_preprocessor_config.json").write_text(json.dumps(_video_config(settings), indent=2), encoding="utf-8")
    (out / "qwenvl_vision.json").write_text(json.dumps(asdict(settings), indent=2), encoding="utf-8")
    return out
