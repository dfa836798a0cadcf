"""Every parameter a Qwen-VL model holds, from its Hugging Face config alone (no MindSpore, no weights).

The list mirrors how `qwenvl.model` builds the four families (names, shapes, which layer reads a weight
through a `WeightSource`, i.e. what ZeRO-3 may shard), so a memory plan can be made on a login node for
a model that is not on disk. `tests/test_estimate_memory.py` checks it against `build_model` name by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from qwenvl.train.freezing import model_part

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


@dataclass(frozen=True)
class ParamInfo:
    """One parameter: `matrix` when a layer reads it through a weight source (Linear, Embedding, patch
    projection, fused MoE experts: what ZeRO-3 shards above its threshold); `group` is the layer it belongs to
    (gathered together)."""

    name: str
    shape: tuple[int, ...]
    matrix: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def part(self) -> str:
        return model_part(self.name)

    @property
    def group(self) -> str:
        """The decoder layer / vision block / top-level module whose weights are used together."""
        parts = self.name.split(".")
        for i, word in enumerate(parts):
            if word in ("layers", "blocks", "deepstack_merger_list"):
                return ".".join(parts[: i + 2])
        return ".".join(parts[:-1])


def _linear(prefix: str, d_in: int, d_out: int, bias: bool = True) -> list[ParamInfo]:
    out = [ParamInfo(f"{prefix}.weight", (d_out, d_in), matrix=True)]
    return out + [ParamInfo(f"{prefix}.bias", (d_out,))] if bias else out


def _norm(prefix: str, dim: int, bias: bool) -> list[ParamInfo]:
    out = [ParamInfo(f"{prefix}.weight", (dim,))]
    return out + [ParamInfo(f"{prefix}.bias", (dim,))] if bias else out


def _qwen2_text(config: dict) -> dict:
    return {"tie_word_embeddings": False, **config, **(config.get("text_config") or {})}


def _qwen3_text(config: dict, default_head_dim: int | None) -> dict:
    text = {"attention_bias": False, "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": None,
            "num_experts": 0, "head_dim": default_head_dim, **(config.get("text_config") or {})}  # fmt: skip
    if text["head_dim"] is None:
        text["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    return text


def text_settings(config: dict) -> dict:
    """The text-model fields the model reads (HF's text_config or flat layout, the family's defaults)."""
    model_type = config.get("model_type")
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        text = _qwen2_text(config)
        return {**text, "head_dim": text["hidden_size"] // text["num_attention_heads"], "num_experts": 0}
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):
        return _qwen3_text(config, 128 if model_type == "qwen3_vl" else None)
    raise ValueError(f"model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")


def vision_settings(config: dict) -> dict:
    """The vision-tower fields: width, MLP width, depth, heads, patch and merge sizes, MLP kind."""
    vision = {"in_channels": 3, "temporal_patch_size": 2, "spatial_merge_size": 2, **config["vision_config"]}
    model_type = config["model_type"]
    if model_type == "qwen2_vl":
        dim = vision["embed_dim"]
        return {**vision, "dim": dim, "mlp": dim * vision["mlp_ratio"], "gated": False, "norm_bias": True,
                "patch_size": vision.get("patch_size", 14), "out": vision["hidden_size"]}  # fmt: skip
    if model_type == "qwen2_5_vl":
        return {**vision, "dim": vision["hidden_size"], "mlp": vision["intermediate_size"], "gated": True,
                "norm_bias": False, "patch_size": vision.get("patch_size", 14),
                "out": vision["out_hidden_size"]}  # fmt: skip
    return {"num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24], **vision,
            "dim": vision["hidden_size"], "mlp": vision["intermediate_size"], "gated": False, "norm_bias": True,
            "patch_size": vision.get("patch_size", 16), "out": vision["out_hidden_size"]}  # fmt: skip


def _vision(config: dict) -> list[ParamInfo]:
    v = vision_settings(config)
    dim, merged, qwen3 = v["dim"], v["dim"] * v["spatial_merge_size"] ** 2, config["model_type"].startswith("qwen3")
    prefix = "model.visual"
    out = [ParamInfo(f"{prefix}.patch_embed.proj.weight",
                     (dim, v["in_channels"], v["temporal_patch_size"], v["patch_size"], v["patch_size"]), matrix=True)]
    if qwen3:
        out += [ParamInfo(f"{prefix}.patch_embed.proj.bias", (dim,)),
                ParamInfo(f"{prefix}.pos_embed.weight", (v["num_position_embeddings"], dim), matrix=True)]
    for i in range(v["depth"]):
        block = f"{prefix}.blocks.{i}"
        out += _norm(f"{block}.norm1", dim, v["norm_bias"]) + _norm(f"{block}.norm2", dim, v["norm_bias"])
        out += _linear(f"{block}.attn.qkv", dim, 3 * dim) + _linear(f"{block}.attn.proj", dim, dim)
        if v["gated"]:
            out += (_linear(f"{block}.mlp.gate_proj", dim, v["mlp"]) + _linear(f"{block}.mlp.up_proj", dim, v["mlp"])
                    + _linear(f"{block}.mlp.down_proj", v["mlp"], dim))  # fmt: skip
        else:
            fc1, fc2 = ("linear_fc1", "linear_fc2") if qwen3 else ("fc1", "fc2")
            out += _linear(f"{block}.mlp.{fc1}", dim, v["mlp"]) + _linear(f"{block}.mlp.{fc2}", v["mlp"], dim)
    if qwen3:
        mergers = [(f"{prefix}.merger", dim)]
        mergers += [(f"{prefix}.deepstack_merger_list.{j}", merged) for j in range(len(v["deepstack_visual_indexes"]))]
        for name, norm_dim in mergers:
            out += _norm(f"{name}.norm", norm_dim, True)
            out += _linear(f"{name}.linear_fc1", merged, merged) + _linear(f"{name}.linear_fc2", merged, v["out"])
    else:
        out += _norm(f"{prefix}.merger.ln_q", dim, v["norm_bias"])
        out += _linear(f"{prefix}.merger.mlp.0", merged, merged) + _linear(f"{prefix}.merger.mlp.2", merged, v["out"])
    return out


def _is_sparse(text: dict, index: int) -> bool:
    return (text["num_experts"] > 0 and index not in (text.get("mlp_only_layers") or [])
            and (index + 1) % text.get("decoder_sparse_step", 1) == 0)  # fmt: skip


def _language(config: dict) -> list[ParamInfo]:
    t = text_settings(config)
    qwen3 = config["model_type"].startswith("qwen3")
    h, hd, heads, kv = t["hidden_size"], t["head_dim"], t["num_attention_heads"], t["num_key_value_heads"]
    qkv_bias = t["attention_bias"] if qwen3 else True
    prefix = "model.language_model"
    out = [ParamInfo(f"{prefix}.embed_tokens.weight", (t["vocab_size"], h), matrix=True)]
    for i in range(t["num_hidden_layers"]):
        layer = f"{prefix}.layers.{i}"
        out += _norm(f"{layer}.input_layernorm", h, False)
        out += (_linear(f"{layer}.self_attn.q_proj", h, heads * hd, qkv_bias)
                + _linear(f"{layer}.self_attn.k_proj", h, kv * hd, qkv_bias)
                + _linear(f"{layer}.self_attn.v_proj", h, kv * hd, qkv_bias)
                + _linear(f"{layer}.self_attn.o_proj", heads * hd, h, qkv_bias and qwen3))  # fmt: skip
        if qwen3:
            out += _norm(f"{layer}.self_attn.q_norm", hd, False) + _norm(f"{layer}.self_attn.k_norm", hd, False)
        out += _norm(f"{layer}.post_attention_layernorm", h, False)
        if _is_sparse(t, i):
            experts, inter = t["num_experts"], t["moe_intermediate_size"]
            out += _linear(f"{layer}.mlp.gate", h, experts, False)
            out += [ParamInfo(f"{layer}.mlp.experts.gate_up_proj", (experts, h, 2 * inter), matrix=True),
                    ParamInfo(f"{layer}.mlp.experts.down_proj", (experts, inter, h), matrix=True)]  # fmt: skip
        else:
            inter = t["intermediate_size"]
            for name, d_in, d_out in (("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)):
                out += _linear(f"{layer}.mlp.{name}", d_in, d_out, False)
    out += _norm(f"{prefix}.norm", h, False)
    if not t["tie_word_embeddings"]:
        out.append(ParamInfo("lm_head.weight", (t["vocab_size"], h), matrix=True))
    return out


def model_tensors(config: dict) -> list[ParamInfo]:
    """Every parameter of the model `qwenvl.model.build_model(config)` builds (a tied lm_head once)."""
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"model_type {config.get('model_type')!r} is not one of {', '.join(MODEL_TYPES)}")
    return _vision(config) + _language(config)


VISION_LORA_TARGETS = ("qkv", "proj")


def lora_tensors(tensors: Iterable[ParamInfo], r: int, targets: Iterable[str], vision: bool = False) -> list[ParamInfo]:
    """The adapters `qwenvl.model.lora.apply_lora` adds: lora_A (r, in) and lora_B (out, r) per targeted Linear."""
    targets = set(targets)
    out = []
    for info in tensors:
        module, _, leaf = info.name.rpartition(".")
        kind = module.rsplit(".", 1)[-1]
        in_llm = module.startswith("model.language_model.layers.") and kind in targets
        in_vision = vision and module.startswith("model.visual.blocks.") and kind in VISION_LORA_TARGETS
        if leaf == "weight" and info.matrix and (in_llm or in_vision):
            d_out, d_in = info.shape
            out += [ParamInfo(f"{module}.lora_A.weight", (r, d_in), matrix=True),
                    ParamInfo(f"{module}.lora_B.weight", (d_out, r), matrix=True)]  # fmt: skip
    return out
