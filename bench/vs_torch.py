"""The native compiled training step against what upstream users run (transformers 4.57.1 + torch 2.13 CPU,
default and with tuned CPU libraries) and against mindnlp, on the same weights and batches, in one run.

    python bench/vs_torch.py                                  # 2 sizes x 4 workloads, all implementations
    python bench/vs_torch.py --sizes tiny --steps 3           # quick check
    python bench/vs_torch.py --sizes 120m --workloads text512 --impls native,torch,torch_tuned

Needs the torch reference venv: `bash bench/make_torch_venv.sh` (default ~/.venvs/torch-ref, used when present;
else pass --torch_python). Without it the torch columns read "not measured (no --torch_python)".

Sizes and workloads: bench/workloads.py (tiny = 0.22 M params, 120m = Qwen2.5-VL with an 8 x 512 LLM, tied
151936 vocabulary, 8 x 384 vision tower; text512 / text1024 / text2048 text tokens, image448 = one 448x448
image inside 200 text tokens), batch 1. The weights are built once per size (`build_model` + `save_model`) and
every implementation loads that folder. Each implementation runs in its own process per workload, the order
alternating from workload to workload. A step is forward, token-mean loss, backward, clipping to norm 1.0 and
AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, weight decay 0); step 0 is the first step (compilation for the
native step), then warm-up, then the timed steps (median and min reported). Checked in the same run: the
step-0 losses of native and torch agree (rtol 1e-5) and, on image workloads, every implementation's vision
tower receives non-zero gradients; a failed check makes the exit status 1.

Implementations: native = `qwenvl.train.train_step.TrainStep` + `build_optimizer` in graph mode (as
bench/train_step.py and train_qwen.py run it; its step includes `model.prepare_inputs`, the host-side masks
and indices the trainer builds every step, as HF's forward computes its rope index every step); torch / torch_tuned = bench/torch_reference.py (HF eager forward
with SDPA); mindnlp = the same HF model on mindtorch (PyNative), with a per-parameter AdamW in tensor ops and
torch-style clipping (mindtorch's own `clip_grad_norm_` and AdamW fail on CPU).
A child whose RSS passes --rss_limit_gb is stopped and reported as out of memory (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from child_process import run_child  # noqa: E402
from torch_reference import TORCH_PYTHON_HELP, resolve_torch_python, torch_command  # noqa: E402
from workloads import (  # noqa: E402
    WORKLOADS,
    check_vision_grads,
    load_batch,
    n_tokens,
    prepare_in_child,
    vision_grad_summary,
)

IMPLS = ("native", "torch", "torch_tuned", "mindnlp")
HYPER = {"lr": 1e-5, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0}
LOSS_RTOL = 1e-5
NO_TORCH = "not measured (no --torch_python)"


# ------------------------------------------------------------------------------------------- child processes


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _summary(impl: str, times: list[float], warmup: int, batch: dict, **extra) -> dict:
    timed = times[warmup:] or times
    median = statistics.median(timed)
    return {"impl": impl, "first_step_s": times[0], "step_s": timed, "median_s": median, "min_s": min(timed),
            "n_tokens": n_tokens(batch), "tokens_per_s": n_tokens(batch) / median, "peak_rss_mib": _peak_mib(),
            **extra}  # fmt: skip


def run_native(model_dir: Path, batch: dict, steps: int, warmup: int) -> dict:
    """TrainStep + build_optimizer in graph mode, as bench/train_step.py runs them."""
    from qwenvl.model import load_model, named_parameters
    from qwenvl.runtime import graph_mode, select_device
    from qwenvl.train.argument import parse_args
    from qwenvl.train.freezing import apply_tuning_flags
    from qwenvl.train.optimizer import build_optimizer
    from qwenvl.train.param_groups import build_param_groups
    from qwenvl.train.train_step import TrainStep, seed_everything

    select_device()
    seed_everything(0)
    flags = ["--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "True",
             "--learning_rate", str(HYPER["lr"]), "--adam_beta1", str(HYPER["beta1"]), "--adam_beta2",
             str(HYPER["beta2"]), "--adam_epsilon", str(HYPER["eps"]), "--weight_decay", str(HYPER["weight_decay"]),
             "--max_grad_norm", str(HYPER["max_grad_norm"])]  # fmt: skip
    with graph_mode():
        start = time.perf_counter()
        model = load_model(model_dir)
        load_s = time.perf_counter() - start
        model_args, _, training = parse_args(flags)
        apply_tuning_flags(model, model_args)
        model.set_train(True)
        step = TrainStep(model, build_optimizer(build_param_groups(model, training), training), training)
        phases = {"after_load": {"rss_mib": _rss_mib(), "peak_mib": _peak_mib()}}
        times, losses, norms = [], [], []
        for index in range(warmup + steps):
            begin = time.perf_counter()
            metrics = step.run([model.prepare_inputs(batch)], 1.0)
            times.append(time.perf_counter() - begin)
            losses.append(metrics.loss)
            norms.append(metrics.grad_norm)
            if index == 0:
                phases["after_first_step"] = {"rss_mib": _rss_mib(), "peak_mib": _peak_mib()}
        result = _summary("native", times, warmup, batch, load_s=load_s, loss0=losses[0], losses=losses,
                          grad_norm0=norms[0], phases=phases)  # fmt: skip
        if "pixel_values" in batch:  # after the measurements: one more compiled forward/backward for the check
            names = {id(p): name for name, p in named_parameters(model).items()}
            _, _, grads = step.forward_backward(model.prepare_inputs(batch))
            result["vision_grads"] = vision_grad_summary(
                (names[id(p)], g.asnumpy()) for p, g in zip(step.optimizer.parameters, grads))  # fmt: skip
    return result


def run_mindnlp(model_dir: Path, batch: dict, steps: int, warmup: int) -> dict:
    """The HF model under mindnlp (PyNative): value_and_grad, torch-style clipping, per-parameter AdamW."""
    import mindnlp  # noqa: F401  (maps torch / transformers onto MindSpore; this process only)
    import torch
    import torch.nn.functional as F
    import transformers
    from mindtorch.autograd import value_and_grad

    from tests.test_model_qwen3 import _patch_mindtorch  # `.to(same device)` would detach the vision features

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architecture = config["architectures"][0]
    text_classes = (transformers.Qwen3VLTextModel,) if architecture.startswith("Qwen3VL") else ()
    _patch_mindtorch(torch, text_classes)
    start = time.perf_counter()
    model = getattr(transformers, architecture).from_pretrained(model_dir, attn_implementation="sdpa")
    load_s = time.perf_counter() - start
    model.train()
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    inputs = {key: torch.tensor(batch[key]) for key in keys if key in batch}
    labels = torch.tensor(batch["labels"])
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    def loss_fn():
        logits = model(**inputs, use_cache=False).logits
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=-100,
                                reduction="sum")  # fmt: skip
        return total / (shifted != -100).sum().to(torch.float32)

    forward_backward = value_and_grad(loss_fn, params, attach_grads=True)

    def clip_and_adamw(t: int) -> float:
        norm = sum((p.grad * p.grad).sum() for p in params).sqrt()
        coef = torch.clamp(HYPER["max_grad_norm"] / (norm + 1e-6), max=1.0)
        lr, b1, b2, eps, wd = (HYPER[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
        bc1, bc2_sqrt = 1 - b1**t, (1 - b2**t) ** 0.5
        with torch.no_grad():
            for p, (m, v) in zip(params, moments):
                g = p.grad * coef
                if wd:
                    p.mul_(1 - lr * wd)
                m.mul_(b1).add_(g * (1 - b1))
                v.mul_(b2).add_(g * g * (1 - b2))
                p.sub_((lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps))
                p.grad = None
        return float(norm)

    times, losses, norms, vision = [], [], [], None
    phases = {"after_load": {"rss_mib": _rss_mib(), "peak_mib": _peak_mib()}}
    for index in range(warmup + steps):
        begin = time.perf_counter()
        loss = forward_backward()
        if index == 0 and "pixel_values" in inputs:
            check_start = time.perf_counter()
            vision = vision_grad_summary((name, p.grad.asnumpy()) for name, p in named)
            begin += time.perf_counter() - check_start
        norms.append(clip_and_adamw(index + 1))
        losses.append(float(loss))
        times.append(time.perf_counter() - begin)
        if index == 0:
            phases["after_first_step"] = {"rss_mib": _rss_mib(), "peak_mib": _peak_mib()}
    return _summary("mindnlp", times, warmup, batch, load_s=load_s, loss0=losses[0], losses=losses,
                    grad_norm0=norms[0], vision_grads=vision, phases=phases)  # fmt: skip


def child_main(args: argparse.Namespace) -> int:
    runner = {"native": run_native, "mindnlp": run_mindnlp}[args.child]
    result = runner(Path(args.model), load_batch(args.batch), args.steps, args.warmup)
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------- parent


def child_command(impl: str, torch_python: str | None, model: str, batch: str, steps: int, warmup: int) -> list | None:
    """The measurement process's command line; None for torch without a torch venv."""
    if impl in ("torch", "torch_tuned"):
        tuned = impl == "torch_tuned"
        return torch_command(torch_python, model, batch, steps, warmup, tuned, HYPER) if torch_python else None
    return [sys.executable, __file__, "--child", impl, "--model", model, "--batch", batch, "--steps", str(steps),
            "--warmup", str(warmup)]  # fmt: skip


