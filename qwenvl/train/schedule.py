"""Learning-rate schedules as a multiplier on each group's base LR (Hugging Face's formulas).

Every parameter group follows the same warmup and decay: HF's LambdaLR scales each group's initial
LR by one factor. (mindone gave float-LR groups a constant LR, with no warmup or decay.)
"""

from __future__ import annotations

import math

from qwenvl.train.argument import SCHEDULERS


def warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int = 0) -> int:
    """HF rule: explicit steps win, otherwise ceil(ratio * total)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)


def lr_factor(kind: str, step: int, total_steps: int, warmup: int) -> float:
    """Multiplier for the LR used by optimizer step `step` (0-based), as HF's `get_scheduler` gives."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler_type {kind!r}; expected one of {SCHEDULERS}")
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
