"""Check annotation files before training: every problem found at once, with where it is.

    python tools/check_data.py data/train.jsonl data/val.json --model_path Qwen2.5-VL-3B-Instruct
    python tools/check_data.py --dataset_use my_set,other%50 --dataset_registry registry.json \\
        --model_path DIR --model_max_length 4096 --pack_length 8192 --max_pixels 1003520

Per sample: JSON validity (a malformed JSONL line is reported with its line number and the other lines
are still checked), the sample structure (a `conversations` list of turns with from/value or
role/content, an assistant turn), `<image>`/`<video>` tags in the prompts equal to the number of media
files, no media tag inside an assistant answer, every image present and decodable (PIL verify + load),
every video present and decodable with decord (the frames training samples are decoded, by the
model's rule, or Qwen2.5-VL's default rule without --model_path; frame count and fps are reported).
With --model_path, the token length of each valid sample is counted by the training pipeline itself
(same tokenizer, template and pixel/video flags as train_qwen.py; no pixel decoding needed) and
summarised: min/median/p95/max, how many exceed --model_max_length and --pack_length, and a text
histogram. Every sample of a file is checked, whatever its %N rate.

Writes `<stem>_valid.json` (the valid samples, unchanged) and `<stem>_problems.json` (a list of
{index, line (JSONL only), kind, reason}; index is the 0-based sample position in the file) beside each
input, or in --output_dir. Exit code: 0 no problem, 1 problems found, 2 the check could not run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl.cli_args import dataclass_from_args  # noqa: E402
from qwenvl.constants import IMAGE_TAG, VIDEO_TAG  # noqa: E402
from qwenvl.data import data_list, load_registry_file  # noqa: E402
from qwenvl.data.annotations import AnnotationRecord, Sample, parse_record  # noqa: E402
from qwenvl.data.arguments import DataArguments  # noqa: E402
from qwenvl.data.errors import SampleError  # noqa: E402
from qwenvl.data.image_processing import VisionSettings  # noqa: E402
from qwenvl.data.pipeline import add_data_flags, build_encoder  # noqa: E402
from qwenvl.data.video_processing import read_video  # noqa: E402

PROBLEM_KINDS = (
    "annotation_file",
    "malformed_json",
    "structure",
    "tag_count",
    "tag_in_answer",
    "missing_media",
    "corrupt_media",
    "token_count",
)
HISTOGRAM_BINS = 10
HISTOGRAM_WIDTH = 40
_DECORD_LOCATION = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")  # "[09:49:08] src/x.cc:292: " in decord messages


@dataclass
class Problem:
    index: int | None
    line: int | None
    kind: str
    reason: str

    def to_json(self) -> dict:
        entry: dict = {"index": self.index}
        if self.line is not None:
            entry["line"] = self.line
        return {**entry, "kind": self.kind, "reason": self.reason}


@dataclass
class Entry:
    """One raw item of an annotation file: its sample position, its JSONL line, and the parsed JSON."""

    index: int
    line: int | None
    item: object


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
        "--model_path", "-m", default=None, help="model folder: token lengths with its tokenizer and processor settings"
    )
    parser.add_argument("--model_max_length", type=int, default=None, help="report samples longer than this")
    parser.add_argument("--pack_length", type=int, default=None, help="report samples longer than this pack length")
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where <stem>_valid.json and <stem>_problems.json go (default: beside each input)",
    )
    parser.add_argument("--num_workers", type=int, default=1, help="processes decoding media files (default: 1)")
    parser.add_argument(
        "--show", type=int, default=10, help="problems printed per dataset (default: 10; all are in the problems file)"
    )
    add_data_flags(parser)
    args = parser.parse_args(argv)
    if not args.annotations and not args.dataset_use:
        parser.error("give annotation files, --dataset_use, or both")
    return args


def dataset_configs(args: argparse.Namespace) -> list[dict]:
    """Positional files and --dataset_use entries resolved like training; each file once."""
    configs = []
    for path in args.annotations:
        data_path = args.data_path if args.data_path is not None else str(Path(path).resolve().parent)
        configs.append({"name": path, "annotation_path": path, "data_path": data_path, "sampling_rate": 1.0})
    if args.dataset_use:
        registry = load_registry_file(args.dataset_registry) if args.dataset_registry else None
        configs.extend(data_list(args.dataset_use, registry))
    unique = {}
    for config in configs:
        unique.setdefault(str(Path(str(config["annotation_path"])).resolve()), config)
    return list(unique.values())


def read_entries(path: Path) -> tuple[list[Entry], list[Problem]]:
    """Raw items of a JSON list or a JSONL file; JSONL lines that do not parse are problems, not stops."""
    if not path.is_file():
        return [], [Problem(None, None, "annotation_file", f"annotation file not found: {path}")]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem(None, None, "annotation_file", f"cannot read {path}: {exc}")]
    if path.suffix == ".jsonl":
        entries, problems = [], []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            index = len(entries) + len(problems)
            try:
                entries.append(Entry(index, line_no, json.loads(line)))
            except json.JSONDecodeError as exc:
                reason = f"malformed JSON: {exc.msg} at column {exc.colno}"
                problems.append(Problem(index, line_no, "malformed_json", reason))
        return entries, problems
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one sample per line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        reason = f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}{hint}"
        return [], [Problem(None, None, "malformed_json", reason)]
    if not isinstance(items, list):
        return [], [Problem(None, None, "annotation_file", "a JSON annotation file must hold a list of samples")]
    return [Entry(i, None, item) for i, item in enumerate(items)], []


@dataclass(frozen=True)
class MediaResult:
    """Outcome of decoding one media file: a problem kind and reason, or the video's frames and fps."""

    kind: str | None = None
    reason: str = ""
    frames: int | None = None
    fps: float | None = None


