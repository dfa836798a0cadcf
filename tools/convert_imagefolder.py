"""Turn an image-classification set into qwen-vl-finetune JSON splits plus a dataset registry.

Class-per-folder layout (root/<class>/<image>, e.g. Oxford Flowers 102 sorted by class):

    python tools/convert_imagefolder.py --root flowers/ --output_dir flowers_json/

Or a CSV of image paths and labels (paths relative to --image_root, default the CSV's folder):

    python tools/convert_imagefolder.py --csv labels.csv --image_col file --label_col label \\
        --class_names names.txt --label_base 1 --output_dir flowers_json/

Every sample is one question and one answer, the class name:
    {"image": "<path relative to the image root>",
     "conversations": [{"from": "human", "value": "<image>\\n<prompt>"}, {"from": "gpt", "value": "<class>"}]}
`--prompt_template` may use `{classes}`, replaced by the comma-separated class list. The split is
stratified: each class is shuffled with `--seed` and cut by the `--split` ratios (normalised; `0.8,0.1,0.1`
= `8,1,1`), then each split is shuffled. Written to --output_dir: `train.json` / `val.json` / `test.json`
(non-empty splits only), `classes.txt` and `registry.json` with entries `<name>_train`, ... for
`train_qwen.py --dataset_registry <output_dir>/registry.json --dataset_use <name>_train`.
With --class_names, numbered class folders (1..102) or integer CSV labels are looked up in it.
Exit code: 0 done, 1 done but some CSV rows or folders were skipped (listed), 2 nothing written (error shown).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl.constants import IMAGE_TAG  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_PROMPT = "What is shown in this image? Answer with one of these classes: {classes}."


class ConversionError(ValueError):
    """Input that leaves nothing to convert; shown as one message, exit code 2."""


@dataclass
class LabelledImages:
    """Images (paths relative to `image_root`) grouped by class, plus the rows that could not be used."""

    image_root: Path
    classes: list[str]
    by_class: dict[str, list[str]]
    skipped: list[str]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", help="class-per-folder image root: root/<class>/<image>")
    source.add_argument("--csv", help="CSV file with an image path column and a label column")
    parser.add_argument("--image_col", default="image", help="CSV column with image paths (default: image)")
    parser.add_argument("--label_col", default="label", help="CSV column with labels (default: label)")
    parser.add_argument(
        "--image_root", default=None, help="folder the CSV image paths are relative to (default: the CSV's folder)"
    )
    parser.add_argument(
        "--class_names",
        default=None,
        help="text file, one class name per line: integer labels or folder names index it (see --label_base); "
        "other labels must appear in it; its order is the class order",
    )
    parser.add_argument(
        "--label_base", type=int, default=0, help="value of the first integer label (1 for Oxford Flowers' 1..102)"
    )
    parser.add_argument(
        "--keep_underscores", action="store_true", help="keep '_' in folder class names (default: shown as spaces)"
    )
    parser.add_argument("--output_dir", required=True, help="where the split files, classes.txt and registry.json go")
    parser.add_argument(
        "--name", default=None, help="dataset name prefix in the registry (default: the root folder or CSV stem)"
    )
    parser.add_argument(
        "--prompt_template",
        default=DEFAULT_PROMPT,
        help=f"question text; {{classes}} is replaced (default: {DEFAULT_PROMPT!r})",
    )
    parser.add_argument(
        "--split",
        default="0.8,0.1,0.1",
        help="train,val[,test] ratios, any non-negative numbers (default: 0.8,0.1,0.1)",
    )
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed (default: 42)")
    return parser.parse_args(argv)


def parse_split(text: str) -> list[float]:
    """`0.8,0.1,0.1` or `8,1,1` -> fractions summing to 1 (1 to 3 parts: train, val, test)."""
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError as exc:
        raise ConversionError(f"--split {text!r}: expected comma-separated numbers") from exc
    if not 1 <= len(parts) <= len(SPLIT_NAMES) or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConversionError(f"--split {text!r}: 1 to 3 non-negative ratios (train,val,test), not all zero")
    total = sum(parts)
    return [p / total for p in parts]


def split_counts(n: int, fractions: list[float]) -> list[int]:
    """Largest-remainder rounding: counts summing to exactly n, each within one of n*fraction."""
    exact = [n * f for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_split(by_class: dict[str, list[str]], fractions: list[float], seed: int) -> list[list[tuple[str, str]]]:
    """(image, class) pairs per split: every class cut by the ratios after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    splits: list[list[tuple[str, str]]] = [[] for _ in fractions]
    for name in sorted(by_class):
        images = sorted(by_class[name])
        order = rng.permutation(len(images))
        start = 0
        for split, count in zip(splits, split_counts(len(images), fractions)):
            split.extend((images[i], name) for i in order[start : start + count])
            start += count
    return [[split[i] for i in rng.permutation(len(split))] for split in splits]


