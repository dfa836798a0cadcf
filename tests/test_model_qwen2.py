"""Native Qwen2-VL / Qwen2.5-VL against the transformers 4.57 model (mindnlp, run in a child process).

For each family one tiny model is built, saved with our `save_model`, and loaded by transformers; logits,
token-mean loss and every parameter gradient are compared on text-only, one-image, two-image, video and
padded-batch inputs; a flattened/packed row must equal its samples run one by one. Checkpoints must round
trip both ways, and the compiled value-and-grad step must equal PyNative.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from qwenvl.data.rope2d import get_rope_index_2, get_rope_index_25
from qwenvl.model import build_model, load_model, named_parameters, save_model
from qwenvl.model.checkpoint_io import TensorPlan, iter_safetensors, write_safetensors
from tests.attention_blocks import query_blocks
from tests.hf_reference import ReferenceJob, reference_outputs
from tools.make_tiny_model import tiny_config

IDS = {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
       "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "vocab_size": 128}  # fmt: skip
PATCH_DIM = 3 * 2 * 14 * 14
CASES = ("text", "image", "two_images", "video", "padded")
GRAD_CASES = ("two_images", "video", "padded")  # "padded" holds the text and image samples


def _tokens(rng: np.random.Generator, blocks: list[tuple[int, np.ndarray]]) -> np.ndarray:
    pieces = [rng.integers(7, 128, 5)]
    for token, grid in blocks:
        pieces += [[IDS["vision_start_token_id"]], [token] * (int(np.prod(grid)) // 4), [IDS["vision_end_token_id"]],
                   rng.integers(7, 128, 4)]  # fmt: skip
    return np.concatenate(pieces).astype(np.int64)


def _sample(family: str, rng: np.random.Generator, images=(), videos=()) -> dict:
    """One unpadded sample: ids, labels (prompt and vision tokens ignored), positions, pixels."""
    images = [np.array(g) for g in images]
    videos = [np.array(g) for g in videos]
    ids = _tokens(rng, [(5, g) for g in images] + [(6, g) for g in videos])
    labels = ids.copy()
    labels[:3] = -100
    labels[(ids == 5) | (ids == 6)] = -100
    image_grid = np.stack(images) if images else None
    video_grid = np.stack(videos) if videos else None
    kwargs = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3)
    if family == "qwen2.5vl":
        seconds = np.full(len(videos), 1.0) if videos else None
        pos, _ = get_rope_index_25(2, ids[None], image_grid, video_grid, seconds, **kwargs)
    else:
        pos, _ = get_rope_index_2(2, ids[None], image_grid, video_grid, **kwargs)

    def pixels(grid):
        return None if grid is None else rng.standard_normal((int(grid.prod(-1).sum()), PATCH_DIM)).astype(np.float32)

    return {"input_ids": ids, "labels": labels, "position_ids": pos[:, 0],
            "pixel_values": pixels(image_grid), "image_grid_thw": image_grid,
            "pixel_values_videos": pixels(video_grid), "video_grid_thw": video_grid}  # fmt: skip


def _single(sample: dict) -> dict:
    return {**sample, "input_ids": sample["input_ids"][None], "labels": sample["labels"][None],
            "position_ids": sample["position_ids"][:, None]}  # fmt: skip


def _cat(values):
    values = [v for v in values if v is not None]
    return np.concatenate(values) if values else None


def _padded(samples: list[dict]) -> dict:
    length = max(len(s["input_ids"]) for s in samples)
    batch = {"input_ids": np.zeros((len(samples), length), np.int64), "labels": np.full((len(samples), length), -100),
             "position_ids": np.ones((3, len(samples), length), np.int64),
             "attention_mask": np.zeros((len(samples), length), np.int64)}  # fmt: skip
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        batch["input_ids"][row, :n] = s["input_ids"]
        batch["labels"][row, :n] = s["labels"]
        batch["position_ids"][:, row, :n] = s["position_ids"]
        batch["attention_mask"][row, :n] = 1
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        batch[key] = _cat([s[key] for s in samples])
    return batch


def _packed(samples: list[dict], pad: int) -> dict:
    """One row holding the samples then `pad` padding tokens, with cu_seqlens over them (collator layout)."""
    lengths = [len(s["input_ids"]) for s in samples] + [pad]
    positions = np.concatenate([s["position_ids"] for s in samples] + [np.ones((3, pad), np.int64)], 1)
    batch = {
        "input_ids": np.concatenate([s["input_ids"] for s in samples] + [np.zeros(pad, np.int64)])[None],
        "labels": np.concatenate([s["labels"] for s in samples] + [np.full(pad, -100)])[None],
        "position_ids": positions[:, None],
        "cu_seqlens": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
    }
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        batch[key] = _cat([s[key] for s in samples])
    return batch


class Setup:
    """Everything one family's tests share: our model, the inputs, and the reference outputs."""

    def __init__(self, family: str, tmp: Path) -> None:
        self.family = family
        config = tiny_config(family, IDS)
        config["initializer_range"] = 0.1
        config["vision_config"]["initializer_range"] = 0.1
        self.model = build_model(config, seed=0)
        self.model_dir = tmp / "ours"
        save_model(self.model, self.model_dir)
        rng = np.random.default_rng(0)
        samples = {
            "text": _sample(family, rng),
            "image": _sample(family, rng, images=[(1, 6, 10)]),
            "two_images": _sample(family, rng, images=[(1, 4, 4), (1, 6, 8)]),
            "video": _sample(family, rng, videos=[(2, 4, 6)]),
        }
        self.samples = samples
        self.cases = {name: _single(s) for name, s in samples.items()}
        self.cases["padded"] = _padded([samples["text"], samples["image"]])
        self.packed = _packed([samples["image"], samples["video"]], pad=5)
        self.hf_dir = tmp / "hf_saved"
        self.ref: dict[str, dict[str, np.ndarray]] = {}

    def job(self) -> ReferenceJob:
        return ReferenceJob(self.model_dir, self.cases, GRAD_CASES, (self.hf_dir, 1, "image"))

    def inputs(self, batch: dict) -> dict:
        return self.model.prepare_inputs(batch)


