"""Training-step speed of the native models vs the mindnlp (transformers on MindSpore) reference, and a
memory-stability check of the compiled step.

    python bench/model_step.py                      # speed: native compiled step vs mindnlp PyNative
    python bench/model_step.py --mode memory        # peak RSS after step 10 vs after step 200

Speed mode times, on the same tiny-model inputs (one row of text around an image), the compiled
`mindspore.value_and_grad` step of the native model and the mindnlp forward+backward of the same weights:
a few warm-up steps, then the median of N. All native timings run before mindnlp is imported, because
importing it patches `mindspore.Tensor` for the whole process. Qwen3-VL is included when its native module
exists. Both implementations must give every vision-tower parameter a non-zero gradient (asserted): under
mindnlp, HF's `.to(inputs_embeds.device, ...)` of the image features round-trips through numpy and detaches
them, so without the `_patch_mindtorch` fix the mindnlp step skipped the whole vision backward pass.
"""

from __future__ import annotations

import argparse
import json
import importlib.util
import inspect
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from qwenvl.data.rope2d import rope_index_fn  # noqa: E402
from qwenvl.model import build_model, named_parameters, save_model  # noqa: E402
from qwenvl.runtime import graph_mode  # noqa: E402
from tools.make_tiny_model import tiny_config  # noqa: E402
from workloads import check_vision_grads, vision_grad_summary  # noqa: E402

IDS = {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
       "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "vocab_size": 128}  # fmt: skip
PATCH = {"qwen2.5vl": 14, "qwen2vl": 14, "qwen3vl": 16}


def make_batch(family: str, text_len: int, grid: tuple[int, int, int], batch: int, seed: int = 0) -> dict:
    """`batch` equal-length rows of `text_len` text tokens around one image of `grid` (no padding: the
    mindnlp Qwen3-VL forward fails on padded attention masks)."""
    rng = np.random.default_rng(seed)
    n_vision = int(np.prod(grid)) // 4
    half = text_len // 2
    input_ids = np.stack([
        np.concatenate([rng.integers(7, 128, half), [3], [5] * n_vision, [4], rng.integers(7, 128, text_len - half)])
        for _ in range(batch)
    ]).astype(np.int64)  # fmt: skip
    labels = np.where(input_ids > 6, input_ids, -100)
    image_grid = np.array([grid] * batch, np.int64)
    kwargs = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3)
    position_ids, _ = rope_index_fn(family)(2, input_ids, image_grid, None, **kwargs)
    patch_dim = 3 * 2 * PATCH[family] ** 2
    pixels = rng.standard_normal((int(image_grid.prod(-1).sum()), patch_dim)).astype(np.float32)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "pixel_values": pixels,
            "image_grid_thw": image_grid}  # fmt: skip


def native_step(model):
    """The compiled (loss_sum, n_tokens), grads step, its positional argument order and the gradients' names."""
    import mindspore as ms

    named = {name: p for name, p in named_parameters(model).items() if p.requires_grad}
    order = list(inspect.signature(model.construct).parameters)
    return ms.jit(ms.value_and_grad(model, None, list(named.values()), has_aux=True)), order, list(named)


def median_step(run_step: Callable[[], None], warmup: int, steps: int) -> tuple[float, float, float]:
    """(median wall seconds, median process CPU seconds, fastest wall seconds) of `run_step` after `warmup`
    untimed calls.

    CPU time (all threads) is reported too because wall time swings when other processes share the cores;
    the fastest step too, to show how steady the step time is.
    """
    walls, cpus = [], []
    for index in range(warmup + steps):
        wall, cpu = time.perf_counter(), time.process_time()
        run_step()
        if index >= warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), min(walls)


def time_native(model, batch: dict, warmup: int, steps: int) -> tuple[float, float, float]:
    """In graph mode, as train_qwen.py runs it (PyNative + jit has a bimodal step time on 2 cores)."""
    with graph_mode():
        step, order, names = native_step(model)
        inputs = model.prepare_inputs(batch)
        args = [inputs.get(name) for name in order]
        _, grads = step(*args)
        check_vision_grads(vision_grad_summary(zip(names, (g.asnumpy() for g in grads))), "native")

        def run_step() -> None:
            (loss_sum, _), grads = step(*args)
            loss_sum.asnumpy()
            grads[-1].asnumpy()

        return median_step(run_step, warmup, steps)


