"""Training-step time, tokens/s and peak memory of a tiny Qwen2.5-VL on CPU, for the three batch layouts.

    python bench/train_step.py [--steps 20] [--batch 4]

The same demo samples (`demo/demo_images.json`, 112x112 images and short answers) go through the real
pipeline and the compiled `TrainStep` in three layouts: padded (B rows padded to a multiple of 64),
flattened (`data_flatten`: one row with per-sample segments) and packed (`data_packing`: samples
pre-packed by `pack_lengths` into packs of 64*batch tokens, one pack per micro-batch). Each layout
runs in its own process so peak RSS is its own. Reported after warm-up (compilation): median step time,
real (non-padding) input tokens per second and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAYOUTS = ("padded", "flattened", "packed")


def _items(layout: str, encoder, batch: int) -> list[list]:
    """Micro-batches of encoded items for a layout (packed: items are packs of samples)."""
    from qwenvl.data import data_list
    from qwenvl.data.annotations import load_records
    from qwenvl.data.dataset import SupervisedDataset, concat_encoded
    from qwenvl.data.packing import pack_lengths

    samples = [s for s in SupervisedDataset(load_records(data_list("demo_images"), 0), encoder)]
    if layout == "packed":
        packs = pack_lengths([s.num_tokens for s in samples], 64 * batch).packs
        items = [concat_encoded([samples[i] for i in pack]) for pack in packs]
        return [[item] for item in items]
    return [samples[i : i + batch] for i in range(0, len(samples) - batch + 1, batch)]


def run_layout(layout: str, steps: int, batch: int) -> dict:
    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)  # as train_qwen.py runs (qwenvl.runtime.graph_mode); own process
    from make_tiny_model import make_tiny_model

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.buckets import ShapeBuckets
    from qwenvl.data.collators import collate_flattened, collate_padded
    from qwenvl.data.pipeline import build_encoder
    from qwenvl.model import load_model
    from qwenvl.train.argument import parse_args
    from qwenvl.train.freezing import apply_tuning_flags
    from qwenvl.train.optimizer import build_optimizer
    from qwenvl.train.param_groups import build_param_groups
    from qwenvl.train.train_step import TrainStep, seed_everything

    seed_everything(0)
    model_dir = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "qwen2.5vl", seed=0)
    encoder = build_encoder(model_dir, DataArguments())
    model = load_model(model_dir)
    model_args, _, training = parse_args(["--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "True"])
    apply_tuning_flags(model, model_args)
    model.set_train(True)
    step = TrainStep(model, build_optimizer(build_param_groups(model, training), training), training)
    collate = collate_padded if layout == "padded" else collate_flattened
    micro = _items(layout, encoder, batch)
    buckets = ShapeBuckets(None)  # multiples of 64: the exact shapes this bench compares
    batches = [collate(items, pad_token_id=encoder.special.pad, buckets=buckets) for items in micro]
    real_tokens = [sum(len(s.input_ids) for s in items) for items in micro]
    shapes = {tuple(b["input_ids"].shape) for b in batches}
    for b in batches:  # one pass over every micro-batch compiles whatever shapes occur
        step.run([model.prepare_inputs(b)], 1.0)
    times, tokens = [], 0
    for i in range(steps):
        b = batches[i % len(batches)]
        start = time.perf_counter()
        step.run([model.prepare_inputs(b)], 1.0)
        times.append(time.perf_counter() - start)
        tokens += real_tokens[i % len(batches)]
    return {
        "layout": layout,
        "shape": sorted(shapes)[-1],
        "step_ms": 1000 * statistics.median(times),
        "tokens_per_s": tokens / sum(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="samples per micro-batch (padded, flattened); packs are 64*batch tokens")
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tools"))
    if args.layout:
        print(json.dumps(run_layout(args.layout, args.steps, args.batch)))
        return
    rows = []
    for layout in LAYOUTS:
        cmd = [sys.executable, __file__, "--layout", layout, "--steps", str(args.steps), "--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={"GLOG_v": "3", **os.environ})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"tiny Qwen2.5-VL, CPU, {args.steps} timed steps after compilation")
    print(f"{'layout':<12}{'batch shape':>14}{'step ms':>10}{'tokens/s':>11}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['layout']:<12}{str(tuple(r['shape'])):>14}{r['step_ms']:>10.1f}{r['tokens_per_s']:>11.0f}{r['peak_rss_mib']:>14.0f}")
    base = rows[0]["tokens_per_s"]
    print("tokens/s relative to padded: " + ", ".join(f"{r['layout']} {r['tokens_per_s'] / base:.2f}x" for r in rows))


if __name__ == "__main__":
    main()
