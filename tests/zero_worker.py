"""ZeRO stages on the tiny Qwen2.5-VL, launched by msrun with 2 workers (or run in-process as a world of one).

`msrun --worker_num=2 ... python tests/zero_worker.py MODEL_DIR OUT` trains, for every run in RUNS, STEPS
optimizer steps on this rank's share of fixed global batches (two micro-batches of one sample per rank:
accumulation and the reduction both happen) and writes `OUT/<run>-rank<r>.npz`: the final weights, whole
(ZeRO-3 chunks gathered), plus per-step losses and gradient norms; then `stage3_then_stage2`: 3 steps at
ZeRO-3, a checkpoint, the rest at ZeRO-2 resumed from it. A world of one trains on the whole global
batches (four micro-batches), which the test compares against. First, `gather-rank<r>.npz`: float32 chunks
(`gather_chunks`) all-gathered into float16 tensors by both all-gathers of `Collectives` (the PyNative one Ascend
runs, the host one CPU training runs), in buckets of 256 values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mindspore as ms  # noqa: E402

from qwenvl.data.rope2d import rope_index_fn  # noqa: E402
from qwenvl.model import load_model, load_weights, save_model  # noqa: E402
from qwenvl.parallel.collectives import Collectives  # noqa: E402
from qwenvl.parallel.layout import ShardSpec  # noqa: E402
from qwenvl.parallel.world import DataParallel, init_distributed  # noqa: E402
from qwenvl.parallel.zero import DEFAULT_BUCKET_ELEMENTS, ZeroConfig  # noqa: E402
from qwenvl.parallel.zero3 import align_vision, shard_weights  # noqa: E402
from qwenvl.train.freezing import apply_tuning_flags  # noqa: E402
from qwenvl.train.checkpoint import optimizer_files  # noqa: E402
from qwenvl.train.optimizer import OptimizerState, build_optimizer, save_optimizer_state  # noqa: E402
from qwenvl.train.param_groups import build_param_groups  # noqa: E402
from qwenvl.train.train_step import TrainStep  # noqa: E402

STEPS = 5
# name -> (ZeRO stage, compute dtype, layer by layer); stage 3 shards every layer weight (threshold 0), to exercise
# them all
RUNS = {"stage0": (0, "float32", False), "stage1": (1, "float32", False), "stage2": (2, "float32", False),
        "stage3": (3, "float32", False), "stage2_fp16": (2, "float16", False), "stage3_fp16": (3, "float16", False),
        "stage2_layer_by_layer": (2, "float32", True), "stage3_layer_by_layer": (3, "float32", True),
        "stage3_mixed": (3, "float32", False), "stage3_layer_by_layer_mixed": (3, "float32", True),
        "stage2_layer_by_layer_mixed": (2, "float32", True)}  # fmt: skip
# runs on `mixed` batches: rank 1's samples are text only (and step 1's all are), so its steps skip the vision
# tower unless aligned
MIXED_RUNS = {"stage3_mixed", "stage3_layer_by_layer_mixed", "stage2_layer_by_layer_mixed"}
# runs whose collectives use buckets of 256 values: nearly every tensor is cut into several by columns
SMALL_BUCKETS = {"stage1", "stage2_layer_by_layer"}
# tensors all-gathered in buckets of 256 values (128 columns at world 2): whole, cut in several, padded
GATHER_SHAPES = ((3, 5), (700,), (40, 30), (1,), (2, 64))
TEXT = (9, 14, 6, 11)  # text tokens of the four samples of a global batch (different supervised counts)


def _args(fp16: bool, layer_by_layer: bool = False) -> SimpleNamespace:
    return SimpleNamespace(optim="adamw_mindspore", learning_rate=2e-3, mm_projector_lr=None, vision_tower_lr=None,
                           weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-6, max_grad_norm=1.0,
                           fp16=fp16, layer_by_layer=layer_by_layer)  # fmt: skip


def family(config: dict) -> str:
    return "qwen3vl" if config["model_type"].startswith("qwen3") else "qwen2.5vl"


def sample(config: dict, step: int, index: int, mixed: bool = False) -> dict:
    """One sample: an 8x8-patch image between random text, labels on the text after the image; `mixed`: the
    odd-numbered samples (rank 1's of 2), and every sample of step 1, are the same text without the image."""
    rng = np.random.default_rng(1000 * step + index)
    patch = config["vision_config"]["patch_size"]
    image, start, end = config["image_token_id"], config["vision_start_token_id"], config["vision_end_token_id"]
    text = min(image, start, end, config["video_token_id"])  # ordinary tokens only below the special ones
    before = rng.integers(10, text, 3)
    after = rng.integers(10, text, TEXT[index])
    ids = np.concatenate([before, [start], [image] * 16, [end], after])[None].astype(np.int64)
    labels = np.where(np.arange(ids.shape[1]) > 20, ids, -100)
    if mixed and (index % 2 or step == 1):
        ids = np.concatenate([before, after])[None].astype(np.int64)
        positions = np.broadcast_to(np.arange(ids.shape[1]), (3, 1, ids.shape[1])).astype(np.int64)
        return {"input_ids": ids, "labels": np.where(np.arange(ids.shape[1]) > 3, ids, -100), "position_ids": positions}
    grid = np.array([[1, 8, 8]], np.int64)
    positions, _ = rope_index_fn(family(config))(2, ids, grid, None, image_token_id=image,
                                                 video_token_id=config["video_token_id"],
                                                 vision_start_token_id=start)  # fmt: skip
    pixels = rng.standard_normal((64, 3 * 2 * patch * patch)).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "pixel_values": pixels, "image_grid_thw": grid}


