"""transformers + torch training steps on a model folder written by `qwenvl.model.save_model`: the reference the
benchmarks compare the native MindSpore step with. Run with the torch venv's python (bench/make_torch_venv.sh);
this file never imports MindSpore or qwenvl.

    ~/.venvs/torch-ref/bin/python bench/torch_reference.py --model DIR --batch BATCH.npz --steps 10 [--tuned]

Each step: forward (attn_implementation="sdpa", float32, train mode), token-mean cross-entropy of the shifted
labels (bench/workloads.py), backward, `clip_grad_norm_(max_norm)`, `torch.optim.AdamW` step, `zero_grad`.
`--warmup` steps run first (step 0, timed separately as the first step), then `--steps` timed ones. The
output is one JSON line: per-step wall times, median / min, tokens/s, the step-0 loss, gradient norms (the
vision tower's separately), RSS at the phases of step 0 (after load, forward, backward, optimizer step) and
the peak RSS (ru_maxrss).

`--tuned` re-executes itself with CPU library settings an experienced torch user would apply, and reports
which took effect: MKL's AVX-512 code path (MKL only takes its fast paths on Intel CPUs; a tiny preloaded
library answering MKL's `mkl_serv_intel_cpu_true` with 1 lifts that, `MKL_ENABLE_INSTRUCTIONS=AVX512`
caps it at AVX-512; the old `MKL_DEBUG_CPU_TYPE=5` is ignored by MKL >= 2020.1), and an allocator that
reuses freed blocks (jemalloc, else tcmalloc, from Debian's packages, via LD_PRELOAD; glibc tunables
otherwise). torch's own thread count (the core count) is kept.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import IGNORE_INDEX, load_batch, vision_grad_summary  # noqa: E402  (numpy only)

TUNED_MARK = "QWENVL_BENCH_TORCH_TUNED"
DEFAULT_TORCH_PYTHON = Path.home() / ".venvs" / "torch-ref" / "bin" / "python"
TORCH_PYTHON_HELP = f"torch venv python (bench/make_torch_venv.sh; default {DEFAULT_TORCH_PYTHON} if present; '' none)"
MALLOCS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
# jemalloc as PyTorch's CPU performance guide configures it: keep freed pages for reuse.
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
MKL_SHIM_SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"


def resolve_torch_python(flag: str | None) -> str | None:
    """--torch_python: the given path, '' for none, or the default venv's python when it exists."""
    if flag is not None:
        return flag or None
    return str(DEFAULT_TORCH_PYTHON) if DEFAULT_TORCH_PYTHON.exists() else None


def torch_command(torch_python: str, model: str | Path, batch: str | Path, steps: int, warmup: int, tuned: bool = False,
                  hyper: dict | None = None) -> list[str]:
    """The command line that runs this file under the torch venv's python (hyper: --lr, --beta1, ... values)."""
    flags = [f"--{key}={value}" for key, value in (hyper or {}).items()] + (["--tuned"] if tuned else [])
    return [torch_python, os.path.abspath(__file__), "--model", str(model), "--batch", str(batch),
            "--steps", str(steps), "--warmup", str(warmup), *flags]  # fmt: skip


def _mkl_shim() -> tuple[str | None, str]:
    """Path of the compiled `mkl_serv_intel_cpu_true` shim (built once into ~/.cache), or None and why."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwenvl-bench"
    shim = cache / "mkl_intel_cpu_true.so"
    if shim.exists():
        return str(shim), "cached"
    cache.mkdir(parents=True, exist_ok=True)
    source = cache / "mkl_intel_cpu_true.c"
    source.write_text(MKL_SHIM_SOURCE, encoding="utf-8")
    for compiler in ("cc", "gcc", "clang"):
        try:
            subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(shim), str(source)], check=True,
                           capture_output=True, timeout=60)  # fmt: skip
            return str(shim), f"built with {compiler}"
        except (OSError, subprocess.SubprocessError):
            continue
    return None, "no C compiler to build the shim"


def tuned_env(base: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(environment for a tuned run, what was set and why) from `base`."""
    env, notes, preload = dict(base), {}, []
    shim, how = _mkl_shim()
    if shim:
        preload.append(shim)
        env["MKL_ENABLE_INSTRUCTIONS"] = "AVX512"
        notes["mkl"] = f"LD_PRELOAD {shim} ({how}) + MKL_ENABLE_INSTRUCTIONS=AVX512"
    else:
        notes["mkl"] = f"default path ({how})"
    allocator = next((path for path in MALLOCS if Path(path).exists()), None)
    if allocator:
        preload.append(allocator)
        if "jemalloc" in allocator:
            env["MALLOC_CONF"] = JEMALLOC_CONF
        conf = f" MALLOC_CONF={env['MALLOC_CONF']}" if "MALLOC_CONF" in env else ""
        notes["malloc"] = f"LD_PRELOAD {allocator}{conf}"
    else:
        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
        notes["malloc"] = f"glibc GLIBC_TUNABLES={GLIBC_TUNABLES} (no jemalloc/tcmalloc: apt-get install libjemalloc2)"
    env["LD_PRELOAD"] = ":".join(preload + [p for p in base.get("LD_PRELOAD", "").split(":") if p])
    env[TUNED_MARK] = json.dumps(notes)
    return env, notes


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def library_report() -> dict:
    """What the CPU libraries actually do in this process (the proof that tuned settings took effect)."""
    import torch

    report = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available()}  # fmt: skip
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        report["mkl_cpu_detect"] = int(lib.mkl_serv_cpu_detect())  # 0: MKL's non-Intel path; 7: AVX-512
    except (OSError, AttributeError):
        report["mkl_cpu_detect"] = None
    maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    report["allocator"] = next((name for name in ("jemalloc", "tcmalloc") if name in maps), "glibc")
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(5):
        torch.mm(a, b)
    report["sgemm_gflops"] = round(5 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9, 1)
    return report


