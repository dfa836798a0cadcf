"""Native Qwen3-VL / Qwen3-VL-MoE equal `transformers` 4.57 run under mindnlp (the reference).

mindnlp patches MindSpore's Tensor globally, so the reference runs in a child process (this file's
`__main__`): it loads our `save_model` output with `from_pretrained` and returns logits, token-mean loss and
every parameter gradient per case, plus the logits of a fresh HF model it saved with `save_pretrained`.
Cases: text (padded batch), one image, two images in a batch, a video (one vision block per temporal group
with timestamp text), image + video in one sample, and a packed row (cu_seqlens) equal to its samples run
one by one. Also: checkpoint round trips, the compiled step, the MoE expert dispatch, float16, tied lm_head.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mindspore as ms  # noqa: E402
from mindspore import Tensor, ops  # noqa: E402

from qwenvl.data.rope2d import get_rope_index_3  # noqa: E402
from qwenvl.model import build_model, load_model, save_model  # noqa: E402
from qwenvl.model.checkpoint_io import checkpoint_files, iter_safetensors  # noqa: E402
from qwenvl.model.expert_ops import MaskedGroupedKernels  # noqa: E402
from qwenvl.model.qwen3_vl import (  # noqa: E402
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
    pos_embed_interpolation,
)
from qwenvl.model.weight_ops import HalfOnCPU  # noqa: E402
from tests.attention_blocks import query_blocks  # noqa: E402
from tools.make_tiny_model import tiny_config  # noqa: E402

IDS = {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
       "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "vocab_size": 128}  # fmt: skip
IMAGE, VIDEO, START, END = 5, 6, 3, 4
PATCH_DIM = 3 * 2 * 16 * 16
HF_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "image_grid_thw",
           "pixel_values_videos", "video_grid_thw")  # fmt: skip
ROUND_TRIP_CASE = "image_video"
PARITY_CASES = ("text", "image", "two_images", "video")
# The MoE model shares the dense model's towers; only its MLP differs, so it skips the second image case.
SKIPPED = {"qwen3vl_moe": {"two_images"}}
FAMILIES = {"qwen3vl": Qwen3VLForConditionalGeneration, "qwen3vl_moe": Qwen3VLMoeForConditionalGeneration}


def _config(family: str) -> dict:
    cfg = tiny_config(family, IDS)
    assert cfg["text_config"]["rope_scaling"]["mrope_section"] == [4, 2, 2]  # sections mindnlp's reference runs
    return cfg


# --------------------------------------------------------------------------------------------- batches


def _row(rng: np.random.Generator, parts: list) -> list[int]:
    """Tokens from parts: an int is that many random text tokens, ("image"|"video", t, h, w) a vision block."""
    tokens: list[int] = []
    for part in parts:
        if isinstance(part, int):
            tokens += [int(x) for x in rng.integers(10, 128, part)]
        elif part[0] == "image":
            tokens += [START] + [IMAGE] * (part[1] * part[2] * part[3] // 4) + [END]
        else:  # Qwen3 video: per temporal group, timestamp text then its own vision block
            for _ in range(part[1]):
                stamp = [int(x) for x in rng.integers(10, 128, 2)]
                tokens += stamp + [START] + [VIDEO] * (part[2] * part[3] // 4) + [END]
    return tokens


def _batch(rng: np.random.Generator, rows: list[list]) -> dict[str, np.ndarray]:
    """A right-padded batch with labels (prompt and vision tokens unsupervised) and Qwen3 mRoPE positions."""
    token_rows = [_row(rng, parts) for parts in rows]
    length = max(len(r) for r in token_rows)
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), bool)
    for b, r in enumerate(token_rows):
        input_ids[b, : len(r)], mask[b, : len(r)] = r, True
    labels = np.where(mask & (input_ids != IMAGE) & (input_ids != VIDEO), input_ids, -100)
    labels[:, :3] = -100
    grids = {kind: np.array([p[1:] for parts in rows for p in parts if not isinstance(p, int) and p[0] == kind],
                            np.int64).reshape(-1, 3) for kind in ("image", "video")}  # fmt: skip
    batch = {"input_ids": input_ids, "labels": labels}
    if not mask.all():
        batch["attention_mask"] = mask
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if len(grids[kind]):
            batch[f"{kind}_grid_thw"] = grids[kind]
            batch[key] = rng.standard_normal((int(grids[kind].prod(-1).sum()), PATCH_DIM)).astype(np.float32)
    batch["position_ids"], _ = get_rope_index_3(
        2, input_ids, batch.get("image_grid_thw"), batch.get("video_grid_thw"), batch.get("attention_mask"),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
    )  # fmt: skip
    return batch


def _cases() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "text": _batch(rng, [[14], [9]]),
        "image": _batch(rng, [[5, ("image", 1, 4, 8), 7]]),
        "two_images": _batch(rng, [[3, ("image", 1, 4, 4), 6], [2, ("image", 1, 6, 4), 4, ("image", 1, 2, 2), 3]]),
        "video": _batch(rng, [[4, ("video", 3, 4, 2), 5]]),
        "short_text": _batch(rng, [[10]]),
        "image_video": _batch(rng, [[4, ("image", 1, 2, 4), 3, ("video", 2, 4, 4), 5]]),
    }


def _packed(cases: dict[str, dict[str, np.ndarray]], names: list[str], pad: int) -> dict[str, np.ndarray]:
    """Single-row samples concatenated into one row (plus `pad` padding tokens as a last segment)."""
    parts = [cases[n] for n in names]
    lengths = [p["input_ids"].shape[1] for p in parts] + [pad]
    batch = {
        "input_ids": np.concatenate([p["input_ids"] for p in parts] + [np.zeros((1, pad), np.int64)], 1),
        "labels": np.concatenate([p["labels"] for p in parts] + [np.full((1, pad), -100)], 1),
        "position_ids": np.concatenate([p["position_ids"] for p in parts] + [np.zeros((3, 1, pad), np.int64)], 2),
        "cu_seqlens": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
    }
    for key in ("image_grid_thw", "pixel_values", "video_grid_thw", "pixel_values_videos"):
        present = [p[key] for p in parts if key in p]
        if present:
            batch[key] = np.concatenate(present)
    return batch


# ------------------------------------------------------------------------------------------- reference


def _patch_mindtorch(torch, text_model_classes: tuple) -> None:
    """Work around two mindtorch (CPU) defects the HF forward hits, each replaced by the same maths:
    `.to(device)` onto the current CPU device round-trips through numpy and drops the gradient (HF moves the
    vision features with `.to(inputs_embeds.device, ...)`), and assignment through a 2-D boolean index is
    unsupported (HF deepstack `hidden[mask, :] = hidden[mask, :] + embeds`)."""
    move_to = torch.Tensor._move_to

    def same_device_move(self, device, non_blocking=False):
        return self if getattr(self, "_device", None) == device else move_to(self, device, non_blocking)

    def deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        index = torch.nonzero(visual_pos_masks.reshape(-1)).reshape(-1)
        return flat.index_add(0, index, visual_embeds.to(flat.dtype)).reshape(hidden_states.shape)

    torch.Tensor._move_to = same_device_move
    for cls in text_model_classes:
        cls._deepstack_process = deepstack_process


def _reference_main(work: Path) -> None:
    """Subprocess entry: `_reference_family` for every family folder under `work`."""
    import mindnlp  # noqa: F401  (maps torch / transformers onto MindSpore)
    import torch
    import transformers

    _patch_mindtorch(torch, (transformers.Qwen3VLTextModel, transformers.Qwen3VLMoeTextModel))
    stored = np.load(work / "cases.npz")
    for family in FAMILIES:
        _reference_family(work / family, stored)


def _reference_family(work: Path, stored) -> None:
    """Loads work/ours (written by our save_model) with `from_pretrained`; per case logits, token-mean loss and
    every gradient; also saves a fresh seeded HF model to work/hf (`save_pretrained`) with its logits on
    ROUND_TRIP_CASE. Writes work/results.npz."""
    import mindtorch
    import torch
    import transformers

    cfg = json.loads((work / "ours" / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    model, info = cls.from_pretrained(work / "ours", attn_implementation="eager", output_loading_info=True)
    model.eval()  # mindtorch cannot run the MoE training loop (2-D @ 3-D matmul); eval is the same maths
    results = {f"load/{k}": np.array(sorted(map(str, v)), dtype=str) for k, v in info.items()}
    names, params = zip(*model.named_parameters())

    def inputs(case: str) -> dict:
        return {k: torch.tensor(stored[f"{case}/{k}"]) for k in HF_KEYS if f"{case}/{k}" in stored.files}

    for case in sorted({k.split("/")[0] for k in stored.files} - SKIPPED.get(work.name, set())):
        if case == ROUND_TRIP_CASE:  # logits and loss only (see test_image_and_video_in_one_sample)
            out = model(**inputs(case))
            results[f"{case}/loss"], results[f"{case}/logits"] = out.loss.asnumpy(), out.logits.asnumpy()
            continue

        def loss_and_logits(kwargs=inputs(case)):
            out = model(**kwargs)
            return out.loss, out.logits

        (loss, logits), grads = mindtorch.autograd.value_and_grad(loss_and_logits, params, has_aux=True,
                                                                  attach_grads=False)()  # fmt: skip
        results[f"{case}/loss"] = np.asarray(loss.asnumpy())
        results[f"{case}/logits"] = logits.asnumpy()
        for name, grad in zip(names, grads):
            results[f"{case}/grad/{name}"] = grad.asnumpy()
    torch.manual_seed(1)
    fresh = cls(model.config).eval()
    fresh.save_pretrained(work / "hf")
    results["hf_saved/logits"] = fresh(**inputs(ROUND_TRIP_CASE)).logits.detach().numpy()
    np.savez(work / "results.npz", **results)


def _run_reference(work: Path, models: dict, cases: dict[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """{family: reference results}, every family in one child process (mindnlp is imported once)."""
    for family, model in models.items():
        save_model(model, work / family / "ours")
    np.savez(work / "cases.npz", **{f"{c}/{k}": v for c, b in cases.items() for k, v in b.items()})
    proc = subprocess.run([sys.executable, __file__, str(work)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {family: dict(np.load(work / family / "results.npz")) for family in models}


# ---------------------------------------------------------------------------------------------- native


def _native(model, batch):
    """(logits, loss_sum, n_tokens, {name: grad of loss_sum / n_tokens}) of our model in PyNative mode."""
    inputs = model.prepare_inputs(batch)
    params = model.trainable_params()

    def mean_loss(*args):
        loss_sum, n_tokens = model(**dict(zip(inputs, args)))
        return loss_sum / n_tokens, (loss_sum, n_tokens)

    (_, (loss_sum, n_tokens)), grads = ms.value_and_grad(mean_loss, None, params, has_aux=True)(*inputs.values())
    logits = model.logits(**inputs).asnumpy()
    names = [n for n, _ in model.parameters_and_names()]
    return logits, float(loss_sum.asnumpy()), float(n_tokens.asnumpy()), dict(zip(names, [g.asnumpy() for g in grads]))


def _assert_grads_close(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], rel: float = 1e-4) -> None:
    for name, grad in ref.items():
        scale = max(float(np.abs(grad).max()), 1e-8)
        err = float(np.abs(ours[name] - grad).max()) / scale
        assert err <= rel, f"gradient of {name}: max |diff| / max |ref| = {err:.2e}"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Seeded models of every family, the test cases, and the HF reference results, computed once."""
    models = {family: build_model(_config(family), seed=0) for family in FAMILIES}
    work = tmp_path_factory.mktemp("qwen3")
    cases = _cases()
    return models, cases, _run_reference(work, models, cases), work


