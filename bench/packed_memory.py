"""Activation memory of one packed row of 8 x 1k-token samples against 8 rows of 1k tokens (issue 11).

    GLOG_v=3 python bench/packed_memory.py [--size mem109m]

Attention stays inside each sample in both layouts (segment ids, `qwenvl.model.attention`), so a packed row
should cost what the 8 rows cost: no (L x L) score or mask over the 8k row exists on host or device. Each
(layout, workload) runs in a fresh process: the model (bench/workloads.py size, default mem109m: hidden
1024, 2 layers, vocab 32768) and its optimizer are built, then one compiled forward + backward runs on the
batch from the real collators (`collate_padded` for rows, `collate_flattened` with cu_seqlens for the packed
row). Activation memory = peak RSS of that step - peak RSS before it (compilation included in both). The
text workload is 1024 random tokens per sample; the image workload is a 224 px image (64 merged tokens)
inside 1024 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from child_process import run_child  # noqa: E402

SAMPLES, TOKENS = 8, 1024
WORKLOADS = {"text": "text1024", "image": "image1k"}
TARGET = 1.3  # issue 11: packed <= 1.3 x rows


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def collated(workload: str, size: str, layout: str) -> dict:
    """The 8 samples of `workload` through the real collator of `layout` (rows: padded; packed: flattened)."""
    from qwenvl.data.collators import collate_flattened, collate_padded
    from qwenvl.data.dataset import EncodedSample
    from workloads import make_batch

    samples = []
    for seed in range(SAMPLES):
        batch = make_batch(WORKLOADS[workload], size, seed)
        samples.append(EncodedSample(input_ids=batch["input_ids"][0], labels=batch["labels"][0],
                                     position_ids=batch["position_ids"][:, 0], seq_lens=[batch["input_ids"].shape[1]],
                                     pixel_values=batch.get("pixel_values"),
                                     image_grid_thw=batch.get("image_grid_thw")))  # fmt: skip
    collate = collate_padded if layout == "rows" else collate_flattened
    return collate(samples, pad_token_id=0)


def worker(model_dir: str, size: str, workload: str, layout: str) -> None:
    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    from types import SimpleNamespace

    from qwenvl.model import load_model
    from qwenvl.train.optimizer import build_optimizer
    from qwenvl.train.param_groups import build_param_groups
    from qwenvl.train.train_step import TrainStep

    model = load_model(model_dir)
    model.set_train(True)
    args = SimpleNamespace(optim="adamw_mindspore", learning_rate=1e-5, mm_projector_lr=None, vision_tower_lr=None,
                           weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                           fp16=False)  # fmt: skip
    step = TrainStep(model, build_optimizer(build_param_groups(model, args), args), args)
    inputs = model.prepare_inputs(collated(workload, size, layout))
    host_inputs_mib = sum(t.nbytes for t in inputs.values()) / 2**20
    before = _peak_mib()
    loss_sum, n_tokens, _ = step.forward_backward(inputs)
    result = {"layout": layout, "workload": workload, "before_mib": before, "peak_mib": _peak_mib(),
              "activation_mib": _peak_mib() - before, "host_inputs_mib": host_inputs_mib,
              "shape": list(inputs["input_ids"].shape),
              "loss": float(loss_sum.asnumpy() / n_tokens.asnumpy())}  # fmt: skip
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mem109m", help="bench/workloads.py size")
    parser.add_argument("--rss_limit_gb", type=float, default=16.0)
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        worker(*args.measure)
        return 0
    from workloads import make_weights

    env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
    failed = False
    with tempfile.TemporaryDirectory() as work:
        model_dir = make_weights(args.size, work)
        print(f"{'workload':<9}{'layout':<8}{'shape':>12}{'activation MiB':>16}{'host inputs MiB':>17}{'loss':>9}")
        for workload in WORKLOADS:
            results = {}
            for layout in ("rows", "packed"):
                cmd = [sys.executable, __file__, "--measure", str(model_dir), args.size, workload, layout]
                r = run_child(cmd, env, ROOT, args.rss_limit_gb, timeout_s=1800)
                if "error" in r:
                    print(f"{workload:<9}{layout:<8} failed: {r['error']}")
                    failed = True
                    continue
                results[layout] = r
                shape = "x".join(map(str, r["shape"]))
                print(f"{workload:<9}{layout:<8}{shape:>12}{r['activation_mib']:>16.0f}{r['host_inputs_mib']:>17.1f}"
                      f"{r['loss']:>9.4f}")  # fmt: skip
            if len(results) == 2:
                ratio = results["packed"]["activation_mib"] / results["rows"]["activation_mib"]
                verdict = "ok" if ratio <= TARGET else f"over the {TARGET}x target"
                print(f"{workload:<9}packed / rows activation memory {ratio:.2f}x ({verdict})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