def check_image(path: str) -> MediaResult:
    if not Path(path).is_file():
        return MediaResult("missing_media", f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return MediaResult("corrupt_media", f"cannot decode image {path}: {type(exc).__name__}: {exc}")
    return MediaResult()


def check_video(path: str, settings: VisionSettings) -> MediaResult:
    """Open with decord and decode the frames training would sample."""
    if not Path(path).is_file():
        return MediaResult("missing_media", f"video not found: {path}")
    try:
        clip = read_video(path, settings)
    except Exception as exc:  # decord raises its own error types besides the pipeline's ValueError
        reason = (_DECORD_LOCATION.sub("", str(exc)).strip().splitlines() or [type(exc).__name__])[0]
        if path not in reason:
            reason = f"cannot decode video {path}: {reason}"
        return MediaResult("corrupt_media", reason)
    return MediaResult(frames=clip.meta.total_frames, fps=clip.meta.fps)


def check_media(kind: str, path: str, settings: VisionSettings) -> MediaResult:
    return check_image(path) if kind == "image" else check_video(path, settings)


class MediaChecker:
    """Decodes each media file once, however many samples use it, in `workers` processes when > 1."""

    def __init__(self, settings: VisionSettings, workers: int = 1):
        self.settings = settings
        self.workers = workers
        self._results: dict[tuple[str, str], MediaResult] = {}

    def prefetch(self, images: list[str], videos: list[str]) -> None:
        """Check every file not seen yet."""
        jobs = [("image", p) for p in dict.fromkeys(images)] + [("video", p) for p in dict.fromkeys(videos)]
        jobs = [job for job in jobs if job not in self._results]
        if not jobs:
            return
        if self.workers > 1 and len(jobs) > 1:
            # spawn, not fork: decord and the tokenizer hold threads that a fork would copy mid-state
            with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(check_media, kind, path, self.settings) for kind, path in jobs]
                results = [f.result() for f in tqdm(futures, desc="media", unit="file", disable=None)]
        else:
            progress = tqdm(jobs, desc="media", unit="file", disable=None)
            results = [check_media(kind, path, self.settings) for kind, path in progress]
        self._results.update(zip(jobs, results))

    def image(self, path: str) -> MediaResult:
        self.prefetch([path], [])
        return self._results[("image", path)]

    def video(self, path: str) -> MediaResult:
        self.prefetch([], [path])
        return self._results[("video", path)]