def load_model(model_dir: Path):
    import torch
    import transformers

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    cls = getattr(transformers, config["architectures"][0])
    model = cls.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    return model


def token_mean_loss(logits, labels):
    """bench/workloads.py's loss: labels shifted left (HF's ForCausalLMLoss layout, no logits copy), summed
    cross-entropy over targets divided by their count."""
    import torch
    import torch.nn.functional as F

    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=IGNORE_INDEX,
                            reduction="sum")  # fmt: skip
    return total / (shifted != IGNORE_INDEX).sum().to(torch.float32)


def model_inputs(batch: dict, use_position_ids: bool) -> dict:
    """Keyword inputs for the HF forward; position_ids only when asked (HF computes its own rope index)."""
    import torch

    keys = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
    keys += ["position_ids"] if use_position_ids else []
    return {key: torch.from_numpy(batch[key]) for key in keys if key in batch}


def _grad_array(param):
    return param.grad.detach().numpy() if param.grad is not None else np.zeros(tuple(param.shape), np.float32)


def train(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    libraries = library_report()
    start = time.perf_counter()
    model = load_model(Path(args.model))
    load_s = time.perf_counter() - start
    batch = load_batch(args.batch)
    inputs = model_inputs(batch, args.use_position_ids)
    labels = torch.from_numpy(batch["labels"])
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                                  weight_decay=args.weight_decay)  # fmt: skip
    phases = {"after_load": {"rss_mib": _rss_mib(), "peak_mib": _peak_mib()}}
    losses, times, norms = [], [], []
    vision = None
    for index in range(args.warmup + args.steps):
        first = index == 0
        begin = time.perf_counter()
        logits = model(**inputs, use_cache=False).logits
        loss = token_mean_loss(logits, labels)
        if first:
            phases["after_forward"] = {"rss_mib": _rss_mib(), "peak_mib": _peak_mib()}
        loss.backward()
        if first:
            phases["after_backward"] = {"rss_mib": _rss_mib(), "peak_mib": _peak_mib()}
            if "pixel_values" in inputs:  # not part of the step: its time is left out of the first step's
                check_start = time.perf_counter()
                vision = vision_grad_summary((name, _grad_array(p)) for name, p in named)
                begin += time.perf_counter() - check_start
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        del logits, loss
        times.append(time.perf_counter() - begin)
        if first:
            phases["after_optimizer"] = {"rss_mib": _rss_mib(), "peak_mib": _peak_mib()}
    timed = times[args.warmup :] or times
    n_tokens = int(batch["input_ids"].size)
    return {
        "impl": "torch_tuned" if os.environ.get(TUNED_MARK) else "torch",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "tuned": json.loads(os.environ[TUNED_MARK]) if os.environ.get(TUNED_MARK) else None,
        "libraries": libraries, "params": sum(p.numel() for p in params), "n_tokens": n_tokens,
        "load_s": load_s, "first_step_s": times[0], "step_s": timed, "median_s": statistics.median(timed),
        "min_s": min(timed), "tokens_per_s": n_tokens / statistics.median(timed), "loss0": losses[0],
        "losses": losses, "grad_norm0": norms[0], "vision_grads0": vision, "phases": phases,
        "peak_rss_mib": _peak_mib(), "qwenvl_imported": any(m.startswith(("qwenvl", "mindspore")) for m in sys.modules),
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (config.json + safetensors, HF names)")
    parser.add_argument("--batch", required=True, help=".npz written by bench/workloads.py save_batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (step 0 is the first-step time)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta1", type=float, default=0.9)
    parser.add_argument("--beta2", type=float, default=0.999)
    parser.add_argument("--eps", type=float, default=1e-8)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--use_position_ids", action="store_true", help="pass our position_ids instead of HF's own")
    parser.add_argument("--tuned", action="store_true", help="MKL AVX-512 path + allocator reuse (see above)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.tuned and not os.environ.get(TUNED_MARK):
        env, _ = tuned_env(dict(os.environ))
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
    print(json.dumps(train(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
