"""A tiny vision-language model implementing the native model API, for trainer tests.

Parameter names follow transformers 4.57 (`model.visual.*`, `model.language_model.*`, `lm_head.weight`),
so freezing and parameter-group rules see the real layout; the maths is a small but real causal LM
(losses go down) with a ViT-like tower whose merged patch features replace the image/video tokens.
Qwen3-like `deepstack_merger_list` features are added after the first decoder layer when enabled.
LayerNorm cells are named `LayerNorm` and RMSNorm cells `RMSNorm`, as in the native models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
import mindspore as ms

from qwenvl.constants import IGNORE_INDEX

NEG_INF = -1e9
DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


@dataclass
class ToyConfig:
    vocab_size: int = 48
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64
    patch_dim: int = 12
    vision_hidden: int = 16
    vision_depth: int = 2
    merge_size: int = 2
    image_token_id: int = 3
    video_token_id: int = 4
    deepstack: bool = False
    tie_word_embeddings: bool = False
    vision_rmsnorm: bool = False
    dtype: str = "float32"
    seed: int = 0


class _Init:
    """Seeded normal(0, 0.02) initialiser so every replica of the toy starts from the same weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def normal(self, *shape: int) -> Parameter:
        return Parameter(Tensor(self.rng.normal(0.0, 0.02, shape).astype(np.float32)))

    @staticmethod
    def const(value: float, *shape: int) -> Parameter:
        return Parameter(Tensor(np.full(shape, value, np.float32)))