def _structure_kind(error: SampleError) -> str:
    return "tag_count" if "tag(s) in the prompt" in error.reason else "structure"


def _answer_tags(samples: list[Sample]) -> list[str]:
    found = []
    for sample in samples:
        for role, text in sample.messages:
            if role == "assistant":
                found.extend(tag for tag in (IMAGE_TAG, VIDEO_TAG) if tag in text and tag not in found)
    return found


def parse_entry(entry: Entry, report: DatasetReport) -> list[Sample] | Problem:
    """The samples of one item (a sample, or a pre-packed list of samples), or its structural problem."""
    try:
        return parse_record(AnnotationRecord(entry.item, report.data_path, str(report.file), entry.index))
    except SampleError as exc:
        return Problem(entry.index, entry.line, _structure_kind(exc), exc.reason)


def check_samples(
    entry: Entry, samples: list[Sample], report: DatasetReport, media: MediaChecker, encoder
) -> list[Problem]:
    """Every problem of one parsed item; records its token length when it has none."""
    problems = []
    tags = _answer_tags(samples)
    if tags:
        problems.append(Problem(entry.index, entry.line, "tag_in_answer", f"{', '.join(tags)} in an assistant answer"))
    for sample in samples:
        results = [media.image(path) for path in sample.images] + [media.video(path) for path in sample.videos]
        report.videos.extend((r.frames, r.fps) for r in results if r.frames is not None)
        problems.extend(Problem(entry.index, entry.line, r.kind, r.reason) for r in results if r.kind is not None)
    if problems or encoder is None:
        return problems
    try:
        report.lengths.append(sum(encoder.count_tokens(sample) for sample in samples))
    except Exception as exc:  # SampleError from the pipeline, or a decoder's own error type
        problems.append(Problem(entry.index, entry.line, "token_count", getattr(exc, "reason", str(exc))))
    return problems


def check_dataset(config: dict, media: MediaChecker, encoder) -> DatasetReport:
    """Parse every item, decode every media file once (in parallel), then check and count item by item."""
    file = Path(str(config["annotation_path"]))
    data_path = str(config.get("data_path") or "")
    report = DatasetReport(str(config["name"]), file, data_path, float(config.get("sampling_rate", 1.0)))
    entries, report.problems = read_entries(file)
    report.n_samples = len(entries) + sum(p.index is not None for p in report.problems)
    parsed = [(entry, parse_entry(entry, report)) for entry in entries]
    samples = [s for _, result in parsed if isinstance(result, list) for s in result]
    media.prefetch([p for s in samples for p in s.images], [p for s in samples for p in s.videos])
    for entry, result in tqdm(parsed, desc=f"check {file.name}", unit="sample", disable=None):
        problems = [result] if isinstance(result, Problem) else check_samples(entry, result, report, media, encoder)
        if problems:
            report.problems.extend(problems)
        else:
            report.valid.append(entry.item)
    report.problems.sort(key=lambda p: (-1 if p.index is None else p.index))
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
    headers.append(f">{args.model_max_length}" if args.model_max_length else ">max_len")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_args = dataclass_from_args(DataArguments, args)
    try:
        configs = dataset_configs(args)
        encoder = build_encoder(args.model_path, data_args, args.model_max_length) if args.model_path else None
    except Exception as exc:  # unknown name, unreadable registry (JSON/YAML), model folder the tokenizer rejects
        print(f"[check_data] error: {exc}", file=sys.stderr)
        return 2
    media = MediaChecker(encoder.settings if encoder else VisionSettings.for_family("qwen2.5vl"), args.num_workers)
    reports = [check_dataset(config, media, encoder) for config in configs]
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
    if encoder is None:
        print("(token lengths need --model_path)")
    return 1 if any(report.problems for report in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