FAMILIES = ("qwen2.5vl", "qwen2vl")


@pytest.fixture(scope="module")
def setups(tmp_path_factory) -> dict[str, Setup]:
    """Both families, their reference outputs computed in one child process."""
    tmp = tmp_path_factory.mktemp("qwen2_models")
    built = {family: Setup(family, tmp / family.replace(".", "")) for family in FAMILIES}
    outputs = reference_outputs(tmp / "ref", {family: setup.job() for family, setup in built.items()})
    for family, setup in built.items():
        setup.ref = outputs[family]
    return built


@pytest.fixture(params=FAMILIES)
def setup(request, setups) -> Setup:
    return setups[request.param]


def _mean_loss_and_grads(model, inputs: dict):
    params = list(named_parameters(model).items())

    def mean_loss(*args):
        loss_sum, n_tokens = model(**inputs)
        return loss_sum / n_tokens

    loss, grads = ms.value_and_grad(mean_loss, None, [p for _, p in params])()
    return float(loss), {name: g.asnumpy() for (name, _), g in zip(params, grads)}


def _assert_loss_and_grads_equal_hf(loss: float, grads: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    """Token-mean loss within 1e-4 relative; every gradient within 1e-4 of the largest entry of HF's."""
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-4)
    for name, grad in grads.items():
        expected = ref[f"grad:{name}"]
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-4 * scale + 1e-9, err_msg=name)