def gather_chunks(rank: int) -> list[np.ndarray]:
    """Rank `rank`'s float32 chunks of GATHER_SHAPES at world 2 (padding included)."""
    rng = np.random.default_rng(50 + rank)
    return [rng.normal(0, 1, ShardSpec(shape, 2, rank).chunk).astype(np.float32) for shape in GATHER_SHAPES]


def _gather_both_ways(dp: DataParallel) -> dict[str, np.ndarray]:
    comm = Collectives(dp.world_size, dp.rank, 256)
    specs = [ShardSpec(shape, dp.world_size, dp.rank) for shape in GATHER_SHAPES]
    chunks = gather_chunks(dp.rank)
    tensors = comm.all_gather([ms.Tensor(c) for c in chunks], specs, [ms.float16] * len(specs))
    out = {f"pynative{i}": full.asnumpy() for i, full in tensors}
    targets = [np.full(spec.numel, np.nan, np.float16) for spec in specs]
    comm.all_gather_on_host(chunks, targets, specs)
    return {**out, **{f"host{i}": t.reshape(spec.shape) for i, (t, spec) in enumerate(zip(targets, specs))}}


def _model(model_dir: str, dp: DataParallel, stage: int, dtype: str, layer_by_layer: bool = False,
           bucket_elements: int = DEFAULT_BUCKET_ELEMENTS):  # fmt: skip
    model = load_model(model_dir, dtype=dtype)
    apply_tuning_flags(model, SimpleNamespace(tune_mm_llm=True, tune_mm_mlp=True, tune_mm_vision=True))
    model.set_train(True)
    config = ZeroConfig(stage=stage, bucket_elements=bucket_elements, persistence_threshold=0)
    if stage == 3 and dp.world_size > 1:
        shard_weights(model, dp.world_size, dp.rank, config.persistence_threshold, from_values=True)
    args = _args(dtype == "float16", layer_by_layer)
    sharded = getattr(model, "zero3", None)
    optimizer = build_optimizer(build_param_groups(model, args), args, dp, config, sharded.specs if sharded else None)
    step = TrainStep(model, optimizer, args)
    if step.loss_scale:
        step.loss_scale.scale = 2.0**10
    return model, step


