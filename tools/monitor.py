"""Show how a training run is doing, from its output folder, while it runs or after it ends.

    python tools/monitor.py --output_dir output/qwen25vl_sft            # one report + loss.png
    python tools/monitor.py --output_dir output/qwen25vl_sft --watch 30 # refresh every 30 s until done

Reads `train_log.jsonl` (the trainer appends one JSON line per logging step and per evaluation; a
half-written last line is ignored, and a step logged twice after a resume keeps its latest record) and
the newest `checkpoint-*/trainer_state.json` for `max_steps` (or --max_steps before the first
checkpoint). Prints progress (step/max and percent), an ETA from the mean step time of the last
--window log records, the current loss and its moving average over --window records, learning rate
per parameter group, grad norm, tokens/s, memory, the last evaluation and the newest checkpoint.
Writes `loss.png` (or --plot): loss with its moving average and eval loss on top, learning rates below
(one line per parameter group, drawn widest first so groups with equal rates show as nested stripes;
an axis of non-negative values starts at 0).
`--watch N` stops once max_steps is reached or `train_summary.json` (written at the end) is newer than the log.
Exit code: 0, or 2 when the output folder does not exist or a file cannot be read or written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl.train.checkpoint import latest_checkpoint, read_trainer_state  # noqa: E402

LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "train_summary.json"
BACKGROUND = (255, 255, 255)
AXIS = (60, 60, 60)
GRID = (225, 225, 225)
LOSS_COLOR = (150, 190, 235)
AVERAGE_COLOR = (20, 70, 170)
EVAL_COLOR = (210, 40, 40)
GROUP_COLORS = ((230, 120, 20), (40, 150, 60), (140, 60, 170), (20, 150, 160), (120, 120, 120))


@dataclass
class Series:
    """One curve of a panel: a line (of `width` pixels) or dots."""

    label: str
    xs: list[float]
    ys: list[float]
    color: tuple[int, int, int]
    as_points: bool = False
    width: int = 2


@dataclass
class RunLog:
    """Training and eval records ordered by step (one per step), and how many lines could not be read."""

    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)


@dataclass
class Progress:
    max_steps: int | None
    checkpoint: Path | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="the training run's --output_dir")
    parser.add_argument(
        "--window", type=int, default=10, help="log records in the moving average and the ETA (default: 10)"
    )
    parser.add_argument(
        "--watch", type=float, default=0, help="refresh every N seconds until the run ends (default: once)"
    )
    parser.add_argument(
        "--max_steps", type=int, default=None, help="total steps when no checkpoint exists yet to tell it"
    )
    parser.add_argument("--plot", default=None, help="plot file (default: <output_dir>/loss.png)")
    parser.add_argument("--no_plot", action="store_true", help="print only")
    parser.add_argument("--plot_size", default="900x640", help="plot width x height in pixels (default: 900x640)")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error("--window must be at least 1")
    try:
        args.plot_size = tuple(int(x) for x in args.plot_size.lower().split("x"))
    except ValueError:
        parser.error(f"--plot_size {args.plot_size!r}: expected WIDTHxHEIGHT")
    if len(args.plot_size) != 2 or min(args.plot_size) < 200:
        parser.error("--plot_size: two numbers of at least 200 pixels, like 900x640")
    return args


def number(value: object) -> float | None:
    """A log value as float: the trainer writes NaN/inf as strings; anything else non-numeric is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def read_log(path: Path) -> RunLog:
    """Complete lines only: the text after the last newline may be a record still being written."""
    log = RunLog()
    if not path.is_file():
        return log
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")[:-1]
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.bad_lines.append(line_no)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            log.bad_lines.append(line_no)
        elif "eval_loss" in record:
            evals[record["step"]] = record
        elif "loss" in record:
            train[record["step"]] = record
    log.train = [train[s] for s in sorted(train)]
    log.evals = [evals[s] for s in sorted(evals)]
    return log


