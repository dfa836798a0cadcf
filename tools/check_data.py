"""Check annotation files before training: training's own verdict on every sample, all problems at once.

    python tools/check_data.py data/train.jsonl data/val.json --model_path Qwen2.5-VL-3B-Instruct
    python tools/check_data.py --dataset_use my_set,other%50 --dataset_registry registry.json \\
        --model_path DIR --model_max_length 4096 --pack_length 8192 --max_pixels 1003520

Every item goes through exactly what training runs on it (`qwenvl.data.validation.load_item`: parsing,
media decoding, tokenisation and the `--model_max_length` cut) with the training flags and their
training defaults, so a sample is a problem here exactly when training would stop on it, or skip it
with --skip_bad_samples, and the reason is the same text. Datasets are read as training reads them: a
dataset that selects no samples (an empty file, `%0`), a missing file or a JSON list that does not
parse stops training whatever the flags. Without --model_path only the structure and the media are
checked (token lengths need the model's tokenizer). Every sample of a file is checked, whatever its %N.

With --model_path the token length of each valid sample (before the cut) is summarised: min/median/
p95/max, how many exceed --model_max_length and --pack_length, and a text histogram.

Writes `<stem>_valid.json` (the valid samples, unchanged) and `<stem>_problems.json` (a list of
{index, line (JSONL only), kind, reason}; index is the 0-based sample position in the file) beside each
input, or in --output_dir. Exit code, as training with the same flags: 0 training would run (skipping
the bad samples with --skip_bad_samples; the count is printed), 2 training would stop (a bad sample
without --skip_bad_samples, an unusable dataset, nothing valid at all) or the check could not run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl.cli_args import dataclass_from_args, parse_bool  # noqa: E402
from qwenvl.data.annotations import apply_rate, read_dataset  # noqa: E402
from qwenvl.data.arguments import DataArguments  # noqa: E402
from qwenvl.data.dataset import SampleEncoder, SupervisedDataset  # noqa: E402
from qwenvl.data.errors import PROBLEM_KINDS, DatasetError, SampleError, nothing_to_train  # noqa: E402
from qwenvl.data.pipeline import add_data_flags, build_encoder, dataset_configs, vision_settings  # noqa: E402
from qwenvl.data.validation import ItemCheck, check_item, check_item_in_worker, init_worker  # noqa: E402
from qwenvl.errors import UserError  # noqa: E402
from qwenvl.train.argument import TrainingArguments  # noqa: E402
from qwenvl.train.validation import validate_data_args, validate_model_folder, validate_training_args  # noqa: E402

HISTOGRAM_BINS = 10
HISTOGRAM_WIDTH = 40
NO_MODEL_FAMILY = "qwen2.5vl"  # media checks without --model_path use this family's vision defaults


@dataclass
class Problem:
    index: int | None
    line: int | None
    kind: str
    reason: str

    @classmethod
    def of(cls, error: SampleError) -> "Problem":
        return cls(error.index, error.line, error.kind, error.reason)

    def to_json(self) -> dict:
        entry: dict = {"index": self.index}
        if self.line is not None:
            entry["line"] = self.line
        return {**entry, "kind": self.kind, "reason": self.reason}


@dataclass
class DatasetReport:
    name: str
    file: Path
    data_path: str
    sampling_rate: float
    n_samples: int = 0
    valid: list = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    videos: list[tuple[int, float]] = field(default_factory=list)
    stop: DatasetError | None = None  # the dataset itself is unusable: training stops whatever the flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainingArguments()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "annotations", nargs="*", help=".json/.jsonl annotation files (media relative to their folder or --data_path)"
    )
    parser.add_argument("--data_path", default=None, help="media folder for the annotation files given as arguments")
    parser.add_argument(
        "--dataset_use", default="", help="registered names or annotation paths, as train_qwen.py (%%N accepted)"
    )
    parser.add_argument("--dataset_registry", default=None, help="registry file for --dataset_use, as train_qwen.py")
    parser.add_argument(
        "--model_path", "--model_name_or_path", "-m", dest="model_path", default=None,
        help="model folder: tokenizer, template and processor settings, as train_qwen.py's --model_name_or_path",
    )  # fmt: skip
    parser.add_argument("--model_max_length", type=int, default=defaults.model_max_length,
                        help=f"as train_qwen.py (default: {defaults.model_max_length}, as training)")  # fmt: skip
    parser.add_argument("--skip_bad_samples", type=parse_bool, nargs="?", const=True, default=False,
                        help="as train_qwen.py: exit 0 when training would skip the bad samples and go on")  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed, help="as train_qwen.py (selects the %%N subsets)")
    parser.add_argument("--pack_length", type=int, default=None, help="report samples longer than this pack length")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where <stem>_valid.json and <stem>_problems.json go (default: beside each input)",
    )
    parser.add_argument("--num_workers", type=int, default=1, help="processes checking samples (default: 1)")
    parser.add_argument(
        "--show", type=int, default=10, help="problems printed per dataset (default: 10; all are in the problems file)"
    )
    add_data_flags(parser)
    args = parser.parse_args(argv)
    if not args.annotations and not args.dataset_use:
        parser.error("give annotation files, --dataset_use, or both")
    return args


def all_configs(args: argparse.Namespace, data_args: DataArguments) -> list[dict]:
    """Positional files and --dataset_use entries resolved like training; each file once."""
    configs = []
    for path in args.annotations:
        data_path = args.data_path if args.data_path is not None else str(Path(path).resolve().parent)
        configs.append({"name": path, "annotation_path": path, "data_path": data_path, "sampling_rate": 1.0})
    if args.dataset_use:
        configs.extend(dataset_configs(data_args))
    unique = {}
    for config in configs:
        unique.setdefault(str(Path(str(config["annotation_path"])).resolve()), config)
    return list(unique.values())


def setup(args: argparse.Namespace) -> tuple[list[dict], SampleEncoder]:
    """Flags validated as training validates them, datasets resolved, the training encoder built."""
    data_args = dataclass_from_args(DataArguments, args)
    validate_data_args(data_args)
    validate_training_args(TrainingArguments(model_max_length=args.model_max_length, seed=args.seed))
    configs = all_configs(args, data_args)
    if args.model_path is None:
        settings = vision_settings(None, NO_MODEL_FAMILY, data_args)
        return configs, SampleEncoder(None, settings, NO_MODEL_FAMILY, system_prompt=data_args.system_prompt)
    validate_model_folder(args.model_path, weights=False)
    return configs, build_encoder(args.model_path, data_args, args.model_max_length)


def check_items(dataset: SupervisedDataset, workers: int, label: str) -> list[ItemCheck]:
    """`check_item` for every item, in `workers` processes when > 1 (spawned: decord and tokenizers hold threads)."""
    indices = range(len(dataset))
    progress = {"desc": f"check {label}", "unit": "sample", "disable": None, "total": len(dataset)}
    if workers > 1 and len(dataset) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, context, init_worker, (dataset,)) as pool:
            return list(tqdm(pool.map(check_item_in_worker, indices, chunksize=4), **progress))
    return [check_item(dataset, i) for i in tqdm(indices, **progress)]


def check_dataset(config: dict, encoder: SampleEncoder, args: argparse.Namespace) -> DatasetReport:
    """Read the file as training does, refuse what training refuses, then check every item."""
    file = Path(str(config["annotation_path"]))
    data_path = str(config.get("data_path") or "")
    report = DatasetReport(str(config["name"]), file, data_path, float(config.get("sampling_rate", 1.0)))
    try:
        records = read_dataset(config, skip_bad=True)
        apply_rate(records, config, args.seed)
    except DatasetError as exc:
        report.stop = exc
        report.problems.append(Problem.of(exc))
        return report
    report.n_samples = len(records)
    results = check_items(SupervisedDataset(records, encoder), args.num_workers, file.name)
    for record, result in zip(records, results):
        if result.error is not None:
            report.problems.append(Problem.of(result.error))
            continue
        report.valid.append(record.item)
        report.videos.extend(result.videos)
        if result.tokens is not None:
            report.lengths.append(result.tokens)
    return report


def output_paths(report: DatasetReport, output_dir: str | None, taken: set[str]) -> tuple[Path, Path]:
    """`<stem>_valid.json` and `<stem>_problems.json`; a stem already used in --output_dir gets a number."""
    folder = Path(output_dir) if output_dir else report.file.parent
    stem, number = report.file.stem, 2
    while str(folder / stem) in taken:
        stem, number = f"{report.file.stem}_{number}", number + 1
    taken.add(str(folder / stem))
    return folder / f"{stem}_valid.json", folder / f"{stem}_problems.json"


def length_stats(lengths: list[int]) -> dict[str, float]:
    values = np.asarray(lengths)
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": int(values.max()),
    }


def histogram(lengths: list[int]) -> list[str]:
    """Equal-width bins over [min, max] (at most one per integer), a '#' bar per bin scaled to the fullest.

    numpy's bins are half-open [low, high) except the last, so a bin holds the integers ceil(low) to
    ceil(high) - 1, and the last one up to max.
    """
    counts, edges = np.histogram(lengths, bins=min(HISTOGRAM_BINS, max(lengths) - min(lengths) + 1))
    top = max(counts)
    lines = []
    for i, count in enumerate(counts):
        last = i == len(counts) - 1
        low, high = int(np.ceil(edges[i])), int(np.floor(edges[i + 1]) if last else np.ceil(edges[i + 1]) - 1)
        bar = "#" * int(round(HISTOGRAM_WIDTH * count / top))
        lines.append(f"  {low:>8} - {high:>8} | {bar} {count}")
    return lines


def summary_table(reports: list[DatasetReport], args: argparse.Namespace) -> list[str]:
    headers = ["dataset", "samples", "valid", "problems", "min", "median", "p95", "max"]
    headers.append(f">{args.model_max_length}")
    headers.append(f">{args.pack_length}" if args.pack_length else ">pack")
    rows = []
    for report in reports:
        row = [report.name, report.n_samples, len(report.valid), len(report.problems)]
        if report.lengths:
            stats = length_stats(report.lengths)
            row += [stats["min"], f"{stats['median']:.0f}", f"{stats['p95']:.0f}", stats["max"]]
        else:
            row += ["-"] * 4
        for limit in (args.model_max_length, args.pack_length):
            row.append(sum(n > limit for n in report.lengths) if limit and report.lengths else "-")
        rows.append([str(x) for x in row])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        """Dataset names left-aligned, numbers right-aligned."""
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def describe(report: DatasetReport, show: int) -> list[str]:
    """Problem kinds, the first problems, video facts and the length histogram of one dataset."""
    where = f"{report.file}; media in {report.data_path or '.'}; training rate {report.sampling_rate:g}"
    lines = [f"== {report.name} ({where})"]
    kinds = {kind: sum(p.kind == kind for p in report.problems) for kind in PROBLEM_KINDS}
    if report.problems:
        lines.append("problems: " + ", ".join(f"{kind} {n}" for kind, n in kinds.items() if n))
        for problem in report.problems[:show]:
            where = f"sample {problem.index}" if problem.index is not None else "file"
            where += f" (line {problem.line})" if problem.line is not None else ""
            lines.append(f"  {where}: [{problem.kind}] {problem.reason}")
        if len(report.problems) > show:
            lines.append(f"  ... {len(report.problems) - show} more in the problems file")
    if report.videos:
        frames = [f for f, _ in report.videos]
        fps = [r for _, r in report.videos]
        spread = f"frames {min(frames)}..{max(frames)}, fps {min(fps):.2f}..{max(fps):.2f}"
        lines.append(f"videos: {len(report.videos)} uses, {spread}")
    if report.lengths:
        lines.append("token lengths:")
        lines.extend(histogram(report.lengths))
    return lines


def training_verdict(reports: list[DatasetReport], skip_bad: bool) -> tuple[int, str]:
    """What train_qwen.py does with these datasets and flags: its exit code and one line saying why."""
    stopped = [report.stop for report in reports if report.stop is not None]
    if stopped:
        return 2, f"training would stop: {stopped[0].one_line()}"
    bad = sum(len(report.problems) for report in reports)
    if not bad:
        return 0, f"no problems: training would use all {sum(r.n_samples for r in reports)} samples"
    if not skip_bad:
        return 2, (f"training would stop at the first of {bad} bad samples it meets "
                   "(fix them, train on the valid files, or pass --skip_bad_samples)")  # fmt: skip
    if not any(report.valid for report in reports):
        return 2, f"training would stop: {nothing_to_train(bad).one_line()}"
    return 0, f"training would skip {bad} bad samples (--skip_bad_samples) and train on the others"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        configs, encoder = setup(args)
    except (UserError, OSError) as exc:  # bad flag or model folder, unknown dataset, unreadable registry or tokenizer
        message = exc.one_line() if isinstance(exc, UserError) else " ".join(str(exc).split())
        print(f"[check_data] error: {message}", file=sys.stderr)
        return 2
    reports = [check_dataset(config, encoder, args) for config in configs]
    taken: set[str] = set()
    for report in reports:
        print("\n".join(describe(report, args.show)))
        valid_path, problems_path = output_paths(report, args.output_dir, taken)
        try:
            valid_path.parent.mkdir(parents=True, exist_ok=True)
            valid_path.write_text(json.dumps(report.valid, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            problems = [p.to_json() for p in report.problems]
            problems_path.write_text(json.dumps(problems, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"[check_data] error: cannot write the reports: {exc} (use --output_dir)", file=sys.stderr)
            return 2
        print(f"wrote {valid_path} ({len(report.valid)} samples), {problems_path} ({len(report.problems)} problems)\n")
    print("\n".join(summary_table(reports, args)))
    if encoder.tokenizer is None:
        print("(token lengths and --model_max_length need --model_path: structure and media checked only)")
    code, verdict = training_verdict(reports, args.skip_bad_samples)
    print(f"[check_data] {verdict}", file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
