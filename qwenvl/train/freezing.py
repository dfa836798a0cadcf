"""Which parts of the model train: upstream's `tune_mm_vision` / `tune_mm_mlp` / `tune_mm_llm` flags.

Precedence is upstream's `set_model` order: the vision tower follows `tune_mm_vision`, then the merger
follows `tune_mm_mlp` (overriding the tower flag for it), then the language model follows `tune_mm_llm`.
Two deliberate fixes: `lm_head` follows `tune_mm_llm` (upstream set a Module attribute and left an
untied lm_head trainable), and Qwen3's `deepstack_merger_list` follows the merger flag (it projects
vision features into the LLM like the merger; upstream left it with the tower flag).
"""

from __future__ import annotations

from mindspore import nn

PARTS = ("vision", "merger", "llm", "lm_head")
_MERGER_PREFIXES = ("model.visual.merger.", "model.visual.deepstack_merger_list.")


def model_part(name: str) -> str:
    """The part ("vision", "merger", "llm", "lm_head") a transformers-style parameter name belongs to."""
    if name.startswith(_MERGER_PREFIXES):
        return "merger"
    if name.startswith("model.visual."):
        return "vision"
    if name.startswith("model.language_model."):
        return "llm"
    if name.startswith("lm_head."):
        return "lm_head"
    raise ValueError(f"parameter {name!r} is in no known part of a Qwen-VL model {PARTS}")


def apply_tuning_flags(model: nn.Cell, model_args) -> dict[str, int]:
    """Set `requires_grad` from the flags; returns trainable element counts per part.

    A tied lm_head is the embedding Parameter and is listed once, under the language model.
    """
    wanted = {
        "vision": model_args.tune_mm_vision,
        "merger": model_args.tune_mm_mlp,
        "llm": model_args.tune_mm_llm,
        "lm_head": model_args.tune_mm_llm,
    }
    counts = dict.fromkeys(PARTS, 0)
    for name, param in model.parameters_and_names():
        part = model_part(name)
        param.requires_grad = bool(wanted[part])
        if param.requires_grad:
            counts[part] += int(param.size)
    return counts
