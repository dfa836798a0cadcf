"""Peak training memory per rank: marginal bytes per parameter over model sizes, bytes per token, by phase,
beside the ideal of each mode and, for float32, transformers + torch on the same weights and batch.

    GLOG_v=3 python bench/memory.py                                   # every mode, three sizes
    GLOG_v=3 python bench/memory.py --modes fp32 --torch_python ~/.venvs/torch-ref/bin/python
    GLOG_v=3 python bench/memory.py --stability_steps 200             # peak after step 10 vs after step 200
    GLOG_v=3 python bench/memory.py --sizes width768,width1024,width1280  # one depth, widths varied
    GLOG_v=3 python bench/memory.py --layer_by_layer                  # each mode with `--layer_by_layer`

Modes (the ideal counts model states only: what grows with parameters):
- fp32: full fine-tune in float32, AdamW, one process. Ideal 16 B/param: weights, gradients, two moments.
- zero2_fp16: float16 weights with float32 masters, ZeRO-2 over 2 msrun workers. Ideal 2 + 2 + 12/2 = 10 B/param
  per rank: float16 weights and (whole, until reduce-scattered) gradients, half the masters and moments.
- zero3_fp16: ZeRO-3 over 2 workers. Ideal (4 + 2 + 8)/2 = 7 B/param per rank: float32 weight chunks that are
  themselves the masters, float16 gradient chunks, moments.
- lora_fp16: frozen float16 base, LoRA r=16 on q/k/v/o. Ideal 2 B per base parameter.

Each (mode, size) runs in fresh processes (msrun for 2 workers); memory is the process's peak resident set
(`ru_maxrss`; on Ascend MindSpore's device memory statistics), recorded after each phase: load, optimizer
state, forward+backward (one compiled graph), gradient reduction, optimizer step, the remaining steps,
checkpoint save. The marginal cost is the least-squares slope of the peak over the parameter count, the
fixed cost of interpreter, libraries, logits and one layer's working set staying in the intercept. A probe
process per point compiles the forward/backward graph without running it: the host memory the compiled graph
keeps, part of the CPU peak (on Ascend host memory, not device memory), is printed beside it with its own slope;
it grows with the number of layers, which is what differs between these sizes. Bytes
per token: the smallest size at image224 (256 tokens) and image448 (458 tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from child_process import run_child  # noqa: E402
from torch_memory import marginal_bytes_per_param, torch_points  # noqa: E402
from torch_reference import TORCH_PYTHON_HELP, resolve_torch_python  # noqa: E402
from workloads import MEMORY_SIZES, prepare_in_child  # noqa: E402

MODES = {  # name: (world size, ZeRO stage, dtype, LoRA, ideal bytes per parameter)
    "fp32": (1, 0, "float32", False, 16.0),
    "zero2_fp16": (2, 2, "float16", False, 2 + 2 + 12 / 2),
    "zero3_fp16": (2, 3, "float16", False, (4 + 2 + 8) / 2),
    "lora_fp16": (1, 0, "float16", True, 2.0),
}
TARGETS = {"fp32": 17.0, "zero2_fp16": 11.0, "zero3_fp16": 8.0, "lora_fp16": 2.5}  # issue 10's acceptance
PHASES = ("load", "optimizer_state", "forward_backward", "gradient_reduction", "optimizer_step", "steps", "save")


def _base(mode: str) -> str:
    """The MODES name of a measured mode ("<mode>" or "<mode>+layer_by_layer")."""
    return mode.partition("+")[0]


def _peak_mib() -> float:
    """Peak memory of this process so far: device statistics on Ascend, the resident set elsewhere."""
    import mindspore as ms

    if ms.get_context("device_target") == "Ascend":
        return ms.runtime.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(model_dir: str, batch_path: str, mode: str, steps: int, out: str) -> None:
    """One rank's measurement, written to `out` (as `<out>.rank<r>.json` under msrun)."""
    import mindspore as ms
    import numpy as np

    ms.set_device(os.environ.get("QWENVL_DEVICE", "CPU"))
    ms.set_context(mode=ms.GRAPH_MODE)
    from types import SimpleNamespace

    from qwenvl.model import build_empty, load_weights, save_model
    from qwenvl.model.lora import LoraSettings, apply_lora
    from qwenvl.parallel.world import init_distributed
    from qwenvl.parallel.zero import ZeroConfig
    from qwenvl.parallel.zero3 import shard_weights
    from qwenvl.train.freezing import apply_tuning_flags
    from qwenvl.train.optimizer import build_optimizer, save_optimizer_state
    from qwenvl.train.param_groups import build_param_groups
    from qwenvl.train.train_step import TrainStep

    mode, _, variant = mode.partition("+")  # "<mode>+layer_by_layer"
    world, stage, dtype, lora, _ = MODES[mode]
    dp = init_distributed()
    phases: dict[str, float] = {}
    model = build_empty(model_dir, dtype)
    params = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    apply_tuning_flags(model, SimpleNamespace(tune_mm_llm=not lora, tune_mm_mlp=not lora, tune_mm_vision=not lora))
    if lora:
        apply_lora(model, LoraSettings(16, 32.0, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj")))
    zero = ZeroConfig(stage)
    if stage == 3 and dp.world_size > 1:
        shard_weights(model, dp.world_size, dp.rank, zero.persistence_threshold, from_values=False)
    load_weights(model, model_dir)
    model.set_train(True)
    phases["load"] = _peak_mib()
    args = SimpleNamespace(optim="adamw_mindspore", learning_rate=1e-5, mm_projector_lr=None, vision_tower_lr=None,
                           weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
                           fp16=dtype == "float16", layer_by_layer=variant == "layer_by_layer")  # fmt: skip
    sharded = getattr(model, "zero3", None)
    optimizer = build_optimizer(build_param_groups(model, args), args, dp, zero, sharded.specs if sharded else None)
    step = TrainStep(model, optimizer, args)
    if step.loss_scale:  # from 2**16 the random model's first float16 steps overflow and skip their update
        step.loss_scale.scale = 1.0
    phases["optimizer_state"] = _peak_mib()
    batch = dict(np.load(batch_path))
    inputs = model.prepare_inputs(batch)
    if steps == 0:  # (layer by layer, the graphs compile as the step runs: no probe)
        compiled = math.nan if step.layer_by_layer else _compiled_graph_mib(step, inputs)
        _write(out, dp, {"rank": dp.rank, "params": params, "compiled_mib": compiled})
        return
    step.on_phase = lambda name: phases.setdefault(name, _peak_mib())
    times, after_step = [], {}
    for index in range(steps):
        start = time.perf_counter()
        metrics = step.run([inputs], 1.0)
        times.append(time.perf_counter() - start)
        if metrics.skipped:  # its peak would lack the optimizer update
            raise RuntimeError(f"step {index + 1} was skipped ({metrics.skip_reason}): it measures no update")
        after_step[index + 1] = _peak_mib()
    phases["steps"] = _peak_mib()
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder, write=dp.is_main)
        state, metadata = step.state_dict()
        if optimizer.owns_state_file():
            save_optimizer_state(Path(folder) / f"optimizer-rank{dp.rank}.safetensors", state, metadata)
    phases["save"] = _peak_mib()
    result = {"rank": dp.rank, "world": dp.world_size, "params": params, "peak_mib": _peak_mib(), "phases": phases,
              "after_step": after_step, "first_step_s": times[0],
              "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
              "tokens": int(np.asarray(batch["input_ids"]).size)}  # fmt: skip
    _write(out, dp, result)


def _write(out: str, dp, result: dict) -> None:
    target = Path(f"{out}.rank{dp.rank}.json") if dp.world_size > 1 else Path(out)
    target.write_text(json.dumps(result), encoding="utf-8")
    print(json.dumps(result))


def _resident_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _compiled_graph_mib(step, inputs) -> float:
    """Host memory the compiled forward/backward graph keeps: the resident set after compiling it without running
    it (MindSpore's `precompile_only`), freed heap returned first, minus the resident set before. MindSpore cannot
    run a graph compiled that way afterwards, so this probe is a process of its own. On CPU this memory is part of
    the measured peak; on Ascend it is host memory, not device memory."""
    import ctypes

    import mindspore as ms

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim(0)
    before = _resident_mib()
    ms.set_context(precompile_only=True)
    step._forward_backward(ms.Tensor(1.0, ms.float32), *step.positional(inputs))  # compiles, runs nothing
    libc.malloc_trim(0)
    return _resident_mib() - before


def _measure(mode: str, model_dir: str, batch: str, steps: int, work: Path, rss_limit_gb: float) -> dict:
    """Run the worker (under msrun for 2 workers); the rank with the highest peak, or {"error"}."""
    from tests.msrun import run_msrun

    world = MODES[_base(mode)][0]
    out = work / f"{mode}-{Path(model_dir).name}-{Path(batch).stem}-{time.monotonic_ns()}.json"
    args = [str(Path(__file__).resolve()), "--measure", model_dir, batch, mode, str(steps), str(out)]
    if world == 1:
        return run_child([sys.executable, *args], {**os.environ, "GLOG_v": "3"}, ROOT, rss_limit_gb, 3600.0)
    code, logs = run_msrun(args, work / f"logs-{out.stem}", timeout=3600, workers=world)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)
             if Path(f"{out}.rank{r}.json").is_file()]  # fmt: skip
    if code != 0 or len(ranks) != world:
        return {"error": f"msrun exit {code}: {logs[-600:]}"}
    return max(ranks, key=lambda r: r.get("peak_mib", r.get("compiled_mib")))


