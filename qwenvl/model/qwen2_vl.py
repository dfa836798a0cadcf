"""Native MindSpore Qwen2-VL and Qwen2.5-VL (`...ForConditionalGeneration`), numerically equal to transformers 4.57.

Both share the Qwen2 language model with chunked multimodal RoPE. Their vision towers differ:
Qwen2-VL blocks use LayerNorm and a quick_gelu fc1/fc2 MLP with full attention per frame; Qwen2.5-VL blocks
use RMSNorm and a SwiGLU MLP with biases, and attend inside windows except in `fullatt_block_indexes`, on
patches reordered window by window (reordered back after the merger).

Images and videos go through one vision pass (features laid out [images..., videos...]): every attention
block stays inside one frame, so this equals HF's separate image and video passes.
"""

from __future__ import annotations

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
from qwenvl.model.lm_loss import ChunkedLossHead
from qwenvl.model.tensor_ops import unsqueeze
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
    parameter_dtype,
    rotated_heads,
    scattered_counts,
    use_half_precision_on_cpu,
    set_recompute,
    vision_reach,
    vision_rope_cos_sin,
    vision_rope_ids,
    vision_scatter_index,
)

TEXT_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": False}
VISION_DEFAULTS = {"in_channels": 3, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2}


def text_settings(config: dict) -> dict:
    """HF's rule: `text_config` when present, else the legacy top-level text fields."""
    return {**TEXT_DEFAULTS, **config, **(config.get("text_config") or {})}


def vision_settings(config: dict) -> dict:
    return {**VISION_DEFAULTS, **config["vision_config"]}


