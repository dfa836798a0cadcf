"""Native MindSpore Qwen3-VL and Qwen3-VL-MoE, numerically equal to `transformers` 4.57.

Vision: Conv3d patch embedding (with bias) computed as a matmul, a learned position table bilinearly
interpolated to each grid (HF `fast_pos_embed_interpolate`; indices and weights come from the host), 2-D
rotary LayerNorm blocks attending within each frame, a merger, and deepstack mergers whose outputs are added
to the text hidden states at the vision tokens after the first decoder layers.
Text: Qwen3 decoder (q_norm/k_norm on each head, interleaved multimodal RoPE); the MoE variant replaces
the MLP with a softmax-top-k router over fused expert tensors: every expert on every token weighted by the
routing on CPU/GPU, tokens dispatched to their experts with grouped matmuls on Ascend (both equal HF).

Parameter names and shapes are exactly HF's (`model.visual.*`, `model.language_model.*`, `lm_head.weight`).
"""

from __future__ import annotations

from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from qwenvl.model.attention import (
    SegmentAttention,
    segment_ids,
    swap_middle_axes,
    text_segment_ids,
    with_tnd_lengths,
)
from qwenvl.model.expert_ops import AscendGroupedKernels, ExpertsMatmul, GroupedMatmul
from qwenvl.model.lm_loss import ChunkedLossHead
from qwenvl.model.tensor_ops import unsqueeze
from qwenvl.model.weight_ops import WeightSource, shared_op
from qwenvl.model.layers import (
    Embedding,
    LayerNorm,
    Linear,
    MRotaryEmbedding,
    PatchProjection,
    RMSNorm,
    activation,
    activation_dtype,
    apply_rotary,
    compute_dtype,
    expand_as,
    frame_cu_seqlens,
    padded_patch_count,
    vision_reach,
    gelu_exact,
    matmul,
    on_ascend,
    parameter_dtype,
    rotated_heads,
    scattered_counts,
    use_half_precision_on_cpu,
    set_recompute,
    vision_rope_cos_sin,
    vision_rope_ids,
    vision_scatter_index,
    zeros_parameter,
)

TEXT_DEFAULTS: dict[str, Any] = {
    "attention_bias": False,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_scaling": None,
    "decoder_sparse_step": 1,
    "mlp_only_layers": None,
    "num_experts": 0,
}
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_act": "gelu_pytorch_tanh",
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
}
DEFAULT_MROPE_SECTION = [24, 20, 20]