class Linear(nn.Cell):
    """y = x W^T + b with torch's (out, in) weight layout, computed in the input's dtype."""

    def __init__(self, init: _Init, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = init.normal(d_out, d_in)
        self.bias = init.const(0.0, d_out) if bias else None

    def construct(self, x):
        y = ops.matmul(x, ops.cast(self.weight, x.dtype).swapaxes(0, 1))
        if self.bias is not None:
            y = y + ops.cast(self.bias, x.dtype)
        return y


class LayerNorm(nn.Cell):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = _Init.const(1.0, dim)
        self.bias = _Init.const(0.0, dim)
        self.eps = eps

    def construct(self, x):
        h = ops.cast(x, ms.float32)
        mean = h.mean(-1, keep_dims=True)
        var = ((h - mean) ** 2).mean(-1, keep_dims=True)
        h = (h - mean) / ops.sqrt(var + self.eps) * self.weight + self.bias
        return ops.cast(h, x.dtype)


class RMSNorm(nn.Cell):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = _Init.const(1.0, dim)
        self.eps = eps

    def construct(self, x):
        h = ops.cast(x, ms.float32)
        h = h * ops.rsqrt((h * h).mean(-1, keep_dims=True) + self.eps) * self.weight
        return ops.cast(h, x.dtype)


def _attend(q, k, v, mask, heads: int):
    """Multi-head attention over (S, D) or (B, S, D) with an additive mask broadcast to the scores."""
    *lead, seq, dim = q.shape
    head_dim = dim // heads
    shape = tuple(lead) + (seq, heads, head_dim)
    q, k, v = (t.reshape(shape).swapaxes(-2, -3) for t in (q, k, v))
    scores = ops.matmul(q, k.swapaxes(-1, -2)) / float(np.sqrt(head_dim))
    probs = ops.softmax(ops.cast(scores, ms.float32) + mask, -1)
    out = ops.matmul(ops.cast(probs, v.dtype), v)
    return out.swapaxes(-2, -3).reshape(tuple(lead) + (seq, dim))


class VisionAttention(nn.Cell):
    def __init__(self, init: _Init, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv = Linear(init, dim, 3 * dim)
        self.proj = Linear(init, dim, dim)
        self.heads = heads

    def construct(self, x, mask):
        q, k, v = ops.split(self.qkv(x), x.shape[-1], -1)
        return self.proj(_attend(q, k, v, mask, self.heads))


class VisionMlp(nn.Cell):
    def __init__(self, init: _Init, dim: int) -> None:
        super().__init__()
        self.fc1 = Linear(init, dim, 2 * dim)
        self.fc2 = Linear(init, 2 * dim, dim)

    def construct(self, x):
        return self.fc2(ops.gelu(self.fc1(x)))


class VisionBlock(nn.Cell):
    def __init__(self, init: _Init, cfg: ToyConfig) -> None:
        super().__init__()
        norm = RMSNorm if cfg.vision_rmsnorm else LayerNorm
        self.norm1 = norm(cfg.vision_hidden)
        self.norm2 = norm(cfg.vision_hidden)
        self.attn = VisionAttention(init, cfg.vision_hidden, 2)
        self.mlp = VisionMlp(init, cfg.vision_hidden)

    def construct(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Cell):
    def __init__(self, init: _Init, cfg: ToyConfig) -> None:
        super().__init__()
        self.proj = Linear(init, cfg.patch_dim, cfg.vision_hidden, bias=False)

    def construct(self, x):
        return self.proj(x)


class PatchMerger(nn.Cell):
    """ln_q, then 2x2 neighbouring patches concatenated, then a 2-layer MLP (Qwen2/2.5 layout)."""

    def __init__(self, init: _Init, cfg: ToyConfig) -> None:
        super().__init__()
        merged = cfg.vision_hidden * cfg.merge_size**2
        self.merged = merged
        self.ln_q = RMSNorm(cfg.vision_hidden) if cfg.vision_rmsnorm else LayerNorm(cfg.vision_hidden)
        self.mlp = nn.CellList([Linear(init, merged, merged), nn.GELU(approximate=False), Linear(init, merged, cfg.hidden_size)])

    def construct(self, x):
        h = self.ln_q(x).reshape(-1, self.merged)
        return self.mlp[2](self.mlp[1](self.mlp[0](h)))


class DeepstackMerger(nn.Cell):
    """Qwen3 deepstack merger: patches merged first, then norm and MLP."""

    def __init__(self, init: _Init, cfg: ToyConfig) -> None:
        super().__init__()
        merged = cfg.vision_hidden * cfg.merge_size**2
        self.merged = merged
        self.norm = LayerNorm(merged)
        self.linear_fc1 = Linear(init, merged, merged)
        self.linear_fc2 = Linear(init, merged, cfg.hidden_size)

    def construct(self, x):
        return self.linear_fc2(ops.gelu(self.linear_fc1(self.norm(x.reshape(-1, self.merged)))))


class VisionTower(nn.Cell):
    def __init__(self, init: _Init, cfg: ToyConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(init, cfg)
        self.blocks = nn.CellList([VisionBlock(init, cfg) for _ in range(cfg.vision_depth)])
        self.merger = PatchMerger(init, cfg)
        self.deepstack_merger_list = nn.CellList([DeepstackMerger(init, cfg)]) if cfg.deepstack else None

    def construct(self, pixel_values, vision_mask):
        x = self.patch_embed(pixel_values)
        deepstack = None
        for index, block in enumerate(self.blocks):
            x = block(x, vision_mask)
            if index == 0 and self.deepstack_merger_list is not None:
                deepstack = self.deepstack_merger_list[0](x)
        return self.merger(x), deepstack


class Embedding(nn.Cell):
    def __init__(self, init: _Init, vocab: int, dim: int) -> None:
        super().__init__()
        self.weight = init.normal(vocab, dim)

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class TextAttention(nn.Cell):
    def __init__(self, init: _Init, cfg: ToyConfig) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.q_proj = Linear(init, dim, dim)
        self.k_proj = Linear(init, dim, dim)
        self.v_proj = Linear(init, dim, dim)
        self.o_proj = Linear(init, dim, dim, bias=False)
        self.heads = cfg.num_heads

    def construct(self, x, mask):
        return self.o_proj(_attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), mask, self.heads))


class TextMlp(nn.Cell):
    def __init__(self, init: _Init, cfg: ToyConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(init, cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(init, cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(init, cfg.intermediate_size, cfg.hidden_size, bias=False)

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Cell):
    def __init__(self, init: _Init, cfg: ToyConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size)
        self.self_attn = TextAttention(init, cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size)
        self.mlp = TextMlp(init, cfg)

    def construct(self, x, mask):
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Cell):
    def __init__(self, init: _Init, cfg: ToyConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(init, cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.CellList([DecoderLayer(init, cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size)


class ToyVLModel(nn.Cell):
    """`model.visual`, `model.language_model`; this outer cell is the `...ForConditionalGeneration`."""

    def __init__(self, init: _Init, cfg: ToyConfig) -> None:
        super().__init__()
        self.visual = VisionTower(init, cfg)
        self.language_model = LanguageModel(init, cfg)


class ToyVLForConditionalGeneration(nn.Cell):
    def __init__(self, cfg: ToyConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = cfg or ToyConfig(**overrides)
        self.config = cfg
        init = _Init(cfg.seed)
        self.model = ToyVLModel(init, cfg)
        self.lm_head = Linear(init, cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        self.compute_dtype = DTYPES[cfg.dtype]

    def prepare_inputs(self, batch: dict[str, np.ndarray | None]) -> dict[str, Tensor]:
        """Host-side masks and scatter indices, so the compiled step has no data-dependent control flow."""
        input_ids = np.asarray(batch["input_ids"])
        bsz, length = input_ids.shape
        inputs = {
            "input_ids": Tensor(input_ids.astype(np.int32)),
            "labels": Tensor(np.asarray(batch["labels"]).astype(np.int32)),
            "attention_mask": Tensor(self._text_mask(batch, bsz, length)),
        }
        grids = [g for g in (batch.get("image_grid_thw"), batch.get("video_grid_thw")) if g is not None]
        pixels = [p for p in (batch.get("pixel_values"), batch.get("pixel_values_videos")) if p is not None]
        if not pixels:
            return inputs
        grid = np.concatenate(grids).astype(np.int64)
        sizes = grid.prod(-1)
        owner = np.repeat(np.arange(len(sizes)), sizes)
        vision_mask = np.where(owner[:, None] == owner[None, :], 0.0, NEG_INF).astype(np.float32)
        image_pos = (input_ids == self.config.image_token_id).reshape(-1)
        video_pos = (input_ids == self.config.video_token_id).reshape(-1)
        n_image = int(image_pos.sum())
        index = np.zeros(bsz * length, np.int32)
        index[image_pos] = np.arange(n_image)
        index[video_pos] = n_image + np.arange(int(video_pos.sum()))
        if n_image + int(video_pos.sum()) != int(sizes.sum()) // self.config.merge_size**2:
            raise ValueError("vision tokens in input_ids do not match the merged patch count")
        inputs.update(
            pixel_values=Tensor(np.concatenate(pixels).astype(np.float32)),
            vision_mask=Tensor(vision_mask),
            vision_index=Tensor(index.reshape(bsz, length)),
            vision_slots=Tensor((image_pos | video_pos).reshape(bsz, length, 1).astype(np.float32)),
        )
        return inputs

    @staticmethod
    def _text_mask(batch: dict[str, np.ndarray | None], bsz: int, length: int) -> np.ndarray:
        """Additive (B, 1, L, L) mask: causal, keys inside the sample's segment and not padding."""
        allowed = np.tril(np.ones((length, length), bool))[None].repeat(bsz, 0)
        if batch.get("cu_seqlens") is not None:
            segment = np.searchsorted(np.asarray(batch["cu_seqlens"])[1:], np.arange(length), side="right")
            allowed &= (segment[:, None] == segment[None, :])[None]
        if batch.get("attention_mask") is not None:
            allowed &= np.asarray(batch["attention_mask"], bool)[:, None, :]
        return np.where(allowed, 0.0, NEG_INF).astype(np.float32)[:, None]

    def _hidden(self, input_ids, attention_mask, pixel_values, vision_mask, vision_index, vision_slots):
        lm = self.model.language_model
        x = ops.cast(lm.embed_tokens(input_ids), self.compute_dtype)
        deepstack = None
        if pixel_values is not None:
            feats, deep = self.model.visual(ops.cast(pixel_values, self.compute_dtype), vision_mask)
            slots = ops.cast(vision_slots, self.compute_dtype)
            x = x * (1 - slots) + ops.gather(feats, vision_index, 0) * slots
            if deep is not None:
                deepstack = ops.gather(deep, vision_index, 0) * slots
        for index, layer in enumerate(lm.layers):
            x = layer(x, attention_mask)
            if index == 0 and deepstack is not None:
                x = x + deepstack
        return lm.norm(x)

    def logits(self, input_ids, labels=None, attention_mask=None, pixel_values=None, vision_mask=None,
               vision_index=None, vision_slots=None):
        hidden = self._hidden(input_ids, attention_mask, pixel_values, vision_mask, vision_index, vision_slots)
        return ops.cast(self.lm_head(hidden), ms.float32)

    def construct(self, input_ids, labels, attention_mask, pixel_values=None, vision_mask=None,
                  vision_index=None, vision_slots=None):
        """(loss_sum, n_tokens): summed shifted cross-entropy over supervised positions and their count."""
        logits = self.logits(input_ids, labels, attention_mask, pixel_values, vision_mask, vision_index, vision_slots)
        target = labels[:, 1:]
        valid = ops.cast(target != IGNORE_INDEX, ms.float32)
        logp = ops.log_softmax(logits[:, :-1], -1)
        picked = ops.gather_elements(logp, -1, ops.maximum(target, 0).expand_dims(-1)).squeeze(-1)
        return -(picked * valid).sum(), valid.sum()
