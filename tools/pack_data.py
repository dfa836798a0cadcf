"""Pack an annotation file into fixed-length packs for `--data_packing True`.

    python tools/pack_data.py --annotation_path data.json --model_path DIR --pack_length 4096

Token counts use the training pipeline itself (same tokenizer, template, pixel limits and video
rules as `train_qwen.py` with the same flags), read from image headers and video metadata without
decoding pixels. They are cached in `<stem>_count.json` beside the input and reused while the input
file and the settings are unchanged. The output `<stem>_pack.json` is a JSON list of packs, each a list
of the original samples, which the dataset registry accepts like any annotation file: relative media
paths are rewritten relative to the pack file's folder (absolute ones are kept), so it trains with
`--dataset_use path/to/<stem>_pack.json --data_packing True` wherever the media live (`--data_path`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl.data.annotations import parse_sample, read_annotation_file  # noqa: E402
from qwenvl.data.errors import SampleError  # noqa: E402
from qwenvl.data.packing import pack_lengths  # noqa: E402
from qwenvl.cli_args import dataclass_from_args  # noqa: E402
from qwenvl.data.arguments import DataArguments  # noqa: E402
from qwenvl.data.pipeline import add_data_flags, build_encoder  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation_path", "-a", required=True, help="input .json or .jsonl annotation file")
    parser.add_argument("--data_path", default=None, help="media folder (default: the annotation's folder)")
    parser.add_argument("--model_path", "-m", required=True, help="local model folder (tokenizer, processor, config)")
    parser.add_argument("--pack_length", type=int, default=4096, help="tokens per pack (default: 4096)")
    parser.add_argument(
        "--oversize",
        choices=("own_pack", "drop", "error"),
        default="own_pack",
        help="samples longer than pack_length: alone in their own pack (default), dropped and counted, or an error",
    )
    parser.add_argument(
        "--bad_samples",
        choices=("error", "skip"),
        default="error",
        help="a sample that cannot be counted (missing image, wrong tag count): stop with its error, or skip it",
    )
    parser.add_argument("--output", default=None, help="output file (default: <stem>_pack.json beside the input)")
    add_data_flags(parser)
    return parser.parse_args(argv)


def _settings_key(args: argparse.Namespace, encoder) -> str:
    """What the counts depend on: the input file's bytes and every setting that changes token counts."""
    digest = hashlib.sha256(Path(args.annotation_path).read_bytes()).hexdigest()
    settings = {"input": digest, "model": str(Path(args.model_path).resolve()), "vision": asdict(encoder.settings)}
    settings["family"] = encoder.family
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


MEDIA_KEYS = ("image", "images", "video", "videos")


def _data_path(args: argparse.Namespace) -> str:
    return args.data_path if args.data_path is not None else str(Path(args.annotation_path).resolve().parent)


def relocate_media(item: dict, data_path: str, pack_dir: Path) -> dict:
    """The sample with its relative media paths made relative to the pack file's folder instead of `data_path`."""

    def moved(path: str) -> str:
        if os.path.isabs(path):
            return path
        return os.path.relpath(Path(data_path).resolve() / path, pack_dir.resolve())

    out = dict(item)
    for key in MEDIA_KEYS:
        value = item.get(key)
        if isinstance(value, str):
            out[key] = moved(value)
        elif isinstance(value, list):
            out[key] = [moved(v) if isinstance(v, str) else v for v in value]
    return out


def count_tokens(args: argparse.Namespace, items: list, encoder) -> tuple[list[int | None], list[str]]:
    """Token count per sample (None for skipped bad samples) and the problems met."""
    data_path = _data_path(args)
    counts: list[int | None] = []
    problems = []
    for index, item in enumerate(items):
        try:
            counts.append(encoder.count_tokens(parse_sample(item, data_path, args.annotation_path, index)))
        except SampleError as exc:
            if args.bad_samples == "error":
                raise
            problems.append(str(exc))
            counts.append(None)
    return counts, problems


def cached_counts(args: argparse.Namespace, items: list, encoder) -> tuple[list[int | None], list[str]]:
    """Counts from `<stem>_count.json` when it matches the input and settings, otherwise computed and saved."""
    input_path = Path(args.annotation_path)
    cache = input_path.with_name(f"{input_path.stem}_count.json")
    key = _settings_key(args, encoder)
    if cache.is_file():
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            print(f"[pack_data] reusing token counts from {cache}")
            return cached["num_tokens"], cached["problems"]
    counts, problems = count_tokens(args, items, encoder)
    cache.write_text(json.dumps({"key": key, "num_tokens": counts, "problems": problems}), encoding="utf-8")
    return counts, problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    input_path = Path(args.annotation_path)
    try:
        items = read_annotation_file(input_path)
        encoder = build_encoder(args.model_path, dataclass_from_args(DataArguments, args))
        counts, problems = cached_counts(args, items, encoder)
    except SampleError as exc:
        print(f"[pack_data] error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"[pack_data] skipped: {problem}", file=sys.stderr)
    kept = [i for i, n in enumerate(counts) if n is not None]
    start = time.perf_counter()
    try:
        result = pack_lengths([counts[i] for i in kept], args.pack_length, oversize=args.oversize)
    except ValueError as exc:
        print(f"[pack_data] error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    output = Path(args.output) if args.output else input_path.with_name(f"{input_path.stem}_pack.json")
    packs = [[relocate_media(items[kept[j]], _data_path(args), output.parent) for j in pack] for pack in result.packs]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(packs, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(
        f"[pack_data] {len(kept)} samples -> {result.n_packs} packs of <= {args.pack_length} tokens "
        f"(fill ratio {result.fill_ratio:.4f}, oversize {len(result.oversize)}, dropped {len(result.dropped)}, "
        f"bad samples skipped {len(problems)}) in {seconds:.2f} s -> {output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