@pytest.fixture(params=sorted(FAMILIES))
def setup(request, references):
    """(model, cases, reference results, family work folder) for one family."""
    models, cases, refs, work = references
    assert isinstance(models[request.param], FAMILIES[request.param])
    return models[request.param], cases, refs[request.param], work / request.param


def _ref_grads(ref: dict[str, np.ndarray], case: str) -> dict[str, np.ndarray]:
    head = f"{case}/grad/"
    return {k[len(head):]: v for k, v in ref.items() if k.startswith(head)}


@pytest.mark.parametrize(
    "family,case", [(f, c) for f in sorted(FAMILIES) for c in PARITY_CASES if c not in SKIPPED.get(f, set())]
)
def test_parity_with_transformers(references, family, case):
    models, cases, refs, _ = references
    model, ref = models[family], refs[family]
    batch = cases[case]
    logits, loss_sum, n_tokens, grads = _native(model, batch)
    valid = batch.get("attention_mask", np.ones(batch["input_ids"].shape, bool))
    np.testing.assert_allclose(logits[valid], ref[f"{case}/logits"][valid], rtol=0, atol=1e-5)
    assert n_tokens == int((batch["labels"][:, 1:] != -100).sum())
    np.testing.assert_allclose(loss_sum / n_tokens, ref[f"{case}/loss"], rtol=1e-4)
    _assert_grads_close(grads, _ref_grads(ref, case))


