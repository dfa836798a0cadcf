"""Generation-based evaluation of a (fine-tuned) model on a test set in the training JSON format.

    python tools/evaluate.py --model DIR --dataset_use test.json [--adapter LORA_DIR] [--task auto]

For each sample the model answers the conversation up to its last assistant turn, which is the
reference. Short answers (classification) are scored by exact match after normalisation (case, outer
whitespace and final punctuation), reported as accuracy overall and per reference class. Grounding
answers (`bbox_2d` JSON or Qwen2-VL box tokens, in the model's own coordinate convention) are scored per
reference box with one-to-one IoU matching: mean IoU, median IoU, detection rate (a box matched with
IoU > 0), and the share with IoU > 0.5 and > 0.7. `--task auto` picks grounding when a reference holds
boxes. Writes `<output>.json` (metrics + every prediction) and prints a table. A sample that cannot be
read (missing image, bad tags) is reported and counted, never fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer import add_generation_flags, generation_config  # noqa: E402

from qwenvl.cli_args import dataclass_from_args  # noqa: E402
from qwenvl.data.arguments import DataArguments  # noqa: E402
from qwenvl.data.pipeline import add_data_flags  # noqa: E402

TASKS = ("auto", "classification", "grounding")


def normalise(text: str) -> str:
    return text.strip().strip(".!。").strip().lower()


def classification_metrics(pairs: list[tuple[str, str]]) -> dict:
    """Accuracy overall and per reference class from (prediction, reference) pairs."""
    per_class: dict[str, list[bool]] = defaultdict(list)
    for prediction, reference in pairs:
        per_class[normalise(reference)].append(normalise(prediction) == normalise(reference))
    hits = [h for values in per_class.values() for h in values]
    return {
        "samples": len(hits),
        "accuracy": sum(hits) / len(hits) if hits else 0.0,
        "per_class_accuracy": {c: sum(v) / len(v) for c, v in sorted(per_class.items())},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local model folder")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder trained on --model")
    parser.add_argument("--dataset_use", required=True, help="test sets: registered names or .json/.jsonl paths")
    parser.add_argument("--dataset_registry", default=None, help="registry file for --dataset_use names")
    parser.add_argument("--task", choices=TASKS, default="auto", help="scoring (default: auto)")
    parser.add_argument("--max_samples", type=int, default=0, help="evaluate the first N samples only (0: all)")
    parser.add_argument("--output", default=None, help="results JSON (default: <model>/eval_results.json)")
    add_generation_flags(parser)
    add_data_flags(parser)
    return parser.parse_args(argv)


def _records(args: argparse.Namespace):
    from qwenvl.data import data_list, load_registry_file
    from qwenvl.data.annotations import load_records

    registry = load_registry_file(args.dataset_registry) if args.dataset_registry else None
    records = load_records(data_list(args.dataset_use, registry), seed=0)
    return records[: args.max_samples] if args.max_samples > 0 else records


def _predict(args: argparse.Namespace, records) -> tuple[list[dict], list[dict]]:
    """(predictions, unreadable samples): each sample answered up to its last assistant turn."""
    from qwenvl.data.annotations import parse_record
    from qwenvl.data.errors import SampleError
    from qwenvl.infer.generate import load_generator

    generator = load_generator(args.model, dataclass_from_args(DataArguments, args), args.adapter)
    config = generation_config(args)
    predictions, problems = [], []
    for n, record in enumerate(records, 1):
        try:
            sample = parse_record(record)[0]
            reference = sample.messages[-1][1] if sample.messages[-1][0] == "assistant" else ""
            prediction = generator.answer(sample, config)
        except SampleError as exc:
            problems.append({"file": record.file, "index": record.index, "reason": exc.reason})
            print(f"[evaluate] skipped: {exc}", file=sys.stderr)
            continue
        predictions.append({"file": record.file, "index": record.index, "reference": reference, "prediction": prediction})
        print(f"[evaluate] {n}/{len(records)}", end="\r", flush=True)
    return predictions, problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qwenvl.infer.grounding import grounding_metrics, match_ious, parse_boxes
    from qwenvl.runtime import graph_mode, select_device

    try:
        records = _records(args)
    except (ValueError, OSError) as exc:
        print(f"[evaluate] error: {exc}", file=sys.stderr)
        return 2
    with graph_mode():
        select_device()
        predictions, problems = _predict(args, records)
    task = args.task
    if task == "auto":
        task = "grounding" if any(parse_boxes(p["reference"]) for p in predictions) else "classification"
    if task == "grounding":
        ious = []
        for p in predictions:
            p["ious"] = match_ious(parse_boxes(p["prediction"]), parse_boxes(p["reference"]))
            ious.extend(p["ious"])
        metrics = {"samples": len(predictions), **grounding_metrics(ious)}
    else:
        metrics = classification_metrics([(p["prediction"], p["reference"]) for p in predictions])
    metrics["unreadable_samples"] = len(problems)
    output = Path(args.output) if args.output else Path(args.model) / "eval_results.json"
    output.write_text(json.dumps({"task": task, "metrics": metrics, "problems": problems,
                                  "predictions": predictions}, indent=2, ensure_ascii=False), encoding="utf-8")  # fmt: skip
    print(f"\n{'metric':<24}{'value':>12}")
    for key, value in metrics.items():
        if isinstance(value, dict):
            for name, v in value.items():
                print(f"{key + '/' + name:<24}{v:>12.4f}")
        else:
            print(f"{key:<24}{value:>12.4f}" if isinstance(value, float) else f"{key:<24}{value:>12}")
    print(f"[evaluate] {task}: results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
