"""ZeRO: the chunk layout, bucketing, the --zero_stage / --deepspeed mapping, and every stage under msrun with
2 CPU workers against one process on the whole batch (MindSpore's CPU backend runs the ReduceScatter twin)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from qwenvl.errors import FlagError
from qwenvl.parallel.collectives import buckets, column_buckets
from qwenvl.parallel.layout import ShardSpec
from qwenvl.parallel.zero import DEFAULT_BUCKET_ELEMENTS, DEFAULT_PERSISTENCE_THRESHOLD, ZeroConfig, zero_config
from tests.msrun import ROOT, run_msrun


def test_chunks_split_flattened_values_with_zero_padding():
    full = np.arange(10, dtype=np.float32).reshape(2, 5)
    specs = [ShardSpec((2, 5), 3, rank) for rank in range(3)]
    assert [s.chunk for s in specs] == [4, 4, 4] and specs[0].padded == 12 and specs[0].local_shape == (4,)
    assert [s.bounds() for s in specs] == [(0, 4), (4, 8), (8, 10)]
    chunks = [s.take(full) for s in specs]
    np.testing.assert_array_equal(chunks[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(chunks[2], [8, 9, 0, 0])  # the last chunk is padded with zeros
    np.testing.assert_array_equal(specs[1].join(chunks), full)
    whole = ShardSpec((2, 5))
    assert whole.local_shape == (2, 5) and whole.take(full) is not None and np.array_equal(whole.take(full), full)
    tiny = ShardSpec((1,), 4, 3)  # more ranks than values: empty real part, all padding
    assert tiny.bounds() == (1, 1) and tiny.take(np.ones(1)).tolist() == [0.0]
    with pytest.raises(ValueError, match="chunks"):
        specs[0].join(chunks[:2])


def test_buckets_group_consecutive_tensors_up_to_the_size():
    assert list(buckets([4, 4, 4, 10, 1, 1], 8)) == [[0, 1], [2], [3], [4, 5]]
    assert list(buckets([3], 1)) == [[0]]  # a tensor larger than a bucket travels alone
    assert list(buckets([], 8)) == []


def test_column_buckets_cut_large_tensors_by_columns_of_their_rows():
    """World 2, buckets of 8 values = 4 columns of the (2, chunk) rows: chunks 3, 6, 1, 2 columns."""
    specs = [ShardSpec((6,), 2, 0), ShardSpec((12,), 2, 0), ShardSpec((2,), 2, 0), ShardSpec((3,), 2, 0)]
    assert [s.chunk for s in specs] == [3, 6, 1, 2]
    assert list(column_buckets(specs, 8)) == [
        [(0, 0, 3), (1, 0, 1)], [(1, 1, 5)], [(1, 5, 6), (2, 0, 1), (3, 0, 2)]]  # fmt: skip
    assert list(column_buckets(specs, 1)) == [[(0, 0, 1)], [(0, 1, 2)], [(0, 2, 3)], [(1, 0, 1)], [(1, 1, 2)],
                                               [(1, 2, 3)], [(1, 3, 4)], [(1, 4, 5)], [(1, 5, 6)], [(2, 0, 1)],
                                               [(3, 0, 1)], [(3, 1, 2)]]  # fmt: skip
    assert list(column_buckets([], 8)) == []


def _args(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"zero_stage": None, "deepspeed": None, "optim": "adamw_mindspore", **kw})


def test_stage_comes_from_zero_stage_deepspeed_json_or_the_legacy_optimizer(tmp_path):
    assert zero_config(_args()) == (ZeroConfig(), None)
    assert zero_config(_args(zero_stage=2))[0].stage == 2
    assert zero_config(_args(optim="adamw_zero1_mindspore")) == (ZeroConfig(1), "ZeRO stage 1")
    # upstream's zero3.json: "auto" sizes take our defaults, explicit ones are used
    upstream = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_param_persistence_threshold": 1e4}}
    (tmp_path / "zero3.json").write_text(json.dumps(upstream), encoding="utf-8")
    config, note = zero_config(_args(deepspeed=str(tmp_path / "zero3.json")))
    assert config == ZeroConfig(3, DEFAULT_BUCKET_ELEMENTS, 10_000)
    assert note.startswith(f"--deepspeed {tmp_path / 'zero3.json'}: ZeRO stage 3")
    assert zero_config(_args(deepspeed=str(tmp_path / "zero3.json"), zero_stage=3))[0].stage == 3
    with pytest.raises(FlagError, match="contradicts"):
        zero_config(_args(deepspeed=str(tmp_path / "zero3.json"), zero_stage=2))
    (tmp_path / "bad.json").write_text("{stage: 2", encoding="utf-8")
    with pytest.raises(FlagError, match="cannot read it as JSON"):
        zero_config(_args(deepspeed=str(tmp_path / "bad.json")))
    (tmp_path / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}', encoding="utf-8")
    assert zero_config(_args(deepspeed=str(tmp_path / "zero2.json")))[0] == ZeroConfig(2, DEFAULT_BUCKET_ELEMENTS,
                                                                                     DEFAULT_PERSISTENCE_THRESHOLD)
    with pytest.raises(FlagError, match="stage"):
        ZeroConfig(4)


@pytest.mark.parametrize("family", ["qwen2vl", "qwen2.5vl", "qwen3vl"])
def test_an_idle_image_runs_the_vision_tower_and_changes_no_loss_or_gradient(family):
    """What a ZeRO-3 rank without images runs when another rank has some (`zero3.align_vision`): the text-only
    batch with `with_idle_image` gets vision inputs (one merge window) whose feature no token takes; the loss and
    every text gradient equal the text-only batch's, and every vision gradient is exactly zero."""
    import mindspore as ms

    from qwenvl.model.layers import with_idle_image
    from tests.test_layer_by_layer import _model_and_batch, _positional, _whole_graph

    model, batch = _model_and_batch(family)
    text = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids", "attention_mask")}
    text["input_ids"] = np.where(np.isin(text["input_ids"], [model.config["image_token_id"],
                                                             model.config["video_token_id"]]), 20, text["input_ids"])
    idle = with_idle_image(text, model.merge, model.patch_values)
    inputs = model.prepare_inputs(idle)
    assert "pixel_values" in inputs and "pixel_values" not in model.prepare_inputs(text)
    assert inputs["pixel_values"].shape[0] == model.merge**2 and not inputs["vision_slots"].asnumpy().any()
    params = list(model.trainable_params())
    scale = ms.Tensor(1.0, ms.float32)
    (_, want_sum, want_tokens), want = _whole_graph(model, params, scale, _positional(model, text))
    (_, got_sum, got_tokens), got = _whole_graph(model, params, scale, _positional(model, idle))
    assert float(got_tokens) == float(want_tokens) > 0
    np.testing.assert_allclose(float(got_sum), float(want_sum), rtol=1e-6)
    vision = [i for i, p in enumerate(params) if p.name.startswith("model.visual.")]
    assert vision and all(not got[i].asnumpy().any() for i in vision)
    for i, param in enumerate(params):
        np.testing.assert_allclose(got[i].asnumpy(), want[i].asnumpy(), rtol=1e-6, atol=1e-7, err_msg=param.name)


