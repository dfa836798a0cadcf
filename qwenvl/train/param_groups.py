"""Optimizer parameter groups: upstream's decay split crossed with the merger and vision-tower LRs.

Decay rule (transformers 4.57 `Trainer.get_decay_parameter_names`, used by upstream's 3-era trainer):
no decay for parameters inside a LayerNorm cell and for names matching `bias`, `layernorm`, `rmsnorm`,
`(^|.)norm(.|$)` or `_norm(.|$)`. RMSNorm weights with other names (Qwen2.5's vision `norm1`/`norm2`
and `merger.ln_q`) are therefore decayed, exactly as upstream. A cell counts as a LayerNorm when its
class name contains "LayerNorm" (the native models' convention; RMSNorm classes must not).

LR rule (upstream `create_optimizer`): names containing "merger" (deepstack mergers included) use
`mm_projector_lr` when it is set and non-zero; then, only in that case, other names containing "visual"
use `vision_tower_lr` when it is set and non-zero; everything else uses `learning_rate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mindspore import Parameter, nn

_NO_DECAY_PATTERNS = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]


@dataclass
class ParamGroup:
    name: str
    params: list[Parameter] = field(repr=False)
    lr: float
    weight_decay: float

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]


def _layer_norm_prefixes(model: nn.Cell) -> list[str]:
    return [f"{name}." for name, cell in model.cells_and_names() if name and "LayerNorm" in type(cell).__name__]


def decay_parameter_names(model: nn.Cell) -> set[str]:
    """Names of the parameters weight decay applies to (trainable or not)."""
    layer_norms = tuple(_layer_norm_prefixes(model))
    return {
        name
        for name, _ in model.parameters_and_names()
        if not (layer_norms and name.startswith(layer_norms))
        and not any(p.search(name.lower()) for p in _NO_DECAY_PATTERNS)
    }


def _lr_bucket(name: str, split_merger: bool, split_vision: bool) -> str:
    if split_merger and "merger" in name:
        return "merger"
    if split_vision and "visual" in name:
        return "vision"
    return "base"


def build_param_groups(model: nn.Cell, args) -> list[ParamGroup]:
    """Groups of trainable parameters in upstream's order, empty groups dropped."""
    split_merger = bool(args.mm_projector_lr)
    split_vision = split_merger and bool(args.vision_tower_lr)
    lrs = {"base": args.learning_rate, "vision": args.vision_tower_lr, "merger": args.mm_projector_lr}
    order = [("base", True), ("vision", True), ("base", False), ("vision", False), ("merger", True), ("merger", False)]
    buckets: dict[tuple[str, bool], list[Parameter]] = {key: [] for key in order}
    decay = decay_parameter_names(model)
    for name, param in model.parameters_and_names():
        if param.requires_grad:
            buckets[(_lr_bucket(name, split_merger, split_vision), name in decay)].append(param)
    groups = [
        ParamGroup(
            name=f"{bucket}_{'decay' if decays else 'no_decay'}",
            params=buckets[(bucket, decays)],
            lr=float(lrs[bucket]),
            weight_decay=float(args.weight_decay) if decays else 0.0,
        )
        for bucket, decays in order
        if buckets[(bucket, decays)]
    ]
    if not groups:
        raise ValueError("no trainable parameters: set at least one of --tune_mm_llm, --tune_mm_mlp, --tune_mm_vision")
    return groups