def checks(results: dict, workload: str) -> list[str]:
    """Failed checks of one (size, workload): loss equality native vs torch, non-zero vision gradients."""
    problems = []
    native, torch_ = results.get("native", {}), results.get("torch", {})
    if "loss0" in native and "loss0" in torch_:
        rel = abs(native["loss0"] - torch_["loss0"]) / abs(torch_["loss0"])
        if rel > LOSS_RTOL:
            problems.append(f"step-0 loss native {native['loss0']:.7f} vs torch {torch_['loss0']:.7f} (rel {rel:.1e})")
    for impl, result in results.items():
        if workload.startswith("image") and "error" not in result and "median_s" in result:
            try:
                check_vision_grads(result.get("vision_grads", result.get("vision_grads0")), impl)
            except AssertionError as error:
                problems.append(str(error))
    return problems


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _cell(result: dict | None) -> str:
    if result is None:
        return "–"
    if "error" in result:
        return result["error"]
    return f"{_time(result['median_s'])} (min {_time(result['min_s'])})"


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b or key not in a or key not in b:
        return "–"
    return f"{a[key] / b[key]:.2f}x"


def _field(result: dict | None, key: str, form: str) -> str:
    return form.format(result[key]) if result and key in result else "–"


def render(rows: list[tuple[str, str, dict]], impls: list[str], steps: int, warmup: int) -> str:
    every = " / ".join(impls)
    head = ["model / workload", *impls, "native / torch", "native / torch tuned", f"peak RSS MiB ({every})",
            "tokens/s native / torch", f"first step s ({every})", "step-0 loss native / torch"]  # fmt: skip
    lines = [f"median (min) of {steps} timed steps after {warmup} warm-up steps; batch 1", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for size, workload, results in rows:
        native, torch_, tuned = (results.get(k) for k in ("native", "torch", "torch_tuned"))
        peaks = " / ".join(_field(results.get(i), "peak_rss_mib", "{:.0f}") for i in impls)
        firsts = " / ".join(_field(results.get(i), "first_step_s", "{:.1f}") for i in impls)
        tps = " / ".join(f"{r['tokens_per_s']:.0f}" if r and "tokens_per_s" in r else "–" for r in (native, torch_))
        losses = " / ".join(f"{r['loss0']:.7f}" if r and "loss0" in r else "–" for r in (native, torch_))
        cells = [f"{size}, {workload}", *(_cell(results.get(i)) for i in impls), _ratio(native, torch_, "median_s"),
                 _ratio(native, tuned, "median_s"), peaks, tps, firsts, losses]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuned_settings(rows: list[tuple[str, str, dict]]) -> str:
    for _, _, results in rows:
        tuned, plain = results.get("torch_tuned", {}), results.get("torch", {})
        if "tuned" in tuned:
            lib, base = tuned["libraries"], plain.get("libraries", {})
            return (f"torch tuned: {tuned['tuned']['mkl']}; {tuned['tuned']['malloc']}. Took effect: MKL cpu path "
                    f"{base.get('mkl_cpu_detect')} -> {lib['mkl_cpu_detect']}, allocator {base.get('allocator')} -> "
                    f"{lib['allocator']}, 1024^3 sgemm {base.get('sgemm_gflops')} -> {lib['sgemm_gflops']} GFLOP/s, "
                    f"{lib['threads']} threads, oneDNN {'available' if lib['mkldnn'] else 'absent'}")  # fmt: skip
    return ""


def parent_main(args: argparse.Namespace) -> int:
    impls = args.impls.split(",")
    torch_python = resolve_torch_python(args.torch_python)
    env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
    work = Path(args.work or tempfile.mkdtemp(prefix="vs_torch_"))
    work.mkdir(parents=True, exist_ok=True)
    started, rows, problems, flip = time.monotonic(), [], [], False
    for size in args.sizes.split(","):
        prepared = prepare_in_child(size, args.workloads.split(","), work)
        for workload in args.workloads.split(","):
            results = {}
            for impl in (reversed(impls) if flip else impls):
                steps, warmup = (args.mindnlp_steps, 1) if impl == "mindnlp" else (args.steps, args.warmup)
                cmd = child_command(impl, torch_python, prepared["model"], prepared["batches"][workload], steps, warmup)
                if cmd is None:
                    results[impl] = {"error": NO_TORCH}
                    continue
                results[impl] = run_child(cmd, env, ROOT, args.rss_limit_gb, args.child_timeout)
                print(f"[vs_torch] {size} {workload} {impl}: {_cell(results[impl])} "
                      f"(process {results[impl].get('wall_s', 0):.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
            flip = not flip
            rows.append((size, workload, {i: results[i] for i in impls}))
            if args.json:  # after every workload, so a stopped run keeps what it measured
                raw = [{"size": s, "workload": w, "results": r} for s, w, r in rows]
                Path(args.json).write_text(json.dumps(raw, indent=1), encoding="utf-8")
            problems += [f"{size} {workload}: {p}" for p in checks(results, workload)]
    print(render(rows, impls, args.steps, args.warmup))
    print(tuned_settings(rows))
    if "mindnlp" in impls:
        print(f"mindnlp: median of {args.mindnlp_steps} timed steps after 1 warm-up step")
    print(f"total wall time {time.monotonic() - started:.0f} s")
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,120m", help="comma list of bench/workloads.py sizes")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of workloads")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (native and torch)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, including the first step")
    parser.add_argument("--mindnlp_steps", type=int, default=3, help="timed mindnlp steps (it is ~30x slower)")
    parser.add_argument("--torch_python", default=None, help=TORCH_PYTHON_HELP)
    parser.add_argument("--rss_limit_gb", type=float, default=18.0, help="stop a child whose RSS exceeds this")
    parser.add_argument("--child_timeout", type=float, default=3600.0, help="seconds per child process")
    parser.add_argument("--work", default=None, help="folder for weights and batches (default: a new temp folder)")
    parser.add_argument("--json", default=None, help="also write every raw result to this file")
    parser.add_argument("--child", choices=("native", "mindnlp"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