def train(model_dir: str, dp: DataParallel, stage: int, dtype: str, steps: range = range(STEPS),
          resume: Path | None = None, save: Path | None = None, sharded_list: Path | None = None,
          layer_by_layer: bool = False, bucket_elements: int = DEFAULT_BUCKET_ELEMENTS,
          mixed: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """Train `steps` (from the checkpoint folder `resume`, if given; into `save` at the end, if given)."""
    model, step = _model(model_dir, dp, stage, dtype, layer_by_layer, bucket_elements)
    if sharded_list is not None and dp.is_main and getattr(model, "zero3", None):
        sharded_list.write_text(json.dumps(sorted(model.zero3.specs)), encoding="utf-8")
    if resume is not None:
        load_weights(model, resume)
        step.load_state_dict(OptimizerState(optimizer_files(resume)))
    losses, norms = [], []
    for index in steps:
        mine = [sample(model.config, index, i, mixed) for i in range(4)][dp.rank :: dp.world_size]
        mine = align_vision(dp, model, mine, step.reduces_vision_per_micro_batch)  # as the Trainer
        metrics = step.run([model.prepare_inputs(s) for s in mine], 1.0)
        assert not metrics.skipped, metrics
        losses.append(metrics.loss)
        norms.append(metrics.grad_norm)
    if save is not None:
        save_model(model, save, write=dp.is_main)
        state, metadata = step.state_dict()
        if step.optimizer.owns_state_file():
            save_optimizer_state(save / f"optimizer-rank{dp.rank}.safetensors", state, metadata)
        dp.all_reduce_sum([ms.Tensor(np.zeros(1, np.float32))])  # every file is written before anyone reads
    sharded = getattr(model, "zero3", None)
    out = {}
    for name, param in model.parameters_and_names():
        value = sharded.gather(name, param) if sharded and name in sharded.specs else param.asnumpy()
        out[name] = np.asarray(value, np.float32)
    out["_loss"], out["_grad_norm"] = np.asarray(losses), np.asarray(norms)
    return out


def main(model_dir: str, out_dir: str, only: str = "") -> None:
    """Every run of RUNS and the resume across stages, or only the runs named in `only` (comma list); a
    ZeRO-3 run also writes which tensors it sharded (`<run>-sharded.json`)."""
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    dp = init_distributed()
    if dp.world_size != 2:
        raise SystemExit(f"expected a world of 2 under msrun, got {dp.world_size}")
    out = Path(out_dir)
    np.savez(out / f"gather-rank{dp.rank}.npz", **_gather_both_ways(dp))
    for name, (stage, dtype, layer_by_layer) in RUNS.items():
        if only and name not in only.split(","):
            continue
        bucket = 256 if name in SMALL_BUCKETS else DEFAULT_BUCKET_ELEMENTS
        result = train(model_dir, dp, stage, dtype, sharded_list=out / f"{name}-sharded.json",
                       layer_by_layer=layer_by_layer, bucket_elements=bucket, mixed=name in MIXED_RUNS)
        np.savez(out / f"{name}-rank{dp.rank}.npz", **result)
    if only:
        return
    # resume at another stage: 3 steps at ZeRO-3, its checkpoint (gathered weights, chunked optimizer state),
    # then the remaining steps at ZeRO-2 from it
    checkpoint = out / "stage3-checkpoint"
    if dp.is_main:
        checkpoint.mkdir()
    dp.all_reduce_sum([ms.Tensor(np.zeros(1, np.float32))])
    train(model_dir, dp, 3, "float32", range(3), save=checkpoint)
    resumed = train(model_dir, dp, 2, "float32", range(3, STEPS), resume=checkpoint)
    np.savez(out / f"stage3_then_stage2-rank{dp.rank}.npz", **resumed)


if __name__ == "__main__":
    main(*sys.argv[1:4])