def read_progress(output_dir: Path, max_steps: int | None) -> Progress:
    """max_steps from the newest complete checkpoint (unless given), and that checkpoint."""
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None and max_steps is None:
        try:
            max_steps = read_trainer_state(checkpoint).max_steps or None
        except (OSError, ValueError, TypeError):
            max_steps = None
    return Progress(max_steps, checkpoint)


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` finite values up to each position (NaN where none is finite yet)."""
    averages = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        averages.append(sum(recent) / len(recent) if recent else math.nan)
    return averages


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def report(log: RunLog, progress: Progress, window: int) -> list[str]:
    """The lines printed for one refresh."""
    if not log.train:
        return ["no training record yet"]
    last = log.train[-1]
    step = last["step"]
    lines = []
    epoch = number(last.get("epoch"))
    epoch_text = f", epoch {epoch:.2f}" if epoch is not None else ""
    if progress.max_steps:
        lines.append(f"progress: step {step}/{progress.max_steps} ({100 * step / progress.max_steps:.1f}%){epoch_text}")
    else:
        unknown = "max_steps unknown before the first checkpoint; pass --max_steps"
        lines.append(f"progress: step {step} ({unknown}){epoch_text}")
    recent = log.train[-window:]
    times = [t for r in recent if (t := number(r.get("step_time_s"))) is not None]
    if times:
        mean_time = sum(times) / len(times)
        if progress.max_steps:
            remaining = max(progress.max_steps - step, 0)
            eta = "done" if remaining == 0 else f"{_duration(remaining * mean_time)} for {remaining} steps"
            lines.append(f"ETA: {eta} (mean step {mean_time:.3f} s over the last {len(times)} logs)")
        else:
            lines.append(f"step time: {mean_time:.3f} s (mean over the last {len(times)} logs)")
    losses = [number(r.get("loss")) for r in log.train]
    losses = [math.nan if v is None else v for v in losses]
    average = moving_average(losses, window)[-1]
    span = min(window, len(losses))
    lines.append(f"loss: {losses[-1]:.4f} (moving average over the last {span} logs: {average:.4f})")
    lr = last.get("lr")
    if isinstance(lr, dict) and lr:
        lines.append("lr: " + ", ".join(f"{group} {_fmt(number(v), '.3e')}" for group, v in lr.items()))
    elif number(lr) is not None:
        lines.append(f"lr: {number(lr):.3e}")
    skipped = number(last.get("skipped_steps"))
    skipped_text = f"   skipped steps: {skipped:.0f}" if skipped else ""
    grad_norm, speed = _fmt(number(last.get("grad_norm"))), _fmt(number(last.get("tokens_per_s")), ".1f")
    lines.append(f"grad_norm: {grad_norm}   tokens/s: {speed}{skipped_text}")
    memory = last.get("memory")
    if isinstance(memory, dict) and memory:
        lines.append("memory: " + ", ".join(f"{k} {_fmt(number(v), '.0f')}" for k, v in memory.items()))
    if log.evals:
        ev = log.evals[-1]
        lines.append(
            f"last eval: step {ev['step']}, loss {_fmt(number(ev.get('eval_loss')))}, "
            f"perplexity {_fmt(number(ev.get('eval_perplexity')), '.3f')}"
        )
    if progress.checkpoint is not None:
        lines.append(f"last checkpoint: {progress.checkpoint.name}")
    return lines


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def _tick_label(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def axis_range(values: list[float]) -> tuple[float, float]:
    """The y range of a panel: the data with a 5% margin, which never goes below 0 for non-negative data
    (a learning rate or a loss has no negative tick)."""
    low, high = min(values), max(values)
    margin = (high - low) * 0.05 or abs(low) * 0.1 or 1.0  # keep curves off the frame
    return (low - margin if low < 0 or low - margin >= 0 else 0.0), high + margin


def draw_panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: list[Series],
    x_range: tuple[float, float],
) -> None:
    """Axes with ticks, labels and a legend; each series as a line or dots."""
    font = ImageFont.load_default()
    left, top, right, bottom = box
    plot = (left + 70, top + 28, right - 15, bottom - 35)
    ys = [y for s in series for y in s.ys if math.isfinite(y)]
    draw.text((plot[0], top + 6), title, fill=AXIS, font=font)
    draw.rectangle(plot, outline=AXIS)
    if not ys:
        draw.text((plot[0] + 10, plot[1] + 10), "no data", fill=AXIS, font=font)
        return
    y_low, y_high = axis_range(ys)
    x_low, x_high = x_range
    x_high = x_high if x_high > x_low else x_low + 1

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = plot[0] + (x - x_low) / (x_high - x_low) * (plot[2] - plot[0])
        py = plot[3] - (y - y_low) / (y_high - y_low) * (plot[3] - plot[1])
        return px, py

    for value in _ticks(y_low, y_high):
        _, py = to_pixel(x_low, value)
        draw.line((plot[0] + 1, py, plot[2] - 1, py), fill=GRID)
        draw.line((plot[0] - 4, py, plot[0], py), fill=AXIS)
        draw.text((left + 2, py - 6), _tick_label(value), fill=AXIS, font=font)
    for value in _ticks(x_low, x_high):
        px, _ = to_pixel(value, y_low)
        draw.line((px, plot[3], px, plot[3] + 4), fill=AXIS)
        draw.text((px - 10, plot[3] + 6), f"{value:.0f}", fill=AXIS, font=font)
    draw.text(((plot[0] + plot[2]) // 2 - 12, bottom - 14), "step", fill=AXIS, font=font)
    legend_x = plot[2] - 170
    for row, curve in enumerate(series):
        points = [to_pixel(x, y) for x, y in zip(curve.xs, curve.ys) if math.isfinite(y)]
        if curve.as_points or len(points) == 1:
            for px, py in points:
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=curve.color)
        elif points:
            draw.line(points, fill=curve.color, width=curve.width, joint="curve")
        legend_y = plot[1] + 8 + 14 * row
        draw.line((legend_x, legend_y + 6, legend_x + 18, legend_y + 6), fill=curve.color, width=max(3, curve.width))
        draw.text((legend_x + 24, legend_y), curve.label, fill=AXIS, font=font)


def plot_run(log: RunLog, window: int, size: tuple[int, int], path: Path) -> None:
    """Loss, its moving average and eval loss on top; one learning-rate curve per group below."""
    width, height = size
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    steps = [float(r["step"]) for r in log.train]
    losses = [v if (v := number(r.get("loss"))) is not None else math.nan for r in log.train]
    x_range = (min(steps + [float(e["step"]) for e in log.evals]), max(steps + [float(e["step"]) for e in log.evals]))
    loss_series = [
        Series("loss", steps, losses, LOSS_COLOR),
        Series(f"moving average ({window})", steps, moving_average(losses, window), AVERAGE_COLOR),
    ]
    if log.evals:
        eval_losses = [v if (v := number(e.get("eval_loss"))) is not None else math.nan for e in log.evals]
        loss_series.append(Series("eval loss", [float(e["step"]) for e in log.evals], eval_losses, EVAL_COLOR, True))
    split = int(height * 0.6)
    draw_panel(draw, (0, 0, width, split), "training loss", loss_series, x_range)
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for record in log.train:
        lr = record.get("lr")
        values = lr if isinstance(lr, dict) else {"lr": lr}
        for group, value in values.items():
            if (v := number(value)) is not None:
                groups.setdefault(group, ([], []))[0].append(float(record["step"]))
                groups[group][1].append(v)
    # widest first, 3 pixels narrower each: a group hidden under another still shows as a border around it
    lr_series = [Series(group, xs, ys, GROUP_COLORS[i % len(GROUP_COLORS)], width=2 + 3 * (len(groups) - 1 - i))
                 for i, (group, (xs, ys)) in enumerate(groups.items())]  # fmt: skip
    draw_panel(draw, (0, split, width, height), "learning rate per group", lr_series, x_range)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def refresh(args: argparse.Namespace, output_dir: Path) -> tuple[RunLog, Progress]:
    """Read, print and plot once."""
    log = read_log(output_dir / LOG_NAME)
    progress = read_progress(output_dir, args.max_steps)
    log_file = output_dir / LOG_NAME
    age = f", last written {_duration(time.time() - log_file.stat().st_mtime)} ago" if log_file.is_file() else ""
    print(f"== {log_file} at {datetime.datetime.now().strftime('%H:%M:%S')}{age}")
    for line in report(log, progress, args.window):
        print(line)
    if log.bad_lines:
        more = " ..." if len(log.bad_lines) > 10 else ""
        print(f"unreadable log lines (skipped): {', '.join(map(str, log.bad_lines[:10]))}{more}")
    if log.train and not args.no_plot:
        plot = Path(args.plot) if args.plot else output_dir / "loss.png"
        plot_run(log, args.window, args.plot_size, plot)
        print(f"plot: {plot}")
    sys.stdout.flush()
    return log, progress


def finished(log: RunLog, progress: Progress, output_dir: Path) -> bool:
    """max_steps reached, or `train_summary.json` (written when train_qwen.py ends) newer than the log."""
    if log.train and progress.max_steps and log.train[-1]["step"] >= progress.max_steps:
        return True
    summary, log_file = output_dir / SUMMARY_NAME, output_dir / LOG_NAME
    return summary.is_file() and (not log_file.is_file() or summary.stat().st_mtime >= log_file.stat().st_mtime)


def main(argv: list[str] | None = None, sleep: Callable[[float], None] = time.sleep) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if not output_dir.is_dir():
        print(f"[monitor] error: --output_dir {output_dir} is not a folder", file=sys.stderr)
        return 2
    try:
        log, progress = refresh(args, output_dir)
        while args.watch > 0 and not finished(log, progress, output_dir):
            sleep(args.watch)
            log, progress = refresh(args, output_dir)
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # an unreadable log or an unwritable plot path
        print(f"[monitor] error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
