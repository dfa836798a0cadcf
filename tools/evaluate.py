"""Generation-based evaluation of a (fine-tuned) model on a test set in the training JSON format.

    python tools/evaluate.py --model DIR --dataset_use test.json [--adapter LORA_DIR] [--task auto]
    python tools/evaluate.py --model LORA_RUN_DIR --dataset_use test.json   # base from adapter_config.json

The model is asked with the data settings it was trained with (pixel limits, video rules, system prompt
from its args.json / processor files); a flag given here overrides one. For each sample the model
answers the conversation up to its last assistant turn, which is the reference. Short answers
(classification) are scored by exact match after normalisation (case, outer whitespace and final
punctuation), reported as accuracy overall and per reference class. Grounding
answers (`bbox_2d` JSON or Qwen2-VL box tokens, in the model's own coordinate convention) are scored per
reference box with one-to-one IoU matching: mean IoU, median IoU, detection rate (a box matched with
IoU > 0), and the share with IoU > 0.5 and > 0.7. `--task auto` picks grounding when a reference holds
boxes. Answers that reach --max_new_tokens without ending are counted (`hit_max_new_tokens`, with a
warning): they may be cut. Writes eval_results.json (metrics, the settings used and every prediction
with its vision-token count) into the adapter's or the model's folder, or --output, and prints a table.
A sample that cannot be read (missing image, bad tags) is reported and counted, never fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer import add_generation_flags, add_model_flags, generation_config, hit_limit_warning  # noqa: E402

from qwenvl.infer.model_source import ModelSource, ModelSourceError, model_data_args, resolve_model  # noqa: E402

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
    add_model_flags(parser)
    parser.add_argument("--dataset_use", required=True, help="test sets: registered names or .json/.jsonl paths")
    parser.add_argument("--dataset_registry", default=None, help="registry file for --dataset_use names")
    parser.add_argument("--task", choices=TASKS, default="auto", help="scoring (default: auto)")
    parser.add_argument("--max_samples", type=int, default=0, help="evaluate the first N samples only (0: all)")
    parser.add_argument("--output", default=None,
                        help="results JSON (default: eval_results.json in the adapter's folder, else the model's)")
    add_generation_flags(parser)
    return parser.parse_args(argv)


def _records(args: argparse.Namespace):
    from qwenvl.data import data_list, load_registry_file
    from qwenvl.data.annotations import load_records

    registry = load_registry_file(args.dataset_registry) if args.dataset_registry else None
    records = load_records(data_list(args.dataset_use, registry), seed=0)
    return records[: args.max_samples] if args.max_samples > 0 else records


def _predict(args: argparse.Namespace, source: ModelSource, data_args, records) -> tuple[list[dict], list[dict]]:
    """(predictions, unreadable samples): each sample answered up to its last assistant turn."""
    from qwenvl.data.annotations import parse_record
    from qwenvl.data.errors import SampleError
    from qwenvl.infer.generate import load_generator

    generator = load_generator(str(source.base), data_args, str(source.adapter) if source.adapter else None)
    config = generation_config(args)
    predictions, problems = [], []
    for n, record in enumerate(records, 1):
        try:
            sample = parse_record(record)[0]
            reference = sample.messages[-1][1] if sample.messages[-1][0] == "assistant" else ""
            answer = generator.answer(sample, config)
        except SampleError as exc:
            problems.append({"file": record.file, "index": record.index, "reason": exc.reason})
            print(f"[evaluate] skipped: {exc}", file=sys.stderr)
            continue
        predictions.append({"file": record.file, "index": record.index, "reference": reference,
                            "prediction": answer.text, "new_tokens": answer.new_tokens,
                            "hit_max_new_tokens": answer.hit_limit, "vision_tokens": answer.vision_tokens})  # fmt: skip
        print(f"[evaluate] {n}/{len(records)}", end="\r", flush=True)
    return predictions, problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qwenvl.infer.grounding import grounding_metrics, match_ious, parse_boxes
    from qwenvl.runtime import graph_mode, select_device

    try:
        source = resolve_model(args.model, args.adapter, args.base)
        data_args, settings_line = model_data_args(source, args)
        records = _records(args)
    except (ModelSourceError, ValueError, OSError) as exc:
        print(f"[evaluate] error: {exc}", file=sys.stderr)
        return 2
    print(f"[evaluate] {settings_line}")
    with graph_mode():
        select_device()
        predictions, problems = _predict(args, source, data_args, records)
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
    metrics["hit_max_new_tokens"] = sum(p["hit_max_new_tokens"] for p in predictions)
    output = Path(args.output) if args.output else source.trained / "eval_results.json"
    settings = {"model": str(source.base), "adapter": str(source.adapter) if source.adapter else None,
                "max_new_tokens": args.max_new_tokens, **asdict(data_args)}  # fmt: skip
    results = {"task": task, "metrics": metrics, "settings": settings, "problems": problems, "predictions": predictions}
    output.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\n{'metric':<24}{'value':>12}")
    for key, value in metrics.items():
        if isinstance(value, dict):
            for name, v in value.items():
                print(f"{key + '/' + name:<24}{v:>12.4f}")
        else:
            print(f"{key:<24}{value:>12.4f}" if isinstance(value, float) else f"{key:<24}{value:>12}")
    if metrics["hit_max_new_tokens"]:
        print(f"[evaluate] {hit_limit_warning(metrics['hit_max_new_tokens'], len(predictions), args.max_new_tokens)}")
    print(f"[evaluate] {task}: results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
