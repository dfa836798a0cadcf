"""Model FLOPs of a train step and MFU (model FLOPs utilisation), as nanoGPT and torchtitan log them.

FLOPs of a step = sum over the model's parts (vision tower, merger, language model, lm_head) of

    factor * N_part * tokens_through_part  +  attention_factor * 4 * width * sum(segment_length ** 2) per layer

- N_part: parameters a token meets in that part. Embedding lookups (`embed_tokens`, Qwen3's `pos_embed`)
  do no matmul and are left out; lm_head is counted (also when tied to the embedding). MoE experts count
  with top_k / num_experts of their parameters (the active experts; the CPU path computes every expert,
  model FLOPs do not count that).
- factor (our decision): 6 for trainable parameters (forward 2, input gradient 2, weight gradient 2);
  4 for frozen parameters the backward pass goes through (LoRA base weights, a frozen LLM under a trained
  vision tower: no weight gradient); 2 for frozen parts before the first trainable part (a frozen vision
  tower under a trained merger: forward only). "Goes through" is decided per part in the order
  vision -> merger -> llm -> lm_head: a part is backpropagated when it or an earlier part trains.
- tokens: vision tower = patches (padded count, as computed), merger = patches / merge**2, language model
  and lm_head = every position of the (B, L) batch, padding included (it is computed).
- attention (torchtitan's 12 * layers * width * seq_len per token, i.e. forward 4 * width * seq_len, x3 with
  backward; x1 in a forward-only part): seq_len is the length of each attention segment (a row, a packed
  sample, an image frame, a Qwen2.5-VL window), so the term is 4 * width * sum(len**2) per layer; like
  torchtitan it does not halve causal attention.

MFU = FLOPs / seconds / peak FLOP/s of one device, on the main rank's own micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

PART_ORDER = ("vision", "merger", "llm", "lm_head")
_LOOKUPS = ("embed_tokens.weight", "pos_embed.weight")

# Dense fp16/bf16 peak TFLOP/s per device by `mindspore.hal.get_device_name()`. 910B2C: derived from CANN's
# platform config Ascend910B2C.ini (24 cube cores x 16x16x16 MACs x 2 FLOPs x 1.8 GHz = 353.9); the others are
# the figures commonly quoted for the 910B variants (910B3 313, 910B4 280 as on ai.gitee.com's Ascend 910B
# page). Pass --peak_tflops for a device not listed or a figure you trust more.
PEAK_TFLOPS = {
    "Ascend910B1": 414.0,
    "Ascend910B2": 376.0,
    "Ascend910B2C": 353.9,
    "Ascend910B3": 313.0,
    "Ascend910B4": 280.0,
}


@dataclass
class PartCost:
    """What one part of the model costs per token it processes."""

    trainable: float = 0.0  # trainable parameters a token meets (MoE: active share)
    frozen: float = 0.0
    attention: list[tuple[int, str]] = field(default_factory=list)  # (width, segments input) per attention layer


def matmul_factor(trainable: bool, backpropagated: bool) -> int:
    """FLOPs per parameter per token: 6 trained, 4 frozen with a backward through it, 2 forward only."""
    return 6 if trainable else 4 if backpropagated else 2


def segment_square_sum(segments: np.ndarray) -> int:
    """sum(len**2) over the runs of equal ids in each row of `segments` (padding runs included)."""
    seg = np.asarray(segments)
    seg = seg.reshape(-1, seg.shape[-1])
    starts = np.ones(seg.shape, bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    bounds = np.append(np.flatnonzero(starts.reshape(-1)), seg.size)
    return int((np.diff(bounds) ** 2).sum())


def step_flops(costs: Mapping[str, PartCost], tokens: Mapping[str, int], square_sums: Mapping[str, int]) -> float:
    """FLOPs of one forward + backward over a micro-batch: `tokens[part]` tokens through each part,
    `square_sums[name]` the sum(len**2) of the segments input `name` used by attention layers."""
    total, backpropagated = 0.0, False
    for part in PART_ORDER:
        cost = costs.get(part)
        if cost is None or not tokens.get(part):
            continue
        backpropagated = backpropagated or cost.trainable > 0
        total += 6 * cost.trainable * tokens[part]
        total += matmul_factor(False, backpropagated) * cost.frozen * tokens[part]
        attention_factor = 3 if backpropagated else 1
        total += sum(attention_factor * 4 * width * square_sums[name] for width, name in cost.attention)
    return total


def _part(name: str) -> str | None:
    from qwenvl.train.freezing import model_part

    try:
        return model_part(name)
    except ValueError:
        return None


def _expert_shares(model) -> dict[str, float]:
    """Parameter-name prefix of each MoE expert block -> the share of its experts a token uses."""
    shares = {}
    for name, cell in model.cells_and_names():
        experts = getattr(cell, "experts", None)
        if hasattr(cell, "top_k") and hasattr(experts, "num_experts"):
            shares[f"{name}.experts."] = cell.top_k / experts.num_experts
    return shares


def _full_shapes(model) -> dict[str, tuple[int, ...]]:
    """Whole shapes of ZeRO-3 sharded weights (their Parameters hold a 1-D chunk), by parameter name."""
    sharded = getattr(model, "zero3", None)
    return {name: tuple(spec.shape) for name, spec in sharded.specs.items()} if sharded else {}


def model_costs(model) -> dict[str, PartCost] | None:
    """Per-part costs of a Qwen-VL model (None for a model whose parameters are not Qwen-VL parts)."""
    costs = {part: PartCost() for part in PART_ORDER}
    full = _full_shapes(model)
    shares = _expert_shares(model)
    windowed = tuple(getattr(getattr(model.model, "visual", None), "windowed", ()))
    vision_layer = 0
    for name, param in model.parameters_and_names():
        part = _part(name)
        if part is None:
            return None
        if name.endswith(_LOOKUPS):
            continue
        shape = full.get(param.name, tuple(param.shape))
        size = float(np.prod(shape)) * next((s for prefix, s in shares.items() if name.startswith(prefix)), 1.0)
        if param.requires_grad:
            costs[part].trainable += size
        else:
            costs[part].frozen += size
        if name.endswith("self_attn.q_proj.weight"):
            costs[part].attention.append((int(shape[0]), "text_segments"))
        elif part == "vision" and name.endswith("attn.qkv.weight"):
            window = vision_layer < len(windowed) and windowed[vision_layer]
            costs[part].attention.append((int(shape[0]) // 3, "vision_window_segments" if window else
                                          "vision_full_segments"))  # fmt: skip
            vision_layer += 1
    head = model.lm_head.weight
    if costs["lm_head"].trainable + costs["lm_head"].frozen == 0:  # tied: listed under the embedding's name
        size = float(np.prod(full.get(head.name, tuple(head.shape))))
        costs["lm_head"] = PartCost(size, 0.0) if head.requires_grad else PartCost(0.0, size)
    return costs


def _merge(model) -> int:
    return int(getattr(model, "merge", None) or getattr(model.config, "merge_size", 1))


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape)


def batch_workload(model, inputs: Mapping) -> tuple[dict[str, int], dict[str, int]]:
    """(tokens per part, sum(len**2) per segments input) of one micro-batch of `model.prepare_inputs`.

    Without segment ids (one sequence per row, or a dense-mask model) a row or the whole patch set is one
    segment. Qwen3-VL's `vision_segments` stand for its (all full-attention) vision layers."""
    bsz, length = _shape(inputs["input_ids"])
    text = bsz * length
    tokens = {"llm": text, "lm_head": text}
    sums = {"text_segments": bsz * length**2}
    if inputs.get("text_segments") is not None:
        sums["text_segments"] = segment_square_sum(inputs["text_segments"].asnumpy())
    pixels = inputs.get("pixel_values")
    if pixels is not None:
        patches = _shape(pixels)[0]
        tokens.update(vision=patches, merger=patches // _merge(model) ** 2)
        full = inputs.get("vision_full_segments", inputs.get("vision_segments"))
        sums["vision_full_segments"] = patches**2 if full is None else segment_square_sum(full.asnumpy())
        window = inputs.get("vision_window_segments")
        sums["vision_window_segments"] = sums["vision_full_segments"] if window is None else \
            segment_square_sum(window.asnumpy())  # fmt: skip
    return tokens, sums


def peak_flops(override_tflops: float | None, device: str, device_name: str | None = None) -> float | None:
    """Peak FLOP/s of one device: --peak_tflops, else the table by device name; None (no MFU) when unknown.

    On CPU nothing is measured: a CPU's peak depends on its vector units, threads and dtype, and a timed matmul
    at start-up would be noisy on a shared host and slow every run; pass --peak_tflops to get MFU there."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device == "CPU" or not device_name:
        return None
    tflops = PEAK_TFLOPS.get(device_name)
    return tflops * 1e12 if tflops else None


def device_peak_flops(override_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s or None, where the figure comes from) for the device this process runs on."""
    import mindspore as ms

    device = ms.get_context("device_target")
    name = None
    if device != "CPU" and not override_tflops:
        try:
            name = ms.hal.get_device_name(0, device)
        except (RuntimeError, ValueError):
            name = None
    peak = peak_flops(override_tflops, device, name)
    if override_tflops:
        return peak, f"--peak_tflops {override_tflops:g}"
    if peak is None:
        return None, f"no peak FLOP/s known for {name or device}: pass --peak_tflops for MFU"
    return peak, f"{name} table value {peak / 1e12:g} TFLOP/s"
