"""Segment attention (blocked, recomputing backward) against a dense-mask softmax attention; the O(L) host inputs
that describe segments; the flash-attention TND lengths the Ascend path receives."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from qwenvl.model import attention
from qwenvl.model.attention import (
    SegmentAttention,
    _BlockedAttention,
    _plan_blocks,
    segment_ids,
    text_segment_ids,
    tnd_lengths,
    with_tnd_lengths,
)


def _dense(q, k, v, seg, scale, causal):
    """The reference: an explicit (B, H, L, L) additive mask and softmax, as the models did before."""
    b, h, length, d = q.shape
    n_rep = h // k.shape[1]
    k = ops.repeat_interleave(k, n_rep, 1) if n_rep > 1 else k
    v = ops.repeat_interleave(v, n_rep, 1) if n_rep > 1 else v
    seg_np = seg.asnumpy()
    rows = np.where(seg_np < 0, -seg_np - 1, seg_np)
    allowed = rows[:, :, None] == seg_np[:, None, :]
    if causal:
        allowed &= np.tril(np.ones((length, length), bool))[None]
    mask = Tensor(np.where(allowed, 0.0, -1e9).astype(np.float32)[:, None])
    probs = ops.softmax(ops.matmul(q, k.swapaxes(-1, -2)) * scale + mask, -1)
    return ops.matmul(probs, v).swapaxes(1, 2).reshape(b, length, h * d)


class _Loss(nn.Cell):
    """sum(out * weights): a loss whose gradient reaches every output element differently."""

    def __init__(self, fn, weights):
        super().__init__()
        self.fn, self.weights = fn, weights

    def construct(self, q, k, v, seg):
        return (self.fn(q, k, v, seg) * self.weights).sum()


def _case(seg: np.ndarray, heads=4, kv_heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    b, length = seg.shape
    q = Tensor(rng.normal(size=(b, heads, length, dim)).astype(np.float32))
    k = Tensor(rng.normal(size=(b, kv_heads, length, dim)).astype(np.float32))
    v = Tensor(rng.normal(size=(b, kv_heads, length, dim)).astype(np.float32))
    weights = Tensor(rng.normal(size=(b, length, heads * dim)).astype(np.float32))
    return q, k, v, Tensor(seg.astype(np.int32)), weights


SEGMENTS = {
    # a padded batch: row 0 has 3 padding positions, row 1 none
    "padded": text_segment_ids(2, 10, np.array([[1] * 7 + [0] * 3, [1] * 10])),
    # a packed row of three samples and a padding tail (as collate_flattened writes it)
    "packed": text_segment_ids(1, 12, cu_seqlens=np.array([0, 3, 7, 10, 12])),
    "one": np.zeros((1, 9), np.int32),
}


@pytest.mark.parametrize("schedule", ["parallel", "chained"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", sorted(SEGMENTS))
def test_blocked_attention_equals_dense_in_values_and_gradients(layout, causal, schedule, monkeypatch):
    """Blocks of 4 rows. `parallel` (short sequences): the sequence's mask is built once and sliced per block;
    `chained` (what long sequences get; forced here by a zero byte budget): blocks one after another, largest
    first, each building its own mask, causal key spans in power-of-two size classes."""
    if schedule == "chained":
        monkeypatch.setattr(attention, "CHAIN_BYTES", 0)
    seg = SEGMENTS[layout]
    q, k, v, seg_t, weights = _case(seg)
    scale = 8**-0.5
    blocked = SegmentAttention(scale, causal)
    blocked.core = _BlockedAttention(scale, causal, block=4)  # several blocks, causal ones cut short
    dense = lambda q, k, v, s: _dense(q, k, v, s, scale, causal)  # noqa: E731
    np.testing.assert_allclose(blocked(q, k, v, seg_t).asnumpy(), dense(q, k, v, seg_t).asnumpy(), rtol=1e-5, atol=1e-6)
    got = ms.grad(_Loss(blocked, weights), grad_position=(0, 1, 2))(q, k, v, seg_t)
    want = ms.grad(_Loss(dense, weights), grad_position=(0, 1, 2))(q, k, v, seg_t)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


class _WithReachInput(nn.Cell):
    """Attention given its reach per call, as the length of an input (the models' `vision_reach`)."""

    def __init__(self, attention: SegmentAttention, reach: int) -> None:
        super().__init__()
        self.attention, self.reach = attention, Tensor(np.zeros(reach, np.int8))

    def construct(self, q, k, v, seg):
        return self.attention(q, k, v, seg, None, self.reach)


@pytest.mark.parametrize("given", ["fixed", "input"])
@pytest.mark.parametrize("causal", [True, False])
def test_reach_limited_blocks_equal_dense_on_segments_within_reach(causal, given):
    """Windows of at most 5 positions (reach 5, fixed by the model or given as an input's length), blocks of 4:
    each block computes only the keys within reach, and outputs and gradients equal the dense reference. A
    trailing padding segment longer than the reach is seen in part only, so the loss weighs the real rows alone
    (padding rows are never used)."""
    cuts = np.array([0, 5, 8, 13, 14, 19, 31])  # five windows (<= 5 positions), then 12 positions of padding
    seg = segment_ids(31, cuts)[None]
    q, k, v, seg_t, weights = _case(seg, seed=5)
    real = np.zeros(weights.shape, np.float32)
    real[:, :19] = 1
    weights = weights * Tensor(real)
    scale = 8**-0.5
    limited = SegmentAttention(scale, causal)
    limited.core = _BlockedAttention(scale, causal, block=4, reach=5 if given == "fixed" else 0)
    if given == "input":
        limited = _WithReachInput(limited, 5)
    dense = lambda q, k, v, s: _dense(q, k, v, s, scale, causal)  # noqa: E731
    np.testing.assert_allclose(limited(q, k, v, seg_t).asnumpy()[:, :19], dense(q, k, v, seg_t).asnumpy()[:, :19],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    got = ms.grad(_Loss(limited, weights), grad_position=(0, 1, 2))(q, k, v, seg_t)
    want = ms.grad(_Loss(dense, weights), grad_position=(0, 1, 2))(q, k, v, seg_t)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_blocks_within_reach_compute_only_the_keys_a_segment_can_span():
    """31 positions in blocks of 4, reach 5: rows [start, stop) need keys [start - 4, stop + 4) (by hand); the
    model's fixed reach (a window) wins over a per-call one, which is an input's length."""
    chained, blocks = _plan_blocks(1, 4, 31, 4, False, 5)
    assert not chained and blocks[:3] == ((0, 4, 0, 8), (4, 8, 0, 12), (8, 12, 4, 16)) and blocks[-1] == (28, 31, 24, 31)
    assert all(hi == 31 and lo == 0 for _, _, lo, hi in _plan_blocks(1, 4, 31, 4, False, 0)[1])
    per_call = Tensor(np.zeros(7, np.int8))
    assert _BlockedAttention(1.0, False)._reach(per_call) == 7 and _BlockedAttention(1.0, False)._reach(None) == 0
    assert _BlockedAttention(1.0, False, reach=3)._reach(per_call) == 3


def test_blocked_attention_compiles_with_its_backward():
    seg = SEGMENTS["packed"]
    q, k, v, seg_t, weights = _case(seg, seed=3)
    loss = _Loss(SegmentAttention(0.3, True), weights)
    eager = ms.value_and_grad(loss, grad_position=(0, 1, 2))(q, k, v, seg_t)
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        compiled = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2)))(q, k, v, seg_t)
    finally:
        ms.set_context(mode=previous)
    np.testing.assert_allclose(compiled[0].asnumpy(), eager[0].asnumpy(), rtol=1e-6)
    for a, b in zip(compiled[1], eager[1]):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-6)