class Activation(nn.Cell):
    """A parameterless activation cell (keeps `mlp.0`/`mlp.2` numbering of HF's nn.Sequential)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.fn = activation(name)

    def construct(self, x):
        return self.fn(x)


# ------------------------------------------------------------------------------------------------- vision


class PatchEmbed(nn.Cell):
    def __init__(self, vision: dict, embed_dim: int) -> None:
        super().__init__()
        self.proj = PatchProjection(
            vision["in_channels"], vision["temporal_patch_size"], vision["patch_size"], embed_dim
        )

    def construct(self, x):
        return self.proj(x)


class VisionAttention(nn.Cell):
    """Bidirectional attention over (N, dim) patches with 2-D rotary, within segments (frames or windows)."""

    def __init__(self, dim: int, heads: int, reach: int = 0) -> None:
        super().__init__()
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.heads = heads
        self.head_dim = dim // heads
        self.attn = SegmentAttention(self.head_dim**-0.5, causal=False, reach=reach)

    def construct(self, x, segments, cos, sin, lengths=None, reach=None):
        """x (N, dim); cos/sin (1, N, 1, head_dim); segments (1, N); reach: see `SegmentAttention`."""
        q, k, v = _vision_heads(self.qkv(x), cos, sin, self.heads, self.head_dim)
        return self.proj(self.attn(q, k, v, segments, lengths, reach)[0])


def _vision_heads(qkv, cos, sin, heads: int, head_dim: int):
    """(N, 3 * dim) -> q, k, v (1, heads, N, head_dim), q and k rotated; a function for the reason
    `layers.rotated_heads` gives (~3.5 MiB of host memory per vision block)."""
    qkv = qkv.reshape(1, qkv.shape[0], 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return swap_middle_axes(apply_rotary(q, cos, sin)), swap_middle_axes(apply_rotary(k, cos, sin)), swap_middle_axes(v)


class VisionMlp(nn.Cell):
    """Qwen2-VL: fc2(act(fc1(x)))."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.act = activation(act)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nn.Cell):
    """down(act(gate(x)) * up(x)): Qwen2.5-VL vision MLP (with biases) and the Qwen2 decoder MLP (without)."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias)
        self.up_proj = Linear(dim, hidden, bias)
        self.down_proj = Linear(hidden, dim, bias)
        self.act = activation(act)

    def construct(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Cell):
    """Pre-norm attention + MLP; `reach`: the longest segment its attention sees (window blocks), 0 unbounded."""

    def __init__(self, dim: int, heads: int, norm: type, mlp: nn.Cell, reach: int = 0) -> None:
        super().__init__()
        self.norm1 = norm(dim, 1e-6)
        self.norm2 = norm(dim, 1e-6)
        self.attn = VisionAttention(dim, heads, reach)
        self.mlp = mlp

    def construct(self, x, segments, cos, sin, lengths=None, reach=None):
        x = x + self.attn(self.norm1(x), segments, cos, sin, lengths, reach)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Cell):
    """ln_q, then each 2x2 group of neighbouring patches concatenated, then Linear-GELU-Linear."""

    def __init__(self, out_dim: int, context_dim: int, merge: int, norm: type) -> None:
        super().__init__()
        self.hidden = context_dim * merge * merge
        self.ln_q = norm(context_dim, 1e-6)
        self.mlp = nn.CellList([Linear(self.hidden, self.hidden), Activation("gelu"), Linear(self.hidden, out_dim)])

    def construct(self, x):
        h = self.ln_q(x).reshape(-1, self.hidden)
        return self.mlp[2](self.mlp[1](self.mlp[0](h)))


class VisionTransformer(nn.Cell):
    """Patch embed, blocks (window or full attention each), merger; optional window reorder and its inverse."""

    def __init__(
        self, patch_embed: nn.Cell, blocks: list[nn.Cell], merger: nn.Cell, windowed: tuple[bool, ...]
    ) -> None:
        super().__init__()
        self.patch_embed = patch_embed
        self.blocks = nn.CellList(blocks)
        self.merger = merger
        self.windowed = windowed

    def construct(self, pixel_values, cos, sin, full_segments, window_segments=None, patch_order=None,
                  merge_order=None, full_lengths=None, window_lengths=None, full_reach=None):  # fmt: skip
        """`full_reach`: the longest frame as an input's length, which bounds the keys the CPU twin computes in
        the full-attention blocks (window blocks have their own bound)."""
        x = self.patch_embed(pixel_values)
        if patch_order is not None:
            x = ops.gather(x, patch_order, 0)
        cos, sin = unsqueeze(unsqueeze(cos, 0), 2), unsqueeze(unsqueeze(sin, 0), 2)
        for index, block in enumerate(self.blocks):
            if self.windowed[index]:
                x = block(x, window_segments, cos, sin, window_lengths)
            else:
                x = block(x, full_segments, cos, sin, full_lengths, full_reach)
        x = self.merger(x)
        if merge_order is not None:
            x = ops.gather(x, merge_order, 0)
        return x


def qwen2_vision(vision: dict) -> VisionTransformer:
    dim, heads = vision["embed_dim"], vision["num_heads"]
    act = vision.get("hidden_act", "quick_gelu")
    blocks = [VisionBlock(dim, heads, LayerNorm, VisionMlp(dim, dim * vision["mlp_ratio"], act))
              for _ in range(vision["depth"])]  # fmt: skip
    merger = PatchMerger(vision["hidden_size"], dim, vision["spatial_merge_size"], LayerNorm)
    return VisionTransformer(PatchEmbed(vision, dim), blocks, merger, (False,) * vision["depth"])


def qwen25_vision(vision: dict) -> VisionTransformer:
    dim, heads = vision["hidden_size"], vision["num_heads"]
    act = vision.get("hidden_act", "silu")
    full = set(vision.get("fullatt_block_indexes", ()))
    windowed = tuple(index not in full for index in range(vision["depth"]))
    reach = window_patches(vision)
    blocks = [VisionBlock(dim, heads, RMSNorm, GatedMlp(dim, vision["intermediate_size"], act, bias=True),
                          reach if windowed[index] else 0) for index in range(vision["depth"])]  # fmt: skip
    merger = PatchMerger(vision["out_hidden_size"], dim, vision["spatial_merge_size"], RMSNorm)
    return VisionTransformer(PatchEmbed(vision, dim), blocks, merger, windowed)


def window_patches(vision: dict) -> int:
    """Patches in one Qwen2.5-VL attention window (64 for window_size 112, patch 14, merge 2): the most a window
    segment holds (`window_layout`)."""
    merge, patch = vision["spatial_merge_size"], vision["patch_size"]
    return (vision["window_size"] // merge // patch * merge) ** 2


def window_layout(grid_thw: np.ndarray, merge: int, patch: int, window_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL window order of merged units and the window cu_seqlens over patches (HF get_window_index)."""
    unit = merge * merge
    win = window_size // merge // patch
    order, cu, offset = [], [0], 0
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        gh, gw = int(h) // merge, int(w) // merge
        index = np.arange(int(t) * gh * gw).reshape(int(t), gh, gw)
        pad_h, pad_w = win - gh % win, win - gw % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(int(t), nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(int(t), nh * nw, -1)
        lengths = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        order.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(lengths) * unit + cu[-1]).tolist())
        offset += int(t) * gh * gw
    return np.concatenate(order), np.asarray(cu, np.int64)