def test_parameter_names_and_shapes_equal_hf(setup):
    ours = {name: tuple(p.shape) for name, p in named_parameters(setup.model).items()}
    assert ours == {name: tuple(shape) for name, shape in setup.ref["params"].items()}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_equal_hf(setup, case):
    inputs = setup.inputs(setup.cases[case])
    ref = setup.ref[case]
    np.testing.assert_allclose(setup.model.logits(**inputs).asnumpy(), ref["logits"], rtol=0, atol=1e-5)
    loss_sum, n_tokens = setup.model(**inputs)
    np.testing.assert_allclose(float(loss_sum) / float(n_tokens), ref["loss"], rtol=1e-4)


@pytest.mark.parametrize("case", GRAD_CASES)
def test_every_gradient_equals_hf(setup, case):
    inputs = setup.inputs(setup.cases[case])
    ref = setup.ref[case]
    loss, grads = _mean_loss_and_grads(setup.model, inputs)
    _assert_loss_and_grads_equal_hf(loss, grads, ref)


def test_packed_row_equals_samples_one_by_one(setup):
    """Attention never crosses a cu_seqlens segment: each segment's logits are the sample's own."""
    logits = setup.model.logits(**setup.inputs(setup.packed)).asnumpy()[0]
    loss_sum, n_tokens = setup.model(**setup.inputs(setup.packed))
    start, expected_sum, expected_n = 0, 0.0, 0
    for name in ("image", "video"):
        ref = setup.ref[name]
        n = ref["logits"].shape[1]
        np.testing.assert_allclose(logits[start : start + n], ref["logits"][0], rtol=0, atol=1e-5)
        supervised = int((setup.samples[name]["labels"][1:] != -100).sum())
        expected_sum += float(ref["loss"]) * supervised
        expected_n += supervised
        start += n
    assert float(n_tokens) == expected_n
    np.testing.assert_allclose(float(loss_sum), expected_sum, rtol=1e-4)


def test_hf_saved_checkpoint_loads_with_equal_logits(setup):
    model = load_model(setup.hf_dir)
    logits = model.logits(**model.prepare_inputs(setup.cases["image"])).asnumpy()
    np.testing.assert_allclose(logits, setup.ref["hf_saved"]["logits"], rtol=0, atol=1e-5)


def test_saved_names_are_the_legacy_disk_names(setup):
    names = {name for name, _ in iter_safetensors(setup.model_dir / "model.safetensors")}
    assert "visual.patch_embed.proj.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert not any(n.startswith(("model.visual.", "model.language_model.")) for n in names)


