"""Learning-rate schedules as a multiplier on each group's base LR (Hugging Face's formulas).

Every parameter group follows the same warmup and decay: HF's LambdaLR scales each group's initial
LR by one factor. (mindone gave float-LR groups a constant LR, with no warmup or decay.)
"""

from __future__ import annotations

import json
import math

from qwenvl.errors import FlagError
from qwenvl.train.argument import SCHEDULERS

# The `--lr_scheduler_kwargs` keys each schedule takes (as HF's scheduler functions do).
SCHEDULE_OPTIONS = {"cosine": ("num_cycles",), "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate")}


def warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int = 0) -> int:
    """HF rule: explicit steps win, otherwise ceil(ratio * total)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(total_steps * warmup_ratio)


def schedule_options(kind: str, kwargs: str | dict, learning_rate: float) -> dict[str, float]:
    """`--lr_scheduler_kwargs` (JSON text or dict) checked for `kind` -> `lr_factor` keyword arguments.

    As HF: cosine_with_min_lr needs exactly one of `min_lr` (absolute, divided by the base learning
    rate) or `min_lr_rate` (a fraction of each group's LR); `num_cycles` defaults to 0.5 (one half wave).
    """
    try:
        options = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs)
    except json.JSONDecodeError as exc:
        raise FlagError(f"--lr_scheduler_kwargs {kwargs!r} is not JSON: {exc.msg}") from exc
    if not isinstance(options, dict):
        raise FlagError(f"--lr_scheduler_kwargs must be a JSON object, got {kwargs!r}")
    allowed = SCHEDULE_OPTIONS.get(kind, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FlagError(f"--lr_scheduler_kwargs {', '.join(unknown)} not used by --lr_scheduler_type {kind} "
                         f"(it takes: {', '.join(allowed) or 'nothing'})")  # fmt: skip
    result = {"num_cycles": float(options["num_cycles"])} if "num_cycles" in options else {}
    if kind == "cosine_with_min_lr":
        if ("min_lr" in options) == ("min_lr_rate" in options):
            raise FlagError("--lr_scheduler_type cosine_with_min_lr needs one of min_lr or min_lr_rate in "
                             "--lr_scheduler_kwargs, e.g. '{\"min_lr_rate\": 0.1}'")  # fmt: skip
        rate = options["min_lr"] / learning_rate if "min_lr" in options else options["min_lr_rate"]
        result["min_lr_rate"] = float(rate)
    return result


def lr_factor(
    kind: str, step: int, total_steps: int, warmup: int, num_cycles: float = 0.5, min_lr_rate: float = 0.0
) -> float:
    """Multiplier for the LR used by optimizer step `step` (0-based), as HF's `get_scheduler` gives.

    cosine_with_min_lr is cosine scaled into [min_lr_rate, 1] after warmup."""
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
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    if kind == "cosine_with_min_lr":
        factor = factor * (1.0 - min_lr_rate) + min_lr_rate
    return max(0.0, factor)