def _slope(points: list[dict]) -> float:
    return marginal_bytes_per_param([{"params": p["params"], "peak_rss_mib": p["peak_mib"]} for p in points])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--sizes", default=",".join(MEMORY_SIZES), help="bench/workloads.py sizes (>= 2)")
    parser.add_argument("--workload", default="image224", help="the batch for the per-parameter slope")
    parser.add_argument("--token_workload", default="image448", help="a longer batch: bytes per token (smallest size)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    parser.add_argument("--stability_steps", type=int, default=0, help="also: fp32 on the smallest size for N steps, "
                                                                        "peak after step 10 vs after step N")
    parser.add_argument("--torch_python", default=None, help=TORCH_PYTHON_HELP)
    parser.add_argument("--rss_limit_gb", type=float, default=18.0)
    parser.add_argument("--work", default=None, help="folder for weights, batches and logs (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write every measurement here")
    parser.add_argument("--layer_by_layer", action="store_true", help="train each mode with TrainStep's layer_by_layer "
                                                                       "(one decoder layer's graph at a time, recomputed)")
    parser.add_argument("--measure", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        model_dir, batch, mode, steps, out = args.measure
        worker(model_dir, batch, mode, int(steps), out)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="memory_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [s for s in args.sizes.split(",") if s]
    prepared = {size: prepare_in_child(size, [args.workload, args.token_workload], work) for size in sizes}
    results: dict = {"sizes": sizes, "workload": args.workload, "modes": {}}
    for mode in [m + ("+layer_by_layer" if args.layer_by_layer else "") for m in args.modes.split(",") if m]:
        points = []
        for size in sizes:
            point = _measure(mode, prepared[size]["model"], prepared[size]["batches"][args.workload], args.steps, work,
                             args.rss_limit_gb)  # fmt: skip
            if "error" not in point:
                probe = _measure(mode, prepared[size]["model"], prepared[size]["batches"][args.workload], 0, work,
                                 args.rss_limit_gb)  # fmt: skip
                point["compiled_mib"] = probe.get("compiled_mib", float("nan"))
            points.append({"size": size, **point})
            print(f"[memory] {mode} {size}: {json.dumps(point)}", flush=True)
        longer = _measure(mode, prepared[sizes[0]]["model"], prepared[sizes[0]]["batches"][args.token_workload],
                          args.steps, work, args.rss_limit_gb)  # fmt: skip
        results["modes"][mode] = {"points": points, "longer": longer}
    torch_python = resolve_torch_python(args.torch_python)
    if torch_python and any(_base(m) == "fp32" for m in results["modes"]):
        models = [(prepared[s]["model"], prepared[s]["batches"][args.workload]) for s in sizes]
        results["torch"] = torch_points(models, torch_python, steps=args.steps)
    if args.stability_steps:
        results["stability"] = _measure("fp32", prepared[sizes[0]]["model"], prepared[sizes[0]]["batches"][args.workload],
                                        args.stability_steps, work, args.rss_limit_gb)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    report(results)
    return 0


def report(results: dict) -> None:
    """The tables: per mode, peak by phase per size, marginal B/param against ideal and target, B/token."""
    print(f"\nPeak memory per rank (MiB), batch 1, {results['workload']}; CPU resident set\n")
    for mode, data in results["modes"].items():
        points = [p for p in data["points"] if "error" not in p]
        base = _base(mode)
        world, stage, dtype, lora, ideal = MODES[base]
        print(f"{mode}: world {world}, ZeRO stage {stage}, {dtype}{', LoRA (frozen base)' if lora else ''}")
        print("  " + f"{'size':<9}{'params':>12}" + "".join(f"{p:>19}" for p in PHASES) + f"{'step s':>9}"
              + f"{'compiled graph':>16}")  # fmt: skip
        for p in data["points"]:
            if "error" in p:
                print(f"  {p['size']:<9}{p['error'][:150]}")
                continue
            phases = "".join(f"{p['phases'].get(name, float('nan')):>19.0f}" for name in PHASES)
            print(f"  {p['size']:<9}{p['params']:>12,}{phases}{p['step_s']:>9.2f}"
                  f"{p.get('compiled_mib', float('nan')):>16.0f}")  # fmt: skip
        if len(points) >= 2:
            slope = _slope(points)
            verdict = "met" if slope <= TARGETS[base] else "NOT met"
            print(f"  marginal {slope:.1f} bytes/param (ideal {ideal:.1f}, target <= {TARGETS[base]:g}: {verdict})")
            if all(math.isfinite(p.get("compiled_mib", math.nan)) for p in points):
                graph = _slope([{**p, "peak_mib": p["compiled_mib"]} for p in points])
                print(f"  of which the compiled graph's host memory {graph:.1f} bytes/param (it grows with the "
                      f"layer count, not the width); without it {slope - graph:.1f} bytes/param")  # fmt: skip
        longer = data.get("longer", {})
        if points and longer and "error" not in longer and longer["tokens"] <= points[0]["tokens"]:
            print(f"  per token: --token_workload has {longer['tokens']} tokens, not more than --workload's "
                  f"{points[0]['tokens']}")  # fmt: skip
        elif points and longer and "error" not in longer:
            tokens = longer["tokens"] - points[0]["tokens"]
            per_token = (longer["peak_mib"] - points[0]["peak_mib"]) * 2**20 / tokens
            where = f"({points[0]['tokens']} -> {longer['tokens']} tokens, {points[0]['size']})"
            if per_token > 0:
                print(f"  {per_token / 1024:.0f} KiB per token {where}")
            else:  # e.g. ZeRO's gradient buckets or optimizer phase set both peaks
                print(f"  per token: not measurable {where}: the peak is set by a phase the tokens do not change")
        print()
    torch = results.get("torch")
    if torch:
        usable = [p for p in torch if "error" not in p]
        print("transformers + torch, float32 AdamW, same weights and batch: peak "
              + ", ".join(f"{p['params']:,}: {p['peak_rss_mib']:.0f} MiB" for p in usable))
        if len(usable) >= 2:
            print(f"  marginal {marginal_bytes_per_param(usable):.1f} bytes/param")
    elif any(_base(m) == "fp32" for m in results["modes"]):
        print("transformers + torch: not measured (no --torch_python; bash bench/make_torch_venv.sh creates the venv)")
    stability = results.get("stability")
    if stability and "error" not in stability:
        steps = sorted(int(k) for k in stability["after_step"])
        at10, last = stability["after_step"][str(min(10, steps[-1]))], stability["after_step"][str(steps[-1])]
        print(f"\nstability (fp32, {results['sizes'][0]}): peak {at10:.1f} MiB after step {min(10, steps[-1])}, "
              f"{last:.1f} MiB after step {steps[-1]} ({last - at10:+.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
