"""Marginal memory per parameter of full fp32 AdamW training in transformers + torch (CPU), for printing beside
ours in the memory benchmark.

    python bench/torch_memory.py                                 # issue 10's configs: mem109m, mem163m
    python bench/torch_memory.py --sizes tiny,mem109m,mem163m --workload text256 --steps 2

Each model size runs bench/torch_reference.py in its own process (same weights and batch construction as
every other benchmark, bench/workloads.py), a few full training steps (forward, loss, backward, clipping,
AdamW); its peak RSS (ru_maxrss) is the point for that size. The marginal cost is the least-squares slope of
peak bytes against parameter count: what one more parameter costs, with the fixed cost of the interpreter,
libraries and activations of the same batch left in the intercept. fp32 AdamW needs 16 bytes per parameter
(weights, gradients, two moments).

From code: `torch_points([(model_dir, batch_npz), ...], torch_python)` then `marginal_bytes_per_param(points)`;
`measure(sizes, torch_python)` does both for bench/workloads.py sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from child_process import run_child  # noqa: E402
from torch_reference import TORCH_PYTHON_HELP, resolve_torch_python, torch_command  # noqa: E402
from workloads import prepare_in_child  # noqa: E402


def torch_points(models: list[tuple[str | Path, str | Path]], torch_python: str, steps: int = 2, warmup: int = 1,
                 tuned: bool = False, rss_limit_gb: float = 18.0) -> list[dict]:  # fmt: skip
    """Per (model folder, batch .npz): {"params", "peak_rss_mib", "phases", "median_s"} or {"error"}."""
    env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
    points = []
    for model_dir, batch in models:
        result = run_child(torch_command(torch_python, model_dir, batch, steps, warmup, tuned), env, ROOT,
                           rss_limit_gb, 3600.0)  # fmt: skip
        keys = ("params", "peak_rss_mib", "phases", "median_s", "loss0", "error")
        points.append({"model": str(model_dir), **{key: result[key] for key in keys if key in result}})
    return points


def marginal_bytes_per_param(points: list[dict]) -> float:
    """Least-squares slope of peak RSS bytes over parameters (two points: their difference quotient)."""
    usable = [(p["params"], p["peak_rss_mib"] * 2**20) for p in points if "error" not in p]
    if len(usable) < 2:
        raise ValueError("need at least two measured model sizes for a slope")
    mean_x = sum(x for x, _ in usable) / len(usable)
    mean_y = sum(y for _, y in usable) / len(usable)
    return sum((x - mean_x) * (y - mean_y) for x, y in usable) / sum((x - mean_x) ** 2 for x, _ in usable)


def measure(sizes: list[str], torch_python: str, workload: str = "text256", steps: int = 2, warmup: int = 1,
            tuned: bool = False, work: str | Path | None = None) -> dict:  # fmt: skip
    """{"points": [...], "bytes_per_param": slope} for bench/workloads.py sizes (weights built once each)."""
    work = Path(work or tempfile.mkdtemp(prefix="torch_memory_"))
    prepared = [prepare_in_child(size, [workload], work) for size in sizes]
    points = torch_points([(p["model"], p["batches"][workload]) for p in prepared], torch_python, steps, warmup, tuned)
    for size, point in zip(sizes, points):
        point["size"] = size
    return {"points": points, "bytes_per_param": marginal_bytes_per_param(points)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="mem109m,mem163m", help="comma list of bench/workloads.py sizes (>= 2)")
    parser.add_argument("--workload", default="text256", help="bench/workloads.py workload (textN or image448)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tuned", action="store_true", help="torch with tuned CPU libraries (torch_reference.py)")
    parser.add_argument("--torch_python", default=None, help=TORCH_PYTHON_HELP)
    parser.add_argument("--work", default=None, help="folder for weights and batches (default: a new temp folder)")
    args = parser.parse_args(argv)
    torch_python = resolve_torch_python(args.torch_python)
    if torch_python is None:
        print("torch: not measured (no --torch_python; bash bench/make_torch_venv.sh creates the venv)")
        return 0
    result = measure(args.sizes.split(","), torch_python, args.workload, args.steps, args.warmup, args.tuned, args.work)
    print(f"transformers + torch, full fp32 AdamW, batch 1, {args.workload}, peak RSS per size in its own process:")
    print("| size | parameters | peak RSS MiB | step s |\n|---|---|---|---|")
    for point in result["points"]:
        if "error" in point:
            print(f"| {point['size']} | – | {point['error']} | – |")
        else:
            print(f"| {point['size']} | {point['params'] / 1e6:.1f} M | {point['peak_rss_mib']:.0f} | "
                  f"{point['median_s']:.2f} |")  # fmt: skip
    print(f"marginal: {result['bytes_per_param']:.1f} bytes / parameter (fp32 AdamW ideal: 16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
