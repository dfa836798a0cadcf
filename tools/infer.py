"""Ask a (fine-tuned) Qwen-VL model about an image or a video, on CPU or Ascend.

    python tools/infer.py --model DIR --image X.jpg --prompt "What is in the image?"
    python tools/infer.py --model DIR --adapter LORA_DIR --image X.jpg --prompt "Locate the cat..." --draw boxes.png
    python tools/infer.py --model LORA_RUN_DIR --image X.jpg --prompt "..."   # base from adapter_config.json

Greedy decoding by default; `--do_sample` with `--temperature`, `--top_p`, `--top_k`, `--seed`. When the
answer holds grounding boxes (`bbox_2d` JSON, or Qwen2-VL box tokens) they are printed in pixels of the
original image and, with `--draw`, outlined on it (PNG). The prompt goes through the training template
with the data settings the model was trained with (pixel limits, video rules, system prompt, read from
its folder; the same flags as training override them), so a fine-tune is asked the way it was taught and
Qwen2.5-VL boxes are scaled back with the limits the model saw. An answer that reaches
--max_new_tokens without ending gets a warning: it may be cut.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl.infer.model_source import (  # noqa: E402
    ModelSourceError,
    add_model_data_flags,
    model_data_args,
    resolve_model,
)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model/--adapter/--base and the data flags, which default to the model's own settings."""
    parser.add_argument("--model", required=True, help="model folder, or a LoRA run folder (then its base is read "
                        "from adapter_config.json, or given with --base)")  # fmt: skip
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder trained on --model (merged in memory)")
    parser.add_argument("--base", default=None, help="base model folder when --model is a LoRA folder")
    add_model_data_flags(parser)


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max_new_tokens", type=int, default=128, help="longest answer in tokens (default: 128)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (default: 0, off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")


def generation_config(args: argparse.Namespace):
    from qwenvl.infer.generate import GenerationConfig

    return GenerationConfig(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.top_k, args.seed)


def hit_limit_warning(hits: int, answers: int, max_new_tokens: int) -> str:
    which = "the answer" if answers == 1 else f"{hits} of {answers} answers"
    return f"warning: {which} reached --max_new_tokens {max_new_tokens} without ending and may be cut: raise it"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--video", action="append", default=[], help="video file (repeat for several)")
    parser.add_argument("--prompt", required=True, help="the question; <image>/<video> tags optional (prepended)")
    parser.add_argument("--draw", default=None, help="PNG path: draw the answer's boxes on the first image")
    add_generation_flags(parser)
    return parser.parse_args(argv)


def build_question(prompt: str, n_images: int, n_videos: int) -> str:
    """The prompt with one tag per media file, prepended where the user wrote none."""
    tags = ""
    if "<image>" not in prompt:
        tags += "<image>\n" * n_images
    if "<video>" not in prompt:
        tags += "<video>\n" * n_videos
    return tags + prompt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [p for p in [*args.image, *args.video] if not Path(p).is_file()]
    if missing:
        print(f"[infer] error: file not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        source = resolve_model(args.model, args.adapter, args.base)
        data_args, settings_line = model_data_args(source, args)
    except (ModelSourceError, ValueError) as exc:
        print(f"[infer] error: {exc}", file=sys.stderr)
        return 2
    print(f"[infer] {settings_line}")
    from qwenvl.runtime import graph_mode, select_device

    with graph_mode():
        select_device()
        return _answer(args, source, data_args)


def _answer(args: argparse.Namespace, source, data_args) -> int:
    from qwenvl.data.annotations import parse_sample
    from qwenvl.data.errors import SampleError
    from qwenvl.data.image_processing import image_size
    from qwenvl.infer.generate import load_generator
    from qwenvl.infer.grounding import draw_boxes, parse_boxes, pixel_scale

    generator = load_generator(str(source.base), data_args, str(source.adapter) if source.adapter else None)
    question = build_question(args.prompt, len(args.image), len(args.video))
    item = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]}
    if args.image:
        item["images"] = args.image
    if args.video:
        item["videos"] = args.video
    try:
        answer = generator.answer(parse_sample(item), generation_config(args))
    except SampleError as exc:
        print(f"[infer] error: {exc}", file=sys.stderr)
        return 2
    print(answer.text)
    if answer.hit_limit:
        print(f"[infer] {hit_limit_warning(1, 1, args.max_new_tokens)}", file=sys.stderr)
    boxes = parse_boxes(answer.text)
    if boxes and args.image:
        height, width = image_size(args.image[0])
        sx, sy = pixel_scale(generator.encoder.family, width, height, generator.encoder.settings)
        for box in boxes:
            print(f"[infer] box {box.label or '-'}: ({box.x1 * sx:.0f}, {box.y1 * sy:.0f}, {box.x2 * sx:.0f}, {box.y2 * sy:.0f}) px")
        if args.draw:
            print(f"[infer] boxes drawn on {draw_boxes(args.image[0], boxes, args.draw, (sx, sy))}")
    elif args.draw:
        print("[infer] no boxes in the answer; nothing drawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
