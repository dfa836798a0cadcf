"""Host memory a compiled MindSpore CPU training graph keeps, per decoder layer and per operation (issue 10).

    GLOG_v=3 python bench/graph_memory.py                       # both tables
    GLOG_v=3 python bench/graph_memory.py --what layers --layers 2,6

Why: over issue 10's model sizes (2 + 2 vs 6 + 4 layers) the compiled graph is 2.7-3.7 of the measured bytes per
parameter, more than the room between each mode's ideal and its target. This bench says what that memory is.

- layers: the text model of issue 10's configs, narrowed to hidden 256 (so activations stay small), with N
  decoder layers; one process per N compiles and runs one forward/backward pass on 256 text tokens. Printed: the
  resident set kept afterwards (freed heap returned first), and the same with MindSpore's `precompile_only`
  (frontend only: parse, autodiff, graph passes; no kernels, nothing run); MiB per extra layer is the slope.
- ops: the gradient graph of K copies of one small expression in straight-line code (on 4 x 64 tensors, so
  tensor memory is negligible), K = 20 and 220, one process each; KB per copy is the slope. Variants show what
  costs: a Python `for` loop instead of straight-line copies, primitives with attributes, slicing, and the same
  expressions as cells with a hand-written backward pass (`bprop`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from child_process import run_child  # noqa: E402
from torch_memory import marginal_bytes_per_param  # noqa: E402

OPS = {  # name: (statement applied to x (4, 64) K times, in straight-line code unless noted)
    "reshape": "x = x.reshape(64, 4).reshape(4, 64)",
    "cast": "x = ops.cast(ops.cast(x, ms.float16), ms.float32)",
    "mul": "x = x * 1.5",
    "mul_in_for_loop": "for _ in range(1):\n            x = x * 1.5",
    "transpose": "x = ops.transpose(ops.transpose(x, (1, 0)), (1, 0))",
    "matmul": "x = ops.matmul(x, w)",
    "matmul_nt": "x = MATMUL_NT(x, w)",
    "matmul_nt_bprop": "x = MATMUL_NT_CELL(x, w)",
    "rotary": "x = x * c + rotate_half(x) * s",
    "rotary_bprop": "x = ROTARY_CELL(x, c, s)",
}
PREAMBLE = '''import mindspore as ms
from mindspore import nn, ops

MATMUL_NT = ops.MatMul(transpose_b=True)
MATMUL_NN = ops.MatMul()
MATMUL_TN = ops.MatMul(transpose_a=True)


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


class MatmulNT(nn.Cell):
    def construct(self, x, w):
        return MATMUL_NT(x, w)

    def bprop(self, x, w, out, dout):
        return MATMUL_NN(dout, w), MATMUL_TN(dout, x)


class Rotary(nn.Cell):
    def construct(self, x, c, s):
        return x * c + rotate_half(x) * s

    def bprop(self, x, c, s, out, dout):
        return dout * c - rotate_half(dout * s), ops.zeros_like(c), ops.zeros_like(s)


MATMUL_NT_CELL = MatmulNT()
ROTARY_CELL = Rotary()
'''
OP_COPIES = (20, 220)


def _resident_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _kept_mib(run) -> float:
    """Resident set growth across `run()`, freed heap returned to the system before and after."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    before = _resident_mib()
    run()
    libc.malloc_trim(0)
    return _resident_mib() - before


def layers_child(layers: int, precompile: bool, dtype: str) -> dict:
    import mindspore as ms
    from types import SimpleNamespace

    from workloads import config_for, make_batch

    from qwenvl.model import build_model
    from qwenvl.train.optimizer import build_optimizer
    from qwenvl.train.param_groups import build_param_groups
    from qwenvl.train.train_step import TrainStep

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    config = config_for("mem109m")
    config.update(hidden_size=256, intermediate_size=704, num_hidden_layers=layers, num_attention_heads=4)
    model = build_model(config, seed=0, dtype=dtype)
    model.set_train(True)
    args = SimpleNamespace(optim="adamw_mindspore", learning_rate=1e-5, mm_projector_lr=None, vision_tower_lr=None,
                           weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                           fp16=dtype == "float16")  # fmt: skip
    step = TrainStep(model, build_optimizer(build_param_groups(model, args), args), args)
    inputs = step.positional(model.prepare_inputs(make_batch("text256", config)))
    if precompile:
        ms.set_context(precompile_only=True)
    kept = _kept_mib(lambda: step._forward_backward(ms.Tensor(1.0, ms.float32), *inputs))
    return {"layers": layers, "precompile_only": precompile, "dtype": dtype, "kept_mib": kept}