# ------------------------------------------------------------------------------------------------ language


class TextAttention(nn.Cell):
    def __init__(self, text: dict) -> None:
        super().__init__()
        hidden, heads, kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
        self.heads, self.kv_heads, self.head_dim = heads, kv, hidden // heads
        self.q_proj = Linear(hidden, heads * self.head_dim)
        self.k_proj = Linear(hidden, kv * self.head_dim)
        self.v_proj = Linear(hidden, kv * self.head_dim)
        self.o_proj = Linear(heads * self.head_dim, hidden, bias=False)
        self.attn = SegmentAttention(self.head_dim**-0.5, causal=True)

    def construct(self, x, segments, cos, sin, lengths=None):
        q, k, v = rotated_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, self.head_dim)
        return self.o_proj(self.attn(q, k, v, segments, lengths))


class DecoderLayer(nn.Cell):
    def __init__(self, text: dict) -> None:
        super().__init__()
        eps = text["rms_norm_eps"]
        self.self_attn = TextAttention(text)
        self.mlp = GatedMlp(text["hidden_size"], text["intermediate_size"], text["hidden_act"], bias=False)
        self.input_layernorm = RMSNorm(text["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(text["hidden_size"], eps)

    def construct(self, x, segments, cos, sin, lengths=None):
        x = x + self.self_attn(self.input_layernorm(x), segments, cos, sin, lengths)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Cell):
    def __init__(self, text: dict) -> None:
        super().__init__()
        self.embed_tokens = Embedding(text["vocab_size"], text["hidden_size"])
        self.layers = nn.CellList([DecoderLayer(text) for _ in range(text["num_hidden_layers"])])
        self.norm = RMSNorm(text["hidden_size"], text["rms_norm_eps"])
        section = text["rope_scaling"]["mrope_section"]
        self.rotary = MRotaryEmbedding(text["hidden_size"] // text["num_attention_heads"], text["rope_theta"], section)



class QwenVLModel(nn.Cell):
    """`model.visual` and `model.language_model` (HF 4.57 in-memory layout)."""

    def __init__(self, visual: nn.Cell, language_model: nn.Cell) -> None:
        super().__init__()
        self.visual = visual
        self.language_model = language_model


# -------------------------------------------------------------------------------------------- top cells


class _Qwen2FamilyForConditionalGeneration(ChunkedLossHead, nn.Cell):
    """Shared body of the Qwen2-VL and Qwen2.5-VL cells; subclasses pick the vision tower."""

    model_type = ""

    def __init__(self, config: dict, dtype: str = "float32") -> None:
        super().__init__()
        self.config = config
        self.text = text_settings(config)
        self.vision = vision_settings(config)
        self.compute_dtype = compute_dtype(dtype)
        with parameter_dtype(self.compute_dtype):
            self.model = QwenVLModel(self._vision_tower(self.vision), LanguageModel(self.text))
            self.lm_head = Linear(self.text["hidden_size"], self.text["vocab_size"], bias=False)
        if self.text["tie_word_embeddings"]:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        use_half_precision_on_cpu(self, self.compute_dtype)
        self.activation_dtype = activation_dtype(self.compute_dtype)
        self.init_loss()
        self.merge = self.vision["spatial_merge_size"]
        self.patch_values = self.vision["in_channels"] * self.vision["temporal_patch_size"] * self.vision["patch_size"] ** 2
        self.vision_head_dim = self._vision_dim() // self.vision["num_heads"]

    @staticmethod
    def _vision_tower(vision: dict) -> VisionTransformer:
        raise NotImplementedError

    def _vision_dim(self) -> int:
        raise NotImplementedError

    def _window_inputs(self, grid: np.ndarray, n_real: int, n: int) -> dict[str, np.ndarray]:
        """Window-attention inputs over `n` patches, the last `n - n_real` padding (none for Qwen2-VL)."""
        return {}

    def enable_recompute(self) -> None:
        set_recompute(list(self.model.language_model.layers) + list(self.model.visual.blocks))

    # ----------------------------------------------------------------------------------- host side

    def prepare_inputs(self, batch: dict[str, np.ndarray | None]) -> dict[str, Tensor]:
        """Collated numpy batch -> construct inputs, with every data-dependent index and mask precomputed."""
        input_ids = np.asarray(batch["input_ids"])
        bsz, length = input_ids.shape
        arrays: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(np.int32),
            "labels": np.asarray(batch["labels"]).astype(np.int32),
            "position_ids": np.asarray(batch["position_ids"]).astype(np.int32),
            "text_segments": text_segment_ids(bsz, length, batch.get("attention_mask"), batch.get("cu_seqlens")),
        }
        arrays.update(self._vision_arrays(batch, input_ids))
        return {name: Tensor(value) for name, value in with_tnd_lengths(arrays).items()}

    def _vision_arrays(self, batch: dict, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        unit = self.merge * self.merge
        pixels, grids, merged = [], [], []
        for pixel_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            pixel, grid = batch.get(pixel_key), batch.get(grid_key)
            if pixel is None:
                merged.append(0)
                continue
            grid = np.asarray(grid, np.int64).reshape(-1, 3)
            described = int(grid.prod(-1).sum())
            if described != len(pixel):
                raise ValueError(f"{pixel_key} has {len(pixel)} patches but {grid_key} describes {described}")
            pixels.append(np.asarray(pixel, np.float32))
            grids.append(grid)
            merged.append(described // unit)
        index, slots = vision_scatter_index(
            input_ids, self.config["image_token_id"], self.config["video_token_id"], *scattered_counts(batch, *merged)
        )
        if not pixels:
            return {}
        grid = np.concatenate(grids)
        n_real = sum(len(p) for p in pixels)
        n = padded_patch_count(batch, n_real)
        frames = frame_cu_seqlens(grid)
        rope_ids = np.concatenate([vision_rope_ids(grid, self.merge), np.zeros((n - n_real, 2), np.int64)])
        extra = self._window_inputs(grid, n_real, n)
        if "vision_patch_order" in extra:
            rope_ids = rope_ids[extra["vision_patch_order"]]
        cos, sin = vision_rope_cos_sin(rope_ids, self.vision_head_dim)
        padding = np.zeros((n - n_real, pixels[0].shape[1]), np.float32)
        return {
            "pixel_values": np.concatenate(pixels + [padding]),
            "vision_cos": cos,
            "vision_sin": sin,
            "vision_full_segments": segment_ids(n, np.append(frames, n))[None],
            **vision_reach(batch, np.diff(frames)),
            **extra,
            "vision_index": index,
            "vision_slots": slots,
        }

    # ----------------------------------------------------------------------------------- graph side

    def _hidden(self, input_ids, position_ids, text_segments, pixel_values, vision_cos, vision_sin,
                vision_full_segments, vision_window_segments, vision_patch_order, vision_merge_order,
                vision_index, vision_slots, text_lengths, vision_full_lengths, vision_window_lengths,
                vision_reach):  # fmt: skip
        x, _, layer_args = self.layer_inputs(input_ids, None, position_ids, text_segments, pixel_values, vision_cos,
                                             vision_sin, vision_full_segments, vision_window_segments,
                                             vision_patch_order, vision_merge_order, vision_index, vision_slots,
                                             text_lengths, vision_full_lengths, vision_window_lengths,
                                             vision_reach)  # fmt: skip
        for layer in self.model.language_model.layers:
            x = layer(x, *layer_args)
        return self.model.language_model.norm(x)

    def layer_inputs(self, input_ids, labels, position_ids, text_segments=None, pixel_values=None, vision_cos=None,
                     vision_sin=None, vision_full_segments=None, vision_window_segments=None, vision_patch_order=None,
                     vision_merge_order=None, vision_index=None, vision_slots=None, text_lengths=None,
                     vision_full_lengths=None, vision_window_lengths=None, vision_reach=None):  # fmt: skip
        """(embeddings, deepstack features (none here), layer_args): what the decoder layers take, from
        `construct`'s inputs; each layer is `layer(x, *layer_args)` (`qwenvl.train.layer_by_layer`)."""
        lm = self.model.language_model
        x = ops.cast(lm.embed_tokens(input_ids), self.activation_dtype)
        if pixel_values is not None:
            pixels = ops.cast(pixel_values, self.activation_dtype)
            feats = self.model.visual(pixels, vision_cos, vision_sin, vision_full_segments, vision_window_segments,
                                      vision_patch_order, vision_merge_order, vision_full_lengths,
                                      vision_window_lengths, vision_reach)  # fmt: skip
            slots = expand_as(ops.cast(vision_slots, self.activation_dtype), x)
            x = x * (1 - slots) + ops.gather(feats, vision_index, 0) * slots
        if text_segments is None:  # one causal sequence per row
            text_segments = ops.zeros(input_ids.shape, ms.int32)
        cos, sin = lm.rotary(position_ids)
        return x, (), (text_segments, unsqueeze(cos, 1), unsqueeze(sin, 1), text_lengths)

    def logits(self, input_ids, labels=None, position_ids=None, text_segments=None, pixel_values=None,
               vision_cos=None, vision_sin=None, vision_full_segments=None, vision_window_segments=None,
               vision_patch_order=None, vision_merge_order=None, vision_index=None, vision_slots=None,
               text_lengths=None, vision_full_lengths=None, vision_window_lengths=None, vision_reach=None):  # fmt: skip
        """(B, L, vocab) float32 logits."""
        hidden = self._hidden(input_ids, position_ids, text_segments, pixel_values, vision_cos, vision_sin,
                              vision_full_segments, vision_window_segments, vision_patch_order, vision_merge_order,
                              vision_index, vision_slots, text_lengths, vision_full_lengths,
                              vision_window_lengths, vision_reach)  # fmt: skip
        return ops.cast(self.lm_head(hidden), ms.float32)

    def construct(self, input_ids, labels, position_ids, text_segments=None, pixel_values=None,
                  vision_cos=None, vision_sin=None, vision_full_segments=None, vision_window_segments=None,
                  vision_patch_order=None, vision_merge_order=None, vision_index=None, vision_slots=None,
                  text_lengths=None, vision_full_lengths=None, vision_window_lengths=None,
                  vision_reach=None):  # fmt: skip
        """(loss_sum, n_tokens): summed shifted cross-entropy over supervised targets and their count."""
        hidden = self._hidden(input_ids, position_ids, text_segments, pixel_values, vision_cos, vision_sin,
                              vision_full_segments, vision_window_segments, vision_patch_order, vision_merge_order,
                              vision_index, vision_slots, text_lengths, vision_full_lengths,
                              vision_window_lengths, vision_reach)  # fmt: skip
        return self._loss(hidden, labels)


class Qwen2VLForConditionalGeneration(_Qwen2FamilyForConditionalGeneration):
    model_type = "qwen2_vl"

    @staticmethod
    def _vision_tower(vision: dict) -> VisionTransformer:
        return qwen2_vision(vision)

    def _vision_dim(self) -> int:
        return self.vision["embed_dim"]


class Qwen2_5_VLForConditionalGeneration(_Qwen2FamilyForConditionalGeneration):
    model_type = "qwen2_5_vl"

    @staticmethod
    def _vision_tower(vision: dict) -> VisionTransformer:
        return qwen25_vision(vision)

    def _vision_dim(self) -> int:
        return self.vision["hidden_size"]

    def _window_inputs(self, grid: np.ndarray, n_real: int, n: int) -> dict[str, np.ndarray]:
        unit = self.merge * self.merge
        order, cu_window = window_layout(grid, self.merge, self.vision["patch_size"], self.vision["window_size"])
        order = np.concatenate([order, np.arange(n_real // unit, n // unit)])
        patch_order = (order[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
        return {
            "vision_window_segments": segment_ids(n, np.append(cu_window, n))[None],
            "vision_patch_order": patch_order.astype(np.int32),
            "vision_merge_order": np.argsort(order).astype(np.int32),
        }