def _write_bfloat16(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A safetensors file of BF16 tensors (the float32 values truncated), laid out by hand."""
    header, blobs, offset = {}, [], 0
    for name, array in arrays.items():
        blob = (np.ascontiguousarray(array, np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    arrays = {"a": np.array([[1.0, -2.5], [3.1415926, 1e-3]], np.float32), "b": np.arange(3, dtype=np.float32)}
    _write_bfloat16(tmp_path / "w.safetensors", arrays)
    loaded = dict(iter_safetensors(tmp_path / "w.safetensors"))
    truncated = (arrays["a"].view(np.uint32) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(loaded["a"], truncated)
    np.testing.assert_array_equal(loaded["b"], arrays["b"])
    assert loaded["a"].dtype == np.float32


def test_stored_tensor_reads_any_range_block_by_block(tmp_path, monkeypatch):
    """Ranges of a stored tensor, read a few bytes at a time, equal numpy's slices of the values written, in the
    requested dtype, for float32, float16 and bfloat16 files."""
    from safetensors.numpy import save_file

    from qwenvl.model import checkpoint_io

    values = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    save_file({"f32": values, "f16": values.astype(np.float16)}, str(tmp_path / "w.safetensors"))
    _write_bfloat16(tmp_path / "b.safetensors", {"bf16": values})
    bf16 = (values.view(np.uint32) & 0xFFFF0000).view(np.float32)
    monkeypatch.setattr(checkpoint_io, "READ_BLOCK_BYTES", 6)  # blocks of 1-3 values, ending mid-row
    stored = {t.name: t for path in ("w", "b") for t in checkpoint_io.stored_tensors(tmp_path / f"{path}.safetensors")}
    expected = {"f32": values, "f16": values.astype(np.float16).astype(np.float32), "bf16": bf16}
    for name, full in expected.items():
        assert stored[name].shape == (7, 5) and stored[name].numel == 35
        for begin, end in ((0, 35), (3, 4), (11, 29), (34, 35)):
            for dtype in (np.float32, np.float16):
                got = stored[name].read(dtype, begin, end)
                assert got.dtype == dtype
                np.testing.assert_array_equal(got, full.reshape(-1)[begin:end].astype(dtype), err_msg=name)


def test_sharded_checkpoint_with_memory_names_round_trips(setup, tmp_path):
    """A sharded checkpoint using 4.57 in-memory names loads too, and gives the same logits."""
    params = list(named_parameters(setup.model).items())
    plans = [TensorPlan(n, tuple(p.shape), "F32") for n, p in params]
    write_safetensors(plans, lambda i: params[i][1].asnumpy(), tmp_path, max_shard_size=200_000)
    (tmp_path / "config.json").write_text(json.dumps(setup.model.config), encoding="utf-8")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_model(tmp_path)
    inputs = setup.inputs(setup.cases["two_images"])
    np.testing.assert_array_equal(loaded.logits(**inputs).asnumpy(), setup.model.logits(**inputs).asnumpy())


def test_tied_lm_head_is_one_parameter_saved_once(setup, tmp_path):
    config = {**setup.model.config, "tie_word_embeddings": True}
    model = build_model(config, seed=0)
    assert "lm_head.weight" not in named_parameters(model)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    save_model(model, tmp_path)
    assert "lm_head.weight" not in {name for name, _ in iter_safetensors(tmp_path / "model.safetensors")}
    inputs = model.prepare_inputs(setup.cases["image"])
    np.testing.assert_array_equal(load_model(tmp_path).logits(**inputs).asnumpy(), model.logits(**inputs).asnumpy())


def test_load_reports_missing_unexpected_and_mismatched(setup, tmp_path):
    arrays = {n: p.asnumpy() for n, p in named_parameters(setup.model).items()}
    arrays.pop("model.language_model.norm.weight")
    arrays["model.extra.weight"] = np.zeros(2, np.float32)
    arrays["lm_head.weight"] = arrays["lm_head.weight"][:, :8].copy()
    items = list(arrays.items())
    plans = [TensorPlan(n, a.shape, "F32") for n, a in items]
    write_safetensors(plans, lambda i: items[i][1], tmp_path, max_shard_size=2**40)
    (tmp_path / "config.json").write_text(json.dumps(setup.model.config), encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert "model.language_model.norm.weight" in message and "model.extra.weight" in message
    assert "lm_head.weight" in message


def test_vision_patch_padding_does_not_change_logits(setup):
    """The collator's shape bucket (`vision_patches`, here 48 real -> 256) pads the patches; unpadded is the same."""
    padded = setup.inputs({**setup.cases["video"], "vision_patches": 256})
    unpadded = setup.inputs(setup.cases["video"])
    assert padded["pixel_values"].shape[0] == 256 and unpadded["pixel_values"].shape[0] == 48
    # float32 rounding only: the matmul kernels block a 48-row and a 256-row input differently
    np.testing.assert_allclose(setup.model.logits(**unpadded).asnumpy(), setup.model.logits(**padded).asnumpy(),
                               rtol=0, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("case", ["two_images", "video"])
def test_full_attention_within_the_frame_bound_equals_hf(setup, case):
    """With the run's frame bound (`vision_frame_patches` 8; the batch's longest frame wins when longer) the
    full-attention vision blocks compute each block of 16 queries against the keys within one frame's reach
    of it only, out of 256 padded patches: logits, loss and every gradient still equal HF's."""
    inputs = setup.inputs({**setup.cases[case], "vision_patches": 256, "vision_frame_patches": 8})
    assert inputs["vision_reach"].shape == ((48,) if case == "two_images" else (24,))  # frames 16 + 48; 24 + 24
    ref = setup.ref[case]
    with query_blocks(setup.model, 16):
        np.testing.assert_allclose(setup.model.logits(**inputs).asnumpy(), ref["logits"], rtol=0, atol=1e-5)
        loss, grads = _mean_loss_and_grads(setup.model, inputs)
    _assert_loss_and_grads_equal_hf(loss, grads, ref)


def test_vision_reach_is_absent_without_a_frame_bound(setup):
    assert "vision_reach" not in setup.inputs({**setup.cases["video"], "vision_patches": 256})
    inputs = setup.inputs({**setup.cases["video"], "vision_frame_patches": 100})
    assert inputs["vision_reach"].shape == (100,)


def test_vision_token_count_mismatch_is_rejected(setup):
    batch = dict(setup.cases["image"])
    batch["input_ids"] = np.where(batch["input_ids"] == 5, 9, batch["input_ids"])
    with pytest.raises(ValueError, match="image pad tokens"):
        setup.model.prepare_inputs(batch)


def test_compiled_value_and_grad_with_recompute_equals_pynative(setup):
    inputs = setup.inputs(setup.cases["two_images"])
    model = load_model(setup.model_dir)
    model.enable_recompute()
    order = list(inspect.signature(model.construct).parameters)
    params = list(named_parameters(model).values())
    step = ms.jit(ms.value_and_grad(model, None, params, has_aux=True))
    (loss_sum, n_tokens), grads = step(*[inputs.get(name) for name in order])
    eager_loss, eager_grads = _mean_loss_and_grads(setup.model, inputs)
    np.testing.assert_allclose(float(loss_sum) / float(n_tokens), eager_loss, rtol=1e-5)
    for g, (name, e) in zip(grads, eager_grads.items()):
        np.testing.assert_allclose(g.asnumpy() / float(n_tokens), e, rtol=1e-4, atol=1e-6, err_msg=name)


def test_float16_compute_is_close_and_bfloat16_is_refused_on_cpu(setup):
    half = load_model(setup.model_dir, dtype="float16")
    inputs = setup.inputs(setup.cases["image"])
    logits = half.logits(**inputs).asnumpy()
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, setup.ref["image"]["logits"], rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="bfloat16"):
        build_model(setup.model.config, dtype="bfloat16")


def test_float16_on_cpu_computes_in_float32_over_float16_weights(setup):
    """On CPU a float16 model's activations are float32 (MindSpore's CPU float16 element-wise kernels each keep a
    large workspace): its logits equal a float32 model's over the same float16-rounded weights, to float32
    rounding; float16 activations would be off by about 1e-3."""
    half = load_model(setup.model_dir, dtype="float16")
    rounded = build_model(setup.model.config)
    for name, param in named_parameters(rounded).items():
        param.set_data(ms.Tensor(named_parameters(half)[name].asnumpy().astype(np.float32)))
    inputs = setup.inputs(setup.cases["image"])
    expected = rounded.logits(**inputs).asnumpy()
    np.testing.assert_allclose(half.logits(**inputs).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    assert all(p.dtype == ms.float16 for p in half.get_parameters())


def test_build_is_seeded_and_reads_a_config_folder(setup):
    again = build_model(setup.model_dir, seed=0)
    other = build_model(setup.model.config, seed=1)
    name = "model.visual.blocks.0.attn.qkv.weight"
    ours = named_parameters(setup.model)[name].asnumpy()
    np.testing.assert_array_equal(named_parameters(again)[name].asnumpy(), ours)
    assert not np.array_equal(named_parameters(other)[name].asnumpy(), ours)
    assert float(np.abs(named_parameters(again)["model.language_model.norm.weight"].asnumpy() - 1).max()) == 0
    with pytest.raises(ValueError, match="model_type"):
        build_model({**setup.model.config, "model_type": "llava"})