@pytest.mark.slow
def test_every_stage_on_two_workers_equals_one_process(tiny_model_factory, tmp_path):
    """2 ranks x 2 micro-batches of one sample = 1 process x 4 micro-batches (token-weighted sums), 5 AdamW steps
    with weight decay and clipping, for ZeRO stages 0-3 (stage 3 shards every layer weight), float16, and stages 2
    and 3 run layer by layer (`TrainStep`'s `layer_by_layer`); stage 1 and layer-by-layer stage 2 with buckets of
    256 values, so their reduce-scatters and all-gathers cut nearly every tensor into several. The `mixed` runs
    (ZeRO-3 whole graph and layer by layer, ZeRO-2 layer by layer) give rank 1 text-only samples while rank 0's
    have images, and step 1 text only on both: rank 1 runs the vision tower on an idle image where rank 0 has an
    image (`zero3.align_vision`), both skip the vision gradients' reduction at step 1, and they equal one process
    on the same batches.

    float32: every weight within 1e-6 (absolute, plus 1e-6 relative; weights are 0.02-1.0 in size), losses and
    gradient norms within 1e-6 relative: only the order of float32 sums differs. float16 (loss scale 2**10, float32
    masters): losses within 1e-4 and gradient norms within 1e-3 of the float32 run, and the weights' mean distance
    to it below 2% of how far training moved them (float16 gradients round small entries to zero, which moves
    those weights by a whole Adam step or not at all). Resuming at ZeRO-2 from a ZeRO-3 checkpoint (gathered
    weights, chunked optimizer state) ends where the uninterrupted runs end.
    """
    import mindspore as ms

    from qwenvl.model import load_model
    from qwenvl.parallel.world import DataParallel
    from tests.zero_worker import GATHER_SHAPES, MIXED_RUNS, RUNS, STEPS, gather_chunks, train

    tiny = tiny_model_factory("qwen2.5vl")
    out = tmp_path / "out"
    out.mkdir()
    code, logs = run_msrun([str(ROOT / "tests" / "zero_worker.py"), str(tiny), str(out)], tmp_path / "logs", timeout=900)
    assert code == 0, logs
    # both all-gathers: rank 0's chunk then rank 1's, the padding dropped, in float16
    ranks = [gather_chunks(rank) for rank in range(2)]
    for i, shape in enumerate(GATHER_SHAPES):
        want = np.concatenate([ranks[0][i], ranks[1][i]])[: int(np.prod(shape))].astype(np.float16).reshape(shape)
        for rank in range(2):
            got = np.load(out / f"gather-rank{rank}.npz")
            for way in ("pynative", "host"):
                np.testing.assert_array_equal(got[f"{way}{i}"], want, err_msg=f"{way} rank {rank} {shape}")
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        reference = {dtype: train(str(tiny), DataParallel(), 0, dtype) for dtype in ("float32", "float16")}
        reference["mixed"] = train(str(tiny), DataParallel(), 0, "float32", mixed=True)
    finally:
        ms.set_context(mode=previous)
    want = reference["float32"]
    initial = {n: p.asnumpy() for n, p in load_model(tiny).parameters_and_names()}
    moved = np.mean(np.concatenate([np.abs(want[n] - w).ravel() for n, w in initial.items()]))
    assert moved > 1e-4  # training moved the weights: the comparisons are not between initialisations
    assert np.abs(reference["mixed"]["_loss"] - want["_loss"]).min() > 1e-3  # the mixed batches are other batches
    for run in (*RUNS, "stage3_then_stage2"):
        want = reference["mixed"] if run in MIXED_RUNS else reference["float32"]
        for rank in range(2):
            got = dict(np.load(out / f"{run}-rank{rank}.npz"))
            assert set(got) == set(want), run
            label = f"{run} rank {rank}"
            if run.endswith("fp16"):
                np.testing.assert_allclose(got["_loss"], want["_loss"], rtol=1e-4, err_msg=label)
                np.testing.assert_allclose(got["_grad_norm"], want["_grad_norm"], rtol=1e-3, err_msg=label)
                gap = np.mean(np.concatenate([np.abs(got[n] - w).ravel() for n, w in want.items() if n[0] != "_"]))
                assert gap < 0.02 * moved, (label, gap, moved)
                continue
            steps = slice(3, STEPS) if run == "stage3_then_stage2" else slice(0, STEPS)
            np.testing.assert_allclose(got["_loss"], want["_loss"][steps], rtol=1e-6, err_msg=label)
            np.testing.assert_allclose(got["_grad_norm"], want["_grad_norm"][steps], rtol=1e-6, err_msg=label)
            for name, value in want.items():
                if name[0] != "_":
                    np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=f"{label} {name}")