def _text_config(config: dict, default_head_dim: int | None) -> dict[str, Any]:
    """text_config with HF's defaults for the keys read here (head_dim: 128 for Qwen3-VL, hidden/heads for MoE)."""
    text = {**TEXT_DEFAULTS, "head_dim": default_head_dim, **config.get("text_config", {})}
    if text["head_dim"] is None:
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    rope_type = (text["rope_scaling"] or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (Qwen3-VL uses 'default' interleaved mRoPE)")
    return text


# ------------------------------------------------------------------------------------------------- vision


class Qwen3VLVisionPatchEmbed(nn.Cell):
    """Holds the Conv3d-as-matmul projection (with bias) as `proj`, as HF names it."""

    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.proj = PatchProjection(
            vc["in_channels"], vc["temporal_patch_size"], vc["patch_size"], vc["hidden_size"], bias=True
        )

    def construct(self, x):
        return self.proj(x)


class Qwen3VLVisionAttention(nn.Cell):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        dim = vc["hidden_size"]
        self.heads = vc["num_heads"]
        self.head_dim = dim // self.heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.attn = SegmentAttention(self.head_dim**-0.5, causal=False)

    def construct(self, x, segments, cos, sin, lengths=None, reach=None):
        q, k, v = _vision_heads(self.qkv(x), cos, sin, self.heads, self.head_dim)
        return self.proj(self.attn(q, k, v, segments, lengths, reach)[0])


def _vision_heads(qkv, cos, sin, heads: int, head_dim: int):
    """(N, 3 * dim) -> q, k, v (1, heads, N, head_dim), q and k rotated; a function for the reason
    `layers.rotated_heads` gives."""
    qkv = qkv.reshape(qkv.shape[0], 3, heads, head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (N, heads, head_dim)
    q = swap_middle_axes(unsqueeze(apply_rotary(q, cos, sin), 0))
    k = swap_middle_axes(unsqueeze(apply_rotary(k, cos, sin), 0))
    return q, k, swap_middle_axes(unsqueeze(v, 0))


class Qwen3VLVisionMLP(nn.Cell):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.linear_fc1 = Linear(vc["hidden_size"], vc["intermediate_size"])
        self.linear_fc2 = Linear(vc["intermediate_size"], vc["hidden_size"])
        self.act = activation(vc["hidden_act"])

    def construct(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VLVisionBlock(nn.Cell):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.norm1 = LayerNorm(vc["hidden_size"], 1e-6)
        self.norm2 = LayerNorm(vc["hidden_size"], 1e-6)
        self.attn = Qwen3VLVisionAttention(vc)
        self.mlp = Qwen3VLVisionMLP(vc)

    def construct(self, x, segments, cos, sin, lengths=None, reach=None):
        x = x + self.attn(self.norm1(x), segments, cos, sin, lengths, reach)
        return x + self.mlp(self.norm2(x))


class Qwen3VLVisionPatchMerger(nn.Cell):
    """Merge each spatial_merge_size^2 window into one token: norm before (merger) or after (deepstack) the
    window concatenation, then fc1 -> exact GELU -> fc2."""

    def __init__(self, vc: dict[str, Any], postshuffle_norm: bool) -> None:
        super().__init__()
        self.merged = vc["hidden_size"] * vc["spatial_merge_size"] ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(self.merged if postshuffle_norm else vc["hidden_size"], 1e-6)
        self.linear_fc1 = Linear(self.merged, self.merged)
        self.linear_fc2 = Linear(self.merged, vc["out_hidden_size"])

    def construct(self, x):
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged))
        else:
            x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(gelu_exact(self.linear_fc1(x)))


class Qwen3VLVisionModel(nn.Cell):
    """Returns (merged features (M, out), tuple of deepstack features (M, out) per deepstack index)."""

    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.patch_embed = Qwen3VLVisionPatchEmbed(vc)
        self.pos_embed = Embedding(vc["num_position_embeddings"], vc["hidden_size"])
        self.blocks = nn.CellList([Qwen3VLVisionBlock(vc) for _ in range(vc["depth"])])
        self.merger = Qwen3VLVisionPatchMerger(vc, postshuffle_norm=False)
        self.deepstack_indexes = tuple(vc["deepstack_visual_indexes"])
        self.deepstack_merger_list = nn.CellList(
            [Qwen3VLVisionPatchMerger(vc, postshuffle_norm=True) for _ in self.deepstack_indexes]
        )

    def construct(self, pixel_values, segments, cos, sin, pos_index, pos_weight, lengths=None, reach=None):
        x = self.patch_embed(pixel_values)
        corners = ops.cast(self.pos_embed(pos_index.reshape(-1)), x.dtype).reshape(4, -1, x.shape[-1])
        x = x + (corners * expand_as(unsqueeze(ops.cast(pos_weight, x.dtype), -1), corners)).sum(0)
        deepstack = ()
        for index, block in enumerate(self.blocks):
            x = block(x, segments, cos, sin, lengths, reach)
            for slot, deep_index in enumerate(self.deepstack_indexes):
                if index == deep_index:
                    deepstack = deepstack + (self.deepstack_merger_list[slot](x),)
        return self.merger(x), deepstack


def pos_embed_interpolation(grid_thw: np.ndarray, num_positions: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear lookup of the learned sqrt(P) x sqrt(P) position table for every patch (HF
    `fast_pos_embed_interpolate`): ((4, N) int32 table rows, (4, N) float32 weights) for the corners
    (floor, floor), (floor, ceil), (ceil, floor), (ceil, ceil), in the merge-window-major patch order."""
    side = int(num_positions**0.5)
    rows, weights = [], []
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        hi = np.linspace(0, side - 1, int(h)).astype(np.float32)
        wi = np.linspace(0, side - 1, int(w)).astype(np.float32)
        h0, w0 = hi.astype(np.int64), wi.astype(np.int64)
        h1, w1 = np.minimum(h0 + 1, side - 1), np.minimum(w0 + 1, side - 1)
        dh, dw = hi - h0.astype(np.float32), wi - w0.astype(np.float32)
        one = np.float32(1.0)
        corners = [(h0, w0, one - dh, one - dw), (h0, w1, one - dh, dw), (h1, w0, dh, one - dw), (h1, w1, dh, dw)]
        idx = np.stack([(a[:, None] * side + b[None, :]) for a, b, _, _ in corners])  # (4, h, w)
        wgt = np.stack([(u[:, None] * v[None, :]) for _, _, u, v in corners]).astype(np.float32)
        rows.append(_merge_order(idx, int(t), merge))
        weights.append(_merge_order(wgt, int(t), merge))
    return np.concatenate(rows, 1).astype(np.int32), np.concatenate(weights, 1).astype(np.float32)


def _merge_order(per_patch: np.ndarray, frames: int, merge: int) -> np.ndarray:
    """(4, h, w) -> (4, frames*h*w): rows in merge-window-major order, repeated for every frame."""
    four, h, w = per_patch.shape
    ordered = per_patch.reshape(four, h // merge, merge, w // merge, merge).transpose(0, 1, 3, 2, 4)
    return np.tile(ordered.reshape(four, -1), (1, frames))


# --------------------------------------------------------------------------------------------------- text


class Qwen3VLTextAttention(nn.Cell):
    def __init__(self, tc: dict[str, Any]) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
        bias = tc["attention_bias"]
        self.q_proj = Linear(tc["hidden_size"], self.heads * self.head_dim, bias)
        self.k_proj = Linear(tc["hidden_size"], self.kv_heads * self.head_dim, bias)
        self.v_proj = Linear(tc["hidden_size"], self.kv_heads * self.head_dim, bias)
        self.o_proj = Linear(self.heads * self.head_dim, tc["hidden_size"], bias)
        self.q_norm = RMSNorm(self.head_dim, tc["rms_norm_eps"])
        self.k_norm = RMSNorm(self.head_dim, tc["rms_norm_eps"])
        self.attn = SegmentAttention(self.head_dim**-0.5, causal=True)

    def construct(self, x, segments, cos, sin, lengths=None):
        b, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, length, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, length, self.kv_heads, self.head_dim))
        q, k, v = rotated_heads(q, k, self.v_proj(x), cos, sin, self.head_dim)
        return self.o_proj(self.attn(q, k, v, segments, lengths))


class Qwen3VLTextMLP(nn.Cell):
    def __init__(self, tc: dict[str, Any], intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(tc["hidden_size"], intermediate_size, False)
        self.up_proj = Linear(tc["hidden_size"], intermediate_size, False)
        self.down_proj = Linear(intermediate_size, tc["hidden_size"], False)
        self.act = activation(tc["hidden_act"])

    def construct(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen3VLMoeTextExperts(nn.Cell):
    """Fused expert weights in HF 4.57 layout: gate_up_proj (E, hidden, 2*inter), down_proj (E, inter, hidden).

    Ascend dispatches each token to its top-k experts only (sorted by expert, grouped matmuls, `grouped`
    kernels); elsewhere every expert runs on every token weighted by the (mostly zero) routing weights. Both
    equal HF. Either weight may be read through a source (`use_source`: ZeRO-3 chunks, half precision on CPU);
    `expert_ops` holds the matmuls that then rebuild it in the backward pass.
    """

    NORMAL_INIT = ("gate_up_proj", "down_proj")
    SOURCED = ("gate_up_proj", "down_proj")

    def __init__(self, tc: dict[str, Any]) -> None:
        super().__init__()
        experts, hidden, inter = tc["num_experts"], tc["hidden_size"], tc["moe_intermediate_size"]
        self.gate_up_proj = zeros_parameter(experts, hidden, 2 * inter)
        self.down_proj = zeros_parameter(experts, inter, hidden)
        self.shapes = {"gate_up_proj": (experts, hidden, 2 * inter), "down_proj": (experts, inter, hidden)}
        self.num_experts = experts
        self.inter = inter
        self.act = activation(tc["hidden_act"])
        self.grouped = AscendGroupedKernels()
        self.sources: dict[str, WeightSource] = {}
        self.gate_up_dense = self.down_dense = self.gate_up_grouped = self.down_grouped = None

    def use_source(self, source: WeightSource, name: str) -> None:
        self.sources[name] = source
        self._build_ops()

    def source_of(self, name: str) -> WeightSource | None:
        return self.sources.get(name)

    def source_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def use_grouped_kernels(self, kernels: nn.Cell) -> None:
        """Another implementation of the grouped kernels (the tests' CPU twin)."""
        self.grouped = kernels
        self._build_ops()

    def _build_ops(self) -> None:
        for name, prefix in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
            if name in self.sources:
                setattr(self, f"{prefix}_dense", shared_op(ExpertsMatmul, self.sources[name]))
                setattr(self, f"{prefix}_grouped", GroupedMatmul(self.sources[name], self.grouped))

    def construct(self, x, top_weight, top_index):
        """x (T, hidden); top_weight, top_index (T, k) the routing -> (T, hidden)."""
        if on_ascend():
            return self.dispatched(x, top_weight, top_index)
        return self.dense(x, top_weight, top_index)

    def dense(self, x, top_weight, top_index):
        routing = (ops.one_hot(top_index, self.num_experts, 1.0, 0.0) * unsqueeze(top_weight, -1)).sum(1)  # (T, E)
        if self.gate_up_dense is None:
            gate_up = matmul(unsqueeze(x, 0), ops.cast(self.gate_up_proj, x.dtype))  # (E, T, 2*inter)
        else:
            gate_up = self.gate_up_dense(ops.broadcast_to(unsqueeze(x, 0), (self.num_experts,) + x.shape), self.gate_up_proj)
        hidden = self.act(gate_up[..., : self.inter]) * gate_up[..., self.inter :]
        if self.down_dense is None:
            out = matmul(hidden, ops.cast(self.down_proj, x.dtype))  # (E, T, hidden)
        else:
            out = self.down_dense(hidden, self.down_proj)
        return (out * unsqueeze(ops.cast(routing, x.dtype).swapaxes(0, 1), -1)).sum(0)

    def dispatched(self, x, top_weight, top_index):
        """The T*k (token, expert) pairs sorted by expert, two grouped matmuls, weighted sum back per token."""
        tokens, k = top_index.shape
        experts = top_index.reshape(-1)
        order = ops.argsort(ops.cast(experts, ms.float32))  # float keys: Ascend's sort kernels take floats
        token_of_row = order // k
        counts = ops.cast(ops.one_hot(experts, self.num_experts, 1.0, 0.0).sum(0), ms.int64)
        rows = ops.gather(x, token_of_row, 0)
        if self.gate_up_grouped is None:
            gate_up = self.grouped.forward(rows, ops.cast(self.gate_up_proj, x.dtype), counts)
        else:
            gate_up = self.gate_up_grouped(rows, counts, self.gate_up_proj)
        hidden = self.act(gate_up[:, : self.inter]) * gate_up[:, self.inter :]
        if self.down_grouped is None:
            out = self.grouped.forward(hidden, ops.cast(self.down_proj, x.dtype), counts)
        else:
            out = self.down_grouped(hidden, counts, self.down_proj)
        weighted = ops.cast(out, ms.float32) * ops.gather(top_weight.reshape(-1), order, 0)[:, None]
        return ops.cast(ops.unsorted_segment_sum(weighted, token_of_row, tokens), x.dtype)


class Qwen3VLMoeTextSparseMoeBlock(nn.Cell):
    """Router softmax (float32) -> top-k -> renormalise to sum 1 (HF always does) -> weighted expert sum."""

    def __init__(self, tc: dict[str, Any]) -> None:
        super().__init__()
        self.gate = Linear(tc["hidden_size"], tc["num_experts"], False)
        self.experts = Qwen3VLMoeTextExperts(tc)
        self.top_k = tc["num_experts_per_tok"]

    def construct(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs = ops.softmax(ops.cast(self.gate(tokens), ms.float32), -1)
        top, index = ops.topk(probs, self.top_k)
        return self.experts(tokens, top / top.sum(-1, keepdims=True), index).reshape(shape)


class Qwen3VLTextDecoderLayer(nn.Cell):
    def __init__(self, tc: dict[str, Any], layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(tc["hidden_size"], tc["rms_norm_eps"])
        self.self_attn = Qwen3VLTextAttention(tc)
        self.post_attention_layernorm = RMSNorm(tc["hidden_size"], tc["rms_norm_eps"])
        sparse = (
            tc["num_experts"] > 0
            and layer_index not in (tc["mlp_only_layers"] or [])
            and (layer_index + 1) % tc["decoder_sparse_step"] == 0
        )
        self.mlp = Qwen3VLMoeTextSparseMoeBlock(tc) if sparse else Qwen3VLTextMLP(tc, tc["intermediate_size"])

    def construct(self, x, segments, cos, sin, lengths=None):
        x = x + self.self_attn(self.input_layernorm(x), segments, cos, sin, lengths)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3VLTextModel(nn.Cell):
    def __init__(self, tc: dict[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = Embedding(tc["vocab_size"], tc["hidden_size"])
        self.layers = nn.CellList([Qwen3VLTextDecoderLayer(tc, i) for i in range(tc["num_hidden_layers"])])
        self.norm = RMSNorm(tc["hidden_size"], tc["rms_norm_eps"])
        rope = tc["rope_scaling"] or {}
        self.rotary = MRotaryEmbedding(
            tc["head_dim"], tc["rope_theta"], rope.get("mrope_section", DEFAULT_MROPE_SECTION), interleaved=True
        )


class Qwen3VLModel(nn.Cell):
    def __init__(self, tc: dict[str, Any], vc: dict[str, Any]) -> None:
        super().__init__()
        self.visual = Qwen3VLVisionModel(vc)
        self.language_model = Qwen3VLTextModel(tc)


# -------------------------------------------------------------------------------------------------- model


class Qwen3VLForConditionalGeneration(ChunkedLossHead, nn.Cell):
    """Qwen3-VL (dense); the MoE subclass changes `model_type` and the head_dim default (layers read `num_experts`)."""

    model_type = "qwen3_vl"
    default_head_dim: int | None = 128

    def __init__(self, config: dict[str, Any], dtype: str = "float32") -> None:
        super().__init__()
        self.config = config
        tc = _text_config(config, self.default_head_dim)
        vc = {**VISION_DEFAULTS, **config.get("vision_config", {})}
        self.compute_dtype = compute_dtype(dtype)
        with parameter_dtype(self.compute_dtype):
            self.model = Qwen3VLModel(tc, vc)
            self.lm_head = Linear(tc["hidden_size"], tc["vocab_size"], False)
        if tc["tie_word_embeddings"]:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        use_half_precision_on_cpu(self, self.compute_dtype)
        self.activation_dtype = activation_dtype(self.compute_dtype)
        self.init_loss()
        self.image_token_id = int(config.get("image_token_id", tc.get("image_token_id", 151655)))
        self.video_token_id = int(config.get("video_token_id", tc.get("video_token_id", 151656)))
        self.merge = vc["spatial_merge_size"]
        self.patch_values = vc["in_channels"] * vc["temporal_patch_size"] * vc["patch_size"] ** 2
        self.vision_head_dim = vc["hidden_size"] // vc["num_heads"]
        self.num_positions = vc["num_position_embeddings"]

    def enable_recompute(self) -> None:
        set_recompute(list(self.model.language_model.layers) + list(self.model.visual.blocks))

    def prepare_inputs(self, batch: dict[str, np.ndarray | None]) -> dict[str, Tensor]:
        """Host-side masks, rotary ids, pos-embed interpolation and scatter indices for one collated batch."""
        input_ids = np.asarray(batch["input_ids"])
        bsz, length = input_ids.shape
        if batch.get("position_ids") is None:
            raise ValueError("batch has no position_ids: compute them with qwenvl.data.rope2d.get_rope_index_3")
        inputs = {
            "input_ids": input_ids.astype(np.int32),
            "labels": np.asarray(batch["labels"]).astype(np.int32),
            "position_ids": np.asarray(batch["position_ids"]).astype(np.int32),
            "text_segments": text_segment_ids(bsz, length, batch.get("attention_mask"), batch.get("cu_seqlens")),
        }
        grids, pixels = [], []
        for grid_key, pixel_key in (("image_grid_thw", "pixel_values"), ("video_grid_thw", "pixel_values_videos")):
            if batch.get(grid_key) is None or batch.get(pixel_key) is None:
                grids.append(np.zeros((0, 3), np.int64))
                pixels.append(np.zeros((0, 1), np.float32))
            else:
                grids.append(np.asarray(batch[grid_key], np.int64).reshape(-1, 3))
                pixels.append(np.asarray(batch[pixel_key], np.float32))
        n_merged = [int(g.prod(-1).sum()) // self.merge**2 for g in grids]
        index, slots = vision_scatter_index(input_ids, self.image_token_id, self.video_token_id,
                                            *scattered_counts(batch, *n_merged))  # fmt: skip
        if sum(n_merged) == 0:
            return {name: Tensor(value) for name, value in with_tnd_lengths(inputs).items()}
        grid = np.concatenate(grids)
        n_patches = int(grid.prod(-1).sum())
        pixel_values = np.concatenate([p for g, p in zip(grids, pixels) if len(g)])
        if len(pixel_values) != n_patches:
            raise ValueError(f"{len(pixel_values)} rows of pixel values but the grids hold {n_patches} patches")
        n = padded_patch_count(batch, n_patches)
        pad = n - n_patches
        rope_ids = np.concatenate([vision_rope_ids(grid, self.merge), np.zeros((pad, 2), np.int64)])
        cos, sin = vision_rope_cos_sin(rope_ids, self.vision_head_dim)
        pos_index, pos_weight = pos_embed_interpolation(grid, self.num_positions, self.merge)
        pos_index = np.pad(pos_index, ((0, 0), (0, pad)))
        pos_weight = np.pad(pos_weight, ((0, 0), (0, pad)))
        frames = frame_cu_seqlens(grid)
        inputs.update(
            pixel_values=np.pad(pixel_values, ((0, pad), (0, 0))),
            vision_segments=segment_ids(n, np.append(frames, n))[None],
            **vision_reach(batch, np.diff(frames)),
            vision_cos=cos[:, None],
            vision_sin=sin[:, None],
            pos_index=pos_index,
            pos_weight=pos_weight,
            vision_index=index,
            vision_slots=slots,
        )
        return {name: Tensor(value) for name, value in with_tnd_lengths(inputs).items()}

    def _hidden(self, input_ids, position_ids, text_segments, pixel_values, vision_segments, vision_cos, vision_sin,
                pos_index, pos_weight, vision_index, vision_slots, text_lengths, vision_lengths,
                vision_reach):  # fmt: skip
        x, deepstack, layer_args = self.layer_inputs(input_ids, None, position_ids, text_segments, pixel_values,
                                                     vision_segments, vision_cos, vision_sin, pos_index, pos_weight,
                                                     vision_index, vision_slots, text_lengths, vision_lengths,
                                                     vision_reach)  # fmt: skip
        for index, layer in enumerate(self.model.language_model.layers):
            x = layer(x, *layer_args)
            if index < len(deepstack):
                x = x + deepstack[index]
        return self.model.language_model.norm(x)

    def layer_inputs(self, input_ids, labels, position_ids, text_segments=None, pixel_values=None,
                     vision_segments=None, vision_cos=None, vision_sin=None, pos_index=None, pos_weight=None,
                     vision_index=None, vision_slots=None, text_lengths=None, vision_lengths=None,
                     vision_reach=None):  # fmt: skip
        """(embeddings, deepstack features, layer_args): what the decoder layers take, from `construct`'s inputs;
        each layer is `layer(x, *layer_args)`, and deepstack feature k is added to layer k's output
        (`qwenvl.train.layer_by_layer`)."""
        lm = self.model.language_model
        x = ops.cast(lm.embed_tokens(input_ids), self.activation_dtype)
        deepstack = ()
        if pixel_values is not None:
            feats, deep = self.model.visual(ops.cast(pixel_values, self.activation_dtype), vision_segments, vision_cos,
                                            vision_sin, pos_index, pos_weight, vision_lengths,
                                            vision_reach)  # fmt: skip
            slots = expand_as(ops.cast(vision_slots, ms.bool_), x)
            x = ops.select(slots, ops.gather(feats, vision_index, 0), x)
            weight = expand_as(ops.cast(vision_slots, x.dtype), x)
            for feature in deep:
                deepstack = deepstack + (ops.gather(feature, vision_index, 0) * weight,)
        if text_segments is None:  # one causal sequence per row
            text_segments = ops.zeros(input_ids.shape, ms.int32)
        cos, sin = lm.rotary(position_ids)
        return x, deepstack, (text_segments, unsqueeze(cos, 1), unsqueeze(sin, 1), text_lengths)

    def logits(self, input_ids, labels, position_ids, text_segments=None, pixel_values=None, vision_segments=None,
               vision_cos=None, vision_sin=None, pos_index=None, pos_weight=None, vision_index=None,
               vision_slots=None, text_lengths=None, vision_lengths=None, vision_reach=None):  # fmt: skip
        """(B, L, vocab) float32 logits."""
        hidden = self._hidden(input_ids, position_ids, text_segments, pixel_values, vision_segments, vision_cos,
                              vision_sin, pos_index, pos_weight, vision_index, vision_slots, text_lengths,
                              vision_lengths, vision_reach)  # fmt: skip
        return ops.cast(self.lm_head(hidden), ms.float32)

    def construct(self, input_ids, labels, position_ids, text_segments=None, pixel_values=None, vision_segments=None,
                  vision_cos=None, vision_sin=None, pos_index=None, pos_weight=None, vision_index=None,
                  vision_slots=None, text_lengths=None, vision_lengths=None, vision_reach=None):  # fmt: skip
        """(loss_sum, n_tokens): summed shifted cross-entropy over supervised targets and their count."""
        hidden = self._hidden(input_ids, position_ids, text_segments, pixel_values, vision_segments, vision_cos,
                              vision_sin, pos_index, pos_weight, vision_index, vision_slots, text_lengths,
                              vision_lengths, vision_reach)  # fmt: skip
        return self._loss(hidden, labels)


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL-MoE: same towers; decoder layers hold `Qwen3VLMoeTextSparseMoeBlock` MLPs."""

    model_type = "qwen3_vl_moe"
    default_head_dim = None