def test_image_and_video_in_one_sample(setup):
    """Logits and loss only: with both kinds HF joins the deepstack features by boolean-index assignment,
    through which mindtorch passes no gradient. The packed test checks that gradient (image and video samples
    in one row are one vision pass for us, separate HF runs for the reference)."""
    model, cases, ref, _ = setup
    inputs = model.prepare_inputs(cases["image_video"])
    loss_sum, n_tokens = model(**inputs)
    np.testing.assert_allclose(model.logits(**inputs).asnumpy(), ref["image_video/logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose((loss_sum / n_tokens).asnumpy(), ref["image_video/loss"], rtol=1e-4)


def test_vision_patch_padding_matches_reference(setup):
    """Patches padded to the collator's shape bucket (`vision_patches`) form a segment of their own whose features
    nothing gathers: logits still equal HF's on the unpadded input."""
    model, cases, ref, _ = setup
    batch = cases["image_video"]
    real = sum(int(np.prod(np.asarray(batch[k]).reshape(-1, 3), -1).sum()) for k in ("image_grid_thw", "video_grid_thw"))
    inputs = model.prepare_inputs({**batch, "vision_patches": real + 64})
    assert inputs["pixel_values"].shape[0] == real + 64
    np.testing.assert_allclose(model.logits(**inputs).asnumpy(), ref["image_video/logits"], rtol=0, atol=1e-5)


def test_full_attention_within_the_frame_bound_matches_reference(setup):
    """With the run's frame bound (`vision_frame_patches` 4; the video's frames of 8 patches are longer, so 8)
    every vision block computes each block of 4 queries against the keys within one frame's reach of it only,
    out of 24 + 40 padded patches: logits, loss and every gradient still equal HF's."""
    model, cases, ref, _ = setup
    batch = {**cases["video"], "vision_patches": 64, "vision_frame_patches": 4}
    assert model.prepare_inputs(batch)["vision_reach"].shape == (8,)
    with query_blocks(model, 4):
        logits, loss_sum, n_tokens, grads = _native(model, batch)
    np.testing.assert_allclose(logits, ref["video/logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(loss_sum / n_tokens, ref["video/loss"], rtol=1e-4)
    _assert_grads_close(grads, _ref_grads(ref, "video"))


def test_packed_row_equals_samples_one_by_one(setup):
    """One flattened row (cu_seqlens, trailing padding segment) == HF on each sample: logits per segment,
    summed loss, and the gradient of the summed loss."""
    model, cases, ref, _ = setup
    names = ["image", "short_text", "video"]
    logits, loss_sum, n_tokens, grads = _native(model, _packed(cases, names, pad=3))
    start, ref_loss_sum, ref_grads = 0, 0.0, {}
    for name in names:
        n_i = int((cases[name]["labels"][:, 1:] != -100).sum())
        length = cases[name]["input_ids"].shape[1]
        np.testing.assert_allclose(logits[:, start : start + length], ref[f"{name}/logits"], rtol=0, atol=1e-5)
        ref_loss_sum += float(ref[f"{name}/loss"]) * n_i
        for key, grad in _ref_grads(ref, name).items():
            ref_grads[key] = ref_grads.get(key, 0.0) + grad * (n_i / n_tokens)
        start += length
    np.testing.assert_allclose(loss_sum, ref_loss_sum, rtol=1e-4)
    _assert_grads_close(grads, ref_grads)


def test_checkpoint_round_trips(setup):
    """Our save_model -> HF from_pretrained loads every tensor (parity above used it), and HF save_pretrained ->
    our load_model gives HF's logits; both write the same tensor names and shapes."""
    model, cases, ref, work = setup
    assert all(len(ref[f"load/{k}"]) == 0 for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), ref
    loaded = load_model(work / "hf")
    logits = loaded.logits(**loaded.prepare_inputs(cases[ROUND_TRIP_CASE])).asnumpy()
    np.testing.assert_allclose(logits, ref["hf_saved/logits"], rtol=0, atol=1e-5)

    def layout(folder: Path) -> dict[str, tuple]:
        return {name: a.shape for path in checkpoint_files(folder) for name, a in iter_safetensors(path)}

    assert layout(work / "ours") == layout(work / "hf")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compiled_step_with_recompute_equals_pynative(family):
    """`mindspore.jit(value_and_grad(construct))` compiles on CPU (recompute on) and equals PyNative."""
    model = build_model(_config(family), seed=1)
    inputs = model.prepare_inputs(_cases()["image_video"])
    args = [inputs[name] for name in inspect.signature(model.construct).parameters if name in inputs]

    def mean_loss(*args):
        loss_sum, n_tokens = model(*args)
        return loss_sum / n_tokens, n_tokens

    step = ms.value_and_grad(mean_loss, None, model.trainable_params(), has_aux=True)
    (loss, _), grads = step(*args)
    model.enable_recompute()
    (jit_loss, _), jit_grads = ms.jit(step)(*args)
    np.testing.assert_allclose(jit_loss.asnumpy(), loss.asnumpy(), rtol=1e-6)
    for grad, jit_grad in zip(grads, jit_grads):
        np.testing.assert_allclose(jit_grad.asnumpy(), grad.asnumpy(), rtol=1e-5, atol=1e-7)


def test_float16_compute_close_to_float32():
    """dtype="float16" stores the weights in float16 and gives float32 logits/loss within half precision."""
    batch = _cases()["image_video"]
    results = []
    for dtype in ("float32", "float16"):
        model = build_model(_config("qwen3vl_moe"), seed=0, dtype=dtype)
        inputs = model.prepare_inputs(batch)
        loss_sum, n_tokens = model(**inputs)
        logits = model.logits(**inputs)
        assert logits.dtype == ms.float32 and loss_sum.dtype == ms.float32
        assert all(p.dtype == {"float32": ms.float32, "float16": ms.float16}[dtype] for p in model.get_parameters())
        results.append((logits.asnumpy(), float((loss_sum / n_tokens).asnumpy())))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=0, atol=3e-3)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-3)


def test_tied_lm_head_shares_the_embedding_and_round_trips(tmp_path):
    cfg = _config("qwen3vl")
    cfg["text_config"]["tie_word_embeddings"] = True
    model = build_model(cfg, seed=2)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert sum(p is model.lm_head.weight for p in model.trainable_params()) == 1
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    inputs = model.prepare_inputs(_cases()["image"])
    np.testing.assert_array_equal(loaded.logits(**inputs).asnumpy(), model.logits(**inputs).asnumpy())


@pytest.mark.parametrize("sourced", [False, True], ids=["as_stored", "through_sources"])
def test_moe_dispatch_by_expert_equals_dense_experts(sourced):
    """The Ascend path (tokens sorted by expert, grouped matmuls, weighted sum back; the masked CPU twin of the
    grouped kernels) and the dense path equal the dense path differentiated by MindSpore, in values and
    gradients, compiled as in training. `through_sources`: the expert tensors are read through weight
    sources (as ZeRO-3 chunks are), so the hand-written backward passes of `expert_ops` run, also with the
    experts frozen (input gradients only)."""
    model = build_model(_config("qwen3vl_moe"), seed=3)
    block = model.model.language_model.layers[0].mlp
    experts = block.experts
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((11, 64)).astype(np.float32))
    probs = ops.softmax(block.gate(x), -1)
    top, index = ops.topk(probs, block.top_k)
    top = top / top.sum(-1, keepdims=True)
    params = experts.trainable_params()

    def dense(x, top):
        return (experts.dense(x, top, index) ** 2).sum()

    def dispatched(x, top):
        return (experts.dispatched(x, top, index) ** 2).sum()

    expected = ms.value_and_grad(dense, (0, 1), params)(x, top)
    experts.use_grouped_kernels(MaskedGroupedKernels())
    if sourced:
        for name in experts.SOURCED:
            experts.use_source(HalfOnCPU(experts.source_shape(name), ms.float32), name)
    for path in (dispatched, dense) if sourced else (dispatched,):
        got = ms.jit(ms.value_and_grad(path, (0, 1), params))(x, top)
        np.testing.assert_allclose(got[0].asnumpy(), expected[0].asnumpy(), rtol=1e-6)
        for ours, ref in zip(got[1][0] + got[1][1], expected[1][0] + expected[1][1]):
            np.testing.assert_allclose(ours.asnumpy(), ref.asnumpy(), rtol=1e-5, atol=1e-7)
    if sourced:
        for name in experts.SOURCED:
            experts.source_of(name).trainable = False
        for path in (dispatched, dense):
            got = ms.jit(ms.grad(path, (0, 1)))(x, top)
            for ours, ref in zip(got, expected[1][0]):
                np.testing.assert_allclose(ours.asnumpy(), ref.asnumpy(), rtol=1e-5, atol=1e-7)


def test_pos_embed_interpolation_by_hand():
    """4x4 table (16 positions), one frame of 2x4 patches, merge 2: rows sample table rows 0 and 3, columns
    0, 1, 2, 3 exactly (no blending); a 3-row grid puts its middle row halfway between table rows 1 and 2."""
    index, weight = pos_embed_interpolation(np.array([[1, 2, 4]]), 16, 2)
    # merge-window-major order: window (0,0) holds patches (0,0) (0,1) (1,0) (1,1), then window (0,1)
    np.testing.assert_array_equal(index[0], [0, 1, 12, 13, 2, 3, 14, 15])
    np.testing.assert_array_equal(weight[0], np.ones(8))
    np.testing.assert_array_equal(weight[1:], np.zeros((3, 8)))
    index, weight = pos_embed_interpolation(np.array([[2, 4, 2]]), 16, 2)
    assert index.shape == (4, 16) and np.array_equal(index[:, :8], index[:, 8:])  # repeated per frame
    index, weight = pos_embed_interpolation(np.array([[1, 3, 2]]), 16, 1)
    middle_left = 2  # row 1 (of 3), column 0, merge 1 -> row-major position 2
    assert index[:, middle_left].tolist() == [4, 5, 8, 9]  # table rows 1, 2 x columns 0, 1 (column 1 weighs 0)
    np.testing.assert_allclose(weight[:, middle_left], [0.5, 0.0, 0.5, 0.0])


def test_prepare_inputs_rejects_pad_count_mismatch():
    model = Qwen3VLForConditionalGeneration(_config("qwen3vl"))
    batch = _cases()["image"]
    batch["input_ids"] = np.where(np.cumsum(batch["input_ids"] == IMAGE, 1) == 1, 7, batch["input_ids"])
    with pytest.raises(ValueError, match="image pad tokens"):
        model.prepare_inputs(batch)


def _main() -> None:
    _reference_main(Path(sys.argv[1]))


if __name__ == "__main__":
    _main()