@pytest.mark.slow
def test_zero3_shards_the_moe_expert_tensors_and_equals_one_process(tiny_model_factory, tmp_path):
    """Qwen3-VL-MoE at ZeRO-3 on 2 workers (every layer weight sharded, the fused expert tensors too: they are
    most of a MoE model) ends 5 AdamW steps where one process on the whole batches ends: losses and gradient
    norms within 1e-6 relative, weights within 1e-5 absolute (training moves them by about 1e-2; Adam turns the
    order of float32 sums in a near-zero gradient entry into a weight difference of about 1e-6)."""
    import mindspore as ms

    from qwenvl.parallel.world import DataParallel
    from tests.zero_worker import STEPS, train

    tiny = tiny_model_factory("qwen3vl_moe")
    out = tmp_path / "out"
    out.mkdir()
    code, logs = run_msrun([str(ROOT / "tests" / "zero_worker.py"), str(tiny), str(out), "stage3"], tmp_path / "logs",
                           timeout=600)  # fmt: skip
    assert code == 0, logs
    sharded = json.loads((out / "stage3-sharded.json").read_text(encoding="utf-8"))
    experts = [n for n in sharded if ".mlp.experts." in n]
    assert len(experts) == 2 * 2 and any(n.endswith("gate_up_proj") for n in experts)  # 2 MoE layers x 2 tensors
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        want = train(str(tiny), DataParallel(), 0, "float32")
    finally:
        ms.set_context(mode=previous)
    for rank in range(2):
        got = dict(np.load(out / f"stage3-rank{rank}.npz"))
        assert set(got) == set(want)
        np.testing.assert_allclose(got["_loss"], want["_loss"], rtol=1e-6)
        np.testing.assert_allclose(got["_grad_norm"], want["_grad_norm"], rtol=1e-6)
        assert len(got["_loss"]) == STEPS
        for name, value in want.items():
            if name[0] != "_":
                np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-5, err_msg=f"rank {rank} {name}")