def natural_key(name: str) -> list:
    """'2' before '10': digit runs compare as numbers (split() alternates text and digits, so types line up)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def scan_folders(root: Path, keep_underscores: bool, names: list[str] | None, base: int) -> LabelledImages:
    """root/<class>/**/<image>: the class is the first folder level, nested folders are kept in the path.

    Folder names are the class names ('_' shown as spaces unless `keep_underscores`), or, with
    --class_names, are looked up in it like CSV labels (numbered folders such as Flowers' 1..102).
    """
    if not root.is_dir():
        raise ConversionError(f"--root {root}: not a folder")
    by_class: dict[str, list[str]] = {}
    skipped = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        images = [
            path.relative_to(root).as_posix()
            for path in sorted(folder.rglob("*"))
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not images:
            continue
        try:
            label = _label_to_class(folder.name, names, base) if names else folder.name
        except ValueError as exc:
            skipped.append(f"folder {folder.name} ({len(images)} images): {exc}")
            continue
        by_class.setdefault(label if keep_underscores or names else label.replace("_", " "), []).extend(images)
    if not by_class:
        raise ConversionError(f"--root {root}: no class folders with images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    classes = [n for n in names if n in by_class] if names else list(by_class)
    return LabelledImages(root, classes, by_class, skipped)


def _read_class_names(path: str | None) -> list[str] | None:
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConversionError(f"--class_names {file}: file not found")
    try:
        names = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise ConversionError(f"--class_names {file}: not UTF-8 text: {exc}") from exc
    if not names:
        raise ConversionError(f"--class_names {file}: no names in it")
    return names


def _label_to_class(label: str, names: list[str] | None, base: int) -> str:
    """The class name of a CSV label; ValueError with the reason when it cannot be mapped."""
    if names is None:
        return label
    if label in names:
        return label
    try:
        index = int(label) - base
    except ValueError:
        raise ValueError(f"label {label!r} is not in --class_names") from None
    if not 0 <= index < len(names):
        raise ValueError(f"label {label} is outside --class_names ({len(names)} names, --label_base {base})")
    return names[index]


def read_csv_labels(args: argparse.Namespace) -> LabelledImages:
    """Rows of the CSV with an existing image and a known label; the others listed with their line numbers."""
    csv_path = Path(args.csv)
    if not csv_path.is_file():
        raise ConversionError(f"--csv {csv_path}: file not found")
    image_root = Path(args.image_root) if args.image_root else csv_path.resolve().parent
    names = _read_class_names(args.class_names)
    try:
        return _read_rows(csv_path, image_root, names, args)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConversionError(f"--csv {csv_path}: not a readable UTF-8 CSV file: {exc}") from exc


def _read_rows(csv_path: Path, image_root: Path, names: list[str] | None, args: argparse.Namespace) -> LabelledImages:
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(handle)
        missing = [c for c in (args.image_col, args.label_col) if c not in (reader.fieldnames or [])]
        if missing:
            raise ConversionError(f"--csv {csv_path}: no column {', '.join(missing)} (columns: {reader.fieldnames})")
        by_class: dict[str, list[str]] = {}
        skipped = []
        for row in reader:
            line = reader.line_num
            image = (row[args.image_col] or "").strip()
            label = (row[args.label_col] or "").strip()
            if not image or not label:
                skipped.append(f"line {line}: empty image or label")
                continue
            if not (image_root / image).is_file():
                skipped.append(f"line {line}: image not found: {image_root / image}")
                continue
            try:
                by_class.setdefault(_label_to_class(label, names, args.label_base), []).append(Path(image).as_posix())
            except ValueError as exc:
                skipped.append(f"line {line}: {exc}")
    if not by_class:
        raise ConversionError(f"--csv {csv_path}: no usable rows" + (f" ({skipped[0]}, ...)" if skipped else ""))
    classes = [n for n in names if n in by_class] if names else sorted(by_class, key=natural_key)
    return LabelledImages(image_root, classes, by_class, skipped)


def make_sample(image: str, label: str, prompt: str) -> dict:
    return {
        "image": image,
        "conversations": [{"from": "human", "value": f"{IMAGE_TAG}\n{prompt}"}, {"from": "gpt", "value": label}],
    }


def write_outputs(data: LabelledImages, splits: list[list[tuple[str, str]]], prompt: str, out: Path, name: str) -> dict:
    """Split files, classes.txt and registry.json; returns the registry written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in data.classes), encoding="utf-8")
    data_path = os.path.relpath(data.image_root.resolve(), out.resolve())
    registry = {}
    for split_name, pairs in zip(SPLIT_NAMES, splits):
        if not pairs:
            continue
        samples = [make_sample(image, label, prompt) for image, label in pairs]
        text = json.dumps(samples, indent=1, ensure_ascii=False) + "\n"
        (out / f"{split_name}.json").write_text(text, encoding="utf-8")
        registry[f"{name}_{split_name}"] = {"annotation_path": f"{split_name}.json", "data_path": data_path}
    (out / "registry.json").write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    return registry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        fractions = parse_split(args.split)
        if args.root:
            names = _read_class_names(args.class_names)
            data = scan_folders(Path(args.root), args.keep_underscores, names, args.label_base)
        else:
            data = read_csv_labels(args)
    except ConversionError as exc:
        print(f"[convert_imagefolder] error: {exc}", file=sys.stderr)
        return 2
    name = args.name or (Path(args.root).resolve().name if args.root else Path(args.csv).stem)
    prompt = args.prompt_template.replace("{classes}", ", ".join(data.classes))
    splits = stratified_split(data.by_class, fractions, args.seed)
    try:
        registry = write_outputs(data, splits, prompt, Path(args.output_dir), name)
    except OSError as exc:
        print(f"[convert_imagefolder] error: cannot write to {args.output_dir}: {exc}", file=sys.stderr)
        return 2
    for problem in data.skipped:
        print(f"[convert_imagefolder] skipped {problem}", file=sys.stderr)
    sizes = [len(data.by_class[c]) for c in data.classes]
    counts = ", ".join(f"{s} {len(pairs)}" for s, pairs in zip(SPLIT_NAMES, splits))
    print(
        f"[convert_imagefolder] {sum(sizes)} images in {len(data.classes)} classes "
        f"({min(sizes)}..{max(sizes)} per class) -> {counts}; skipped {len(data.skipped)}; "
        f"registry {Path(args.output_dir) / 'registry.json'}: {', '.join(registry)}"
    )
    return 1 if data.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
