"""Read and write the Hugging Face processor files of a model folder (pure JSON, no transformers models).

Checkpoints we save must load in `transformers` with the pixel limits used in training (upstream
saves them too), and tests need realistic processor folders built from the real Qwen tokenizer.
Reading goes the other way: the chat template the way a processor finds it, and the pixel and video
limits a folder records, so evaluation asks a model the way it was trained.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
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


RUN_ARGS_FILE = "args.json"  # a training run's flags (qwenvl.train.run_record)
VISION_FILE = "qwenvl_vision.json"


def processor_chat_template(model_dir: str | Path) -> str | None:
    """The chat template a processor of this folder uses: `chat_template.jinja`, else the legacy
    `chat_template.json` (how Hugging Face ships Qwen2-VL .. Qwen3-VL), else None (the tokenizer's)."""
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not (folder / "chat_template.json").is_file():
        return None
    template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # several named templates: the processor's default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def load_tokenizer(model_dir: str | Path, model_max_length: int | None = None):
    """The fast tokenizer of a local folder, right padding, with the processor's chat template.

    The tokenizer alone reads `tokenizer_config.json`'s template (a text-only one in Qwen3-VL's
    folders); vision samples need the processor's. Imports transformers, not mindnlp.
    """
    from transformers import AutoTokenizer

    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="right", use_fast=True, **kwargs)
    tokenizer.chat_template = processor_chat_template(model_dir) or tokenizer.chat_template
    return tokenizer


def _edges(config: dict) -> tuple[int | None, int | None]:
    """(min, max) pixels of a processor config: `min_pixels`/`max_pixels`, else `size`'s edges (HF 4.5x)."""
    size = config.get("size") if isinstance(config.get("size"), dict) else {}
    return config.get("min_pixels", size.get("shortest_edge")), config.get("max_pixels", size.get("longest_edge"))


def _from_hf_configs(folder: Path, family: str) -> dict:
    """Pixel limits (and Qwen3 video sampling) from Hugging Face's processor configs of a folder."""
    found = {}
    image = folder / "preprocessor_config.json"
    if image.is_file():
        low, high = _edges(json.loads(image.read_text(encoding="utf-8")))
        found.update({k: v for k, v in (("min_pixels", low), ("max_pixels", high)) if v is not None})
    video = folder / "video_preprocessor_config.json"
    if video.is_file():
        config = json.loads(video.read_text(encoding="utf-8"))
        low, high = _edges(config)
        if family == "qwen3vl":  # per-clip bounds and HF's frame sampling
            keys = {"video_min_pixels": low, "video_max_pixels": high, "video_fps": config.get("fps"),
                    "video_min_frames": config.get("min_frames"),
                    "video_max_frames": config.get("max_frames")}  # fmt: skip
        else:  # per-frame bounds; frames follow the 2.5-era rule (qwenvl_vision.json records ours)
            keys = {"video_min_frame_pixels": low, "video_max_frame_pixels": high}
        found.update({k: v for k, v in keys.items() if v is not None})
    return found


def recorded_data_settings(model_dir: str | Path, family: str) -> tuple[dict, list[str]]:
    """The data flags a model folder records, and the files they came from (later files win):
    HF's processor configs, our `qwenvl_vision.json`, then the training run's `args.json`."""
    from qwenvl.data.arguments import DataArguments

    folder = Path(model_dir)
    names = {f.name for f in fields(DataArguments)} - {"dataset_use", "eval_dataset_use", "dataset_registry",
                                                        "data_flatten", "data_packing"}  # fmt: skip
    settings, sources = _from_hf_configs(folder, family), []
    if settings:
        sources.append("preprocessor_config.json")
    for name in (VISION_FILE, RUN_ARGS_FILE):
        if (folder / name).is_file():
            recorded = json.loads((folder / name).read_text(encoding="utf-8"))
            settings.update({k: v for k, v in recorded.items() if k in names})
            sources.append(name)
    return {k: v for k, v in settings.items() if k in names}, sources


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
    (out / VISION_FILE).write_text(json.dumps(asdict(settings), indent=2), encoding="utf-8")
    return out