def generated_source(op: str, copies: int) -> str:
    """A module whose `Net.construct(x, w, c, s)` applies `OPS[op]` to x `copies` times and returns its sum."""
    statement = "\n        ".join([OPS[op]] * copies)
    net = f"class Net(nn.Cell):\n    def construct(self, x, w, c, s):\n        {statement}\n        return x.sum()\n"
    return f"{PREAMBLE}\n\n{net}"


def ops_child(op: str, copies: int) -> dict:
    import mindspore as ms
    import numpy as np
    from mindspore import nn, ops

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    folder = Path(tempfile.mkdtemp(prefix="graph_memory_"))
    (folder / "generated_net.py").write_text(generated_source(op, copies), encoding="utf-8")
    sys.path.insert(0, str(folder))
    from generated_net import Net

    grad = ops.GradOperation(get_all=True)
    net = Net()

    class Grad(nn.Cell):
        def construct(self, x, w, c, s):
            return grad(net)(x, w, c, s)

    rng = np.random.default_rng(0)
    values = [ms.Tensor(rng.random(shape, dtype=np.float32)) for shape in ((4, 64), (64, 64), (4, 64), (4, 64))]
    step = Grad()
    return {"op": op, "copies": copies, "kept_mib": _kept_mib(lambda: step(*values))}


def _bytes_per_unit(xs: list[float], kept_mib: list[float]) -> float:
    """Least-squares slope of the kept memory, in bytes per unit of x (layers, copies)."""
    return marginal_bytes_per_param([{"params": x, "peak_rss_mib": y} for x, y in zip(xs, kept_mib)])


def _child(argv: list[str]) -> dict:
    env = {**os.environ, "GLOG_v": "3"}
    return run_child([sys.executable, __file__, "--child", *argv], env, ROOT, rss_limit_gb=8.0, timeout_s=900)


def measure_layers(counts: list[int], dtype: str) -> dict:
    out = {}
    for precompile in (False, True):
        points = [_child(["layers", str(n), str(int(precompile)), dtype]) for n in counts]
        failed = [p["error"] for p in points if "error" in p]
        key = "frontend" if precompile else "compiled_and_run"
        out[key] = {"error": failed[0]} if failed else {
            "kept_mib": [p["kept_mib"] for p in points],
            "mib_per_layer": _bytes_per_unit(counts, [p["kept_mib"] for p in points]) / 2**20}
    return out


def measure_ops(names: list[str]) -> dict:
    out = {}
    for op in names:
        points = [_child(["ops", op, str(k)]) for k in OP_COPIES]
        failed = [p["error"] for p in points if "error" in p]
        out[op] = {"error": failed[0]} if failed else {
            "kb_per_copy": _bytes_per_unit(list(OP_COPIES), [p["kept_mib"] for p in points]) / 1024}
    return out


def report(results: dict) -> None:
    if "layers" in results:
        counts = results["layer_counts"]
        print(f"\nCompiled forward/backward graph, {results['dtype']} text decoder layers {counts} (hidden 256, "
              "256 tokens):")
        for key, row in results["layers"].items():
            if "error" in row:
                print(f"  {key}: {row['error']}")
            else:
                kept = " / ".join(f"{v:.0f}" for v in row["kept_mib"])
                print(f"  {key}: kept {kept} MiB -> {row['mib_per_layer']:.1f} MiB per layer")
    if "ops" in results:
        print(f"\nGradient graph of K copies of one expression (K = {OP_COPIES[0]}, {OP_COPIES[1]}): KB kept per copy")
        for op, row in results["ops"].items():
            print(f"  {op:18s} {row.get('error') or format(row['kb_per_copy'], '.0f')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default="layers,ops", help="comma list of: layers, ops")
    parser.add_argument("--layers", default="2,6", help="decoder layer counts (>= 2 values)")
    parser.add_argument("--dtype", default="float32", help="the model's weights: float32 or float16 (fp16 mixed "
                                                               "precision: float16 weights, float32 masters)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = (layers_child(int(rest[0]), bool(int(rest[1])), rest[2]) if kind == "layers"
                  else ops_child(rest[0], int(rest[1])))
        print(json.dumps(result))
        return 0
    what = set(args.what.split(","))
    results: dict = {}
    if "layers" in what:
        results["layer_counts"] = [int(n) for n in args.layers.split(",")]
        results["dtype"] = args.dtype
        results["layers"] = measure_layers(results["layer_counts"], args.dtype)
    if "ops" in what:
        results["ops"] = measure_ops([op for op in args.ops.split(",") if op])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