def time_mindnlp(model_dir: Path, batch: dict, warmup: int, steps: int) -> tuple[float, float, float]:
    import mindnlp  # noqa: F401
    import torch
    import transformers
    from mindtorch.autograd import value_and_grad

    from tests.test_model_qwen3 import _patch_mindtorch  # mindtorch defects: detaching `.to`, deepstack indexing

    architecture = _architecture(model_dir)
    _patch_mindtorch(torch, (transformers.Qwen3VLTextModel,) if architecture.startswith("Qwen3VL") else ())
    model = getattr(transformers, architecture).from_pretrained(model_dir, attn_implementation="eager")
    model.train()
    inputs = {key: torch.tensor(value) for key, value in batch.items()}
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    step = value_and_grad(lambda: model(**inputs).loss, [p for _, p in named], attach_grads=False)
    _, grads = step()
    check_vision_grads(vision_grad_summary((name, g.asnumpy()) for (name, _), g in zip(named, grads)), "mindnlp")

    def run_step() -> None:
        loss, grads = step()
        loss.asnumpy()
        grads[-1].asnumpy()

    return median_step(run_step, warmup, steps)


def _architecture(model_dir: Path) -> str:
    return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["architectures"][0]


def families() -> list[str]:
    found = ["qwen2.5vl"]
    if importlib.util.find_spec("qwenvl.model.qwen3_vl") is not None:
        found.append("qwen3vl")
    return found


def speed(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="model_step_"))
    runs = []
    for family in families():
        batch = make_batch(family, args.text_len, (1, 8, 8), args.batch)
        model = build_model(tiny_config(family, IDS), seed=0)
        save_model(model, work / family)
        tokens = int(batch["input_ids"].size)
        runs.append((family, batch, tokens, time_native(model, batch, args.warmup, args.steps)))
    print(f"inputs: batch {args.batch}, length {runs[0][1]['input_ids'].shape[1]}, one 8x8-patch image per "
          f"sample; warm-up {args.warmup}, median of {args.steps}")  # fmt: skip
    for family, batch, tokens, (native, native_cpu, native_best) in runs:
        reference, reference_cpu, reference_best = time_mindnlp(work / family, batch, args.warmup, args.steps)
        print(f"{family:10s} native compiled: {native * 1e3:8.2f} ms/step ({native_cpu * 1e3:.0f} ms CPU, "
              f"best {native_best * 1e3:.1f}) {tokens / native:7.0f} tokens/s | mindnlp PyNative: "
              f"{reference * 1e3:8.2f} ms/step ({reference_cpu * 1e3:.0f} ms CPU, best {reference_best * 1e3:.1f}) "
              f"{tokens / reference:5.0f} tokens/s | speed-up x{reference / native:.1f} median, "
              f"x{reference_best / native_best:.1f} best, x{reference_cpu / native_cpu:.1f} CPU time")  # fmt: skip


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory(args: argparse.Namespace) -> None:
    with graph_mode():
        memory_check(args)


def memory_check(args: argparse.Namespace) -> None:
    family = "qwen2.5vl"
    model = build_model(tiny_config(family, IDS), seed=0)
    step, order, _ = native_step(model)
    inputs = model.prepare_inputs(make_batch(family, args.text_len, (1, 8, 8), args.batch))
    positional = [inputs.get(name) for name in order]
    at_10 = 0.0
    for index in range(1, args.memory_steps + 1):
        (loss_sum, _), grads = step(*positional)
        loss_sum.asnumpy()
        if index == 10:
            at_10 = peak_rss_mib()
    at_end = peak_rss_mib()
    print(f"{family} compiled step, peak RSS after step 10: {at_10:.1f} MiB, after step {args.memory_steps}: "
          f"{at_end:.1f} MiB (growth {at_end - at_10:+.1f} MiB)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("speed", "memory"), default="speed")
    parser.add_argument("--batch", type=int, default=1, help="rows per step (mindnlp Qwen3-VL deepstack fails on more)")
    parser.add_argument("--text-len", type=int, default=200, help="text tokens per sample")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--memory-steps", type=int, default=200)
    args = parser.parse_args(argv)
    if args.mode == "speed":
        speed(args)
    else:
        memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