def test_segment_ids_by_hand():
    np.testing.assert_array_equal(segment_ids(7, np.array([0, 2, 5, 7])), [0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(text_segment_ids(1, 6, np.array([[1, 1, 1, 1, 0, 0]])), [[0, 0, 0, 0, -1, -1]])
    packed = text_segment_ids(1, 6, cu_seqlens=np.array([0, 2, 6]))
    np.testing.assert_array_equal(packed, [[0, 0, 1, 1, 1, 1]])
    assert text_segment_ids(3, 5).tolist() == [[0] * 5] * 3


def test_tnd_lengths_are_cumulative_runs_cut_at_row_ends():
    # two rows: [0 0 0 -1 -1] and [0 0 0 0 0] -> runs of 3, 2, 5 over the 10 flattened tokens
    seg = np.array([[0, 0, 0, -1, -1], [0, 0, 0, 0, 0]])
    assert tnd_lengths(seg).tolist() == [3, 5, 10]
    assert tnd_lengths(np.array([[0, 0, 1, 1, 1, 2]])).tolist() == [2, 5, 6]
    assert tnd_lengths(np.zeros((3, 4), np.int32)).tolist() == [4, 8, 12]
    arrays = {"text_segments": seg, "vision_segments": np.zeros((1, 4))}
    assert with_tnd_lengths(arrays) is arrays  # CPU: no lengths inputs, the compiled shapes stay the same


def test_model_inputs_are_linear_in_the_sequence(tiny_model_factory):
    """No host input grows with L x L: a packed row of 2048 tokens describes its segments with O(L) arrays."""
    from qwenvl.model import load_model

    model = load_model(tiny_model_factory("qwen2.5vl"))
    length = 2048
    ids = np.full((1, length), 7, np.int64)
    batch = {"input_ids": ids, "labels": ids.copy(), "position_ids": np.broadcast_to(np.arange(length), (3, 1, length)).copy(),
             "cu_seqlens": np.array([0, 500, 1200, 2048], np.int32)}  # fmt: skip
    inputs = model.prepare_inputs(batch)
    assert max(int(np.prod(t.shape)) for t in inputs.values()) <= 3 * length
    assert inputs["text_segments"].asnumpy()[0, [0, 499, 500, 1199, 1200, 2047]].tolist() == [0, 0, 1, 1, 2, 2]


def test_layers_of_one_configuration_share_one_core_and_block_sizes_swap_cores():
    from qwenvl.model import build_empty
    from tests.attention_blocks import query_blocks
    from tools.make_tiny_model import tiny_config

    ids = {"image_token_id": 60, "video_token_id": 61, "vision_start_token_id": 62, "vision_end_token_id": 63,
           "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "vocab_size": 64}  # fmt: skip
    config = tiny_config("qwen2.5vl", ids)
    config["num_hidden_layers"], config["vision_config"]["depth"] = 3, 4  # blocks 1 and 3: full attention
    config["vision_config"]["fullatt_block_indexes"] = [1, 3]
    model, other = build_empty(config), build_empty(config)
    text = [layer.self_attn.attn.core for layer in model.model.language_model.layers]
    vision = [block.attn.attn.core for block in model.model.visual.blocks]
    # one core per configuration: causal text; windowed vision blocks (0, 2); full-attention ones (1, 3)
    assert all(core is text[0] for core in text) and text[0].causal
    assert vision[0] is vision[2] and vision[1] is vision[3] and vision[0] is not vision[1]
    assert vision[0].reach > 0 and vision[1].reach == 0 and not vision[0].causal
    assert other.model.language_model.layers[0].self_attn.attn.core is text[0]
    with query_blocks(model, 4):
        inside = [layer.self_attn.attn.core for layer in model.model.language_model.layers]
        assert all(core is inside[0] and core.block == 4 for core in inside)
        assert text[0].block == attention.QUERY_BLOCK  # swapped, not changed: the other model keeps 512
    assert [layer.self_attn.attn.core for layer in model.model.language_model.layers] == text


# ------------------------------------------------------------------ the fused CPU kernel (cpu_attention.cc)

FUSED_SEGMENTS = {
    **SEGMENTS,
    # 150 positions: four packed samples across 64-key blocks, a padding tail; rows not a multiple of 4
    "long": text_segment_ids(1, 150, np.array([[1] * 141 + [0] * 9]), cu_seqlens=np.array([0, 40, 63, 130, 150])),
}


@pytest.mark.parametrize("dim", [16, 80])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", sorted(FUSED_SEGMENTS))
def test_fused_cpu_attention_equals_dense_in_values_and_gradients(layout, causal, dim):
    """What CPU training runs: the compiled kernel, against the dense-mask reference, heads grouped 4 on 2
    (the kv heads' gradients summed over their query heads); head sizes of the tiny model and of Qwen2.5-VL's
    vision tower (80). Padding rows are weighed out of the loss: their outputs are never used."""
    seg = FUSED_SEGMENTS[layout]
    q, k, v, seg_t, weights = _case(seg, dim=dim, seed=11)
    weights = weights * Tensor(np.repeat((seg >= 0)[:, :, None], weights.shape[-1], 2).astype(np.float32))
    scale = dim**-0.5
    fused = SegmentAttention(scale, causal)
    assert fused.use_fused, "the fused kernel did not build here"
    dense = lambda q, k, v, s: _dense(q, k, v, s, scale, causal)  # noqa: E731
    real = np.broadcast_to((seg >= 0)[:, :, None], weights.shape)
    got, want = fused(q, k, v, seg_t).asnumpy(), dense(q, k, v, seg_t).asnumpy()
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)  # float32 sums in another order
    got = ms.grad(_Loss(fused, weights), grad_position=(0, 1, 2))(q, k, v, seg_t)
    want = ms.grad(_Loss(dense, weights), grad_position=(0, 1, 2))(q, k, v, seg_t)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_fused_cpu_attention_in_a_compiled_half_precision_step():
    """Graph mode, float16 inputs (the kernel computes in float32): outputs and gradients in float16, equal to
    the float32 dense reference to float16's precision."""
    seg = FUSED_SEGMENTS["long"]
    q, k, v, seg_t, weights = _case(seg, dim=16, seed=4)
    weights = weights * Tensor(np.repeat((seg >= 0)[:, :, None], weights.shape[-1], 2).astype(np.float32))
    half = [ops.cast(t, ms.float16) for t in (q, k, v)]
    loss = _Loss(SegmentAttention(0.25, True), weights)
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        value, grads = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2)))(*half, seg_t)
    finally:
        ms.set_context(mode=previous)
    dense = lambda q, k, v, s: _dense(q, k, v, s, 0.25, True)  # noqa: E731
    want_value, want = ms.value_and_grad(_Loss(dense, weights), grad_position=(0, 1, 2))(
        *[ops.cast(t, ms.float32) for t in half], seg_t)  # fmt: skip
    np.testing.assert_allclose(float(value), float(want_value), rtol=2e-3)
    for name, a, b in zip("qkv", grads, want):
        assert a.dtype == ms.float16
        np.testing.assert_allclose(a.asnumpy().astype(np.float32), b.asnumpy(), rtol=2e-2, atol=2e-2, err_msg=name)


def test_fused_cpu_attention_falls_back_to_the_blocked_twin(monkeypatch, tmp_path):
    """No compiler (or `QWENVL_CPU_ATTENTION=blocked`): one warning naming the reason, and the blocked twin; an
    unknown choice is refused; a head size the library lacks (8) takes the blocked twin too."""
    from qwenvl.model import cpu_attention

    monkeypatch.setenv("QWENVL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-compiler"))
    monkeypatch.setattr(cpu_attention.shutil, "which", lambda name: None)
    cpu_attention.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert not SegmentAttention(0.25, True).use_fused
        monkeypatch.setenv("QWENVL_CPU_ATTENTION", "blocked")
        cpu_attention.library.cache_clear()
        assert cpu_attention.library() is None
        monkeypatch.setenv("QWENVL_CPU_ATTENTION", "fast")
        cpu_attention.library.cache_clear()
        with pytest.raises(ValueError, match="QWENVL_CPU_ATTENTION='fast'"):
            cpu_attention.library()
    finally:
        cpu_attention.library.cache_clear()
    assert not cpu_attention.fused_head_dim(8) and cpu_attention.fused_head_dim(128)
