"""Data-parallel training of the toy model, launched by msrun (or run in-process as a world of one).

`msrun --worker_num=2 ... python tests/dp_worker.py OUT` trains on each rank's share of fixed global
batches and writes `OUT/<optim>-rank<r>.npz` (final weights plus per-step losses and gradient norms);
a world of one trains on the whole global batches, which the test compares against.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mindspore as ms  # noqa: E402

from qwenvl.train.distributed import DataParallel, init_distributed  # noqa: E402
from qwenvl.train.optimizer import build_optimizer  # noqa: E402
from qwenvl.train.param_groups import build_param_groups  # noqa: E402
from qwenvl.train.train_step import TrainStep  # noqa: E402
from tests.toy_batches import CFG, collate, samples  # noqa: E402
from tests.toy_model import ToyVLForConditionalGeneration  # noqa: E402

OPTIMS = ("adamw_mindspore", "adamw_zero1_mindspore")
STEPS = 3
# four samples per global batch, with different supervised-token counts
SHAPES = ((9, 2), (6, 5), (12, 8), (7, 3))


def _args(optim: str) -> SimpleNamespace:
    return SimpleNamespace(
        optim=optim, learning_rate=1e-3, mm_projector_lr=None, vision_tower_lr=None, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-6, max_grad_norm=1.0, fp16=False,
    )


def train(dp: DataParallel, optim: str) -> dict[str, np.ndarray]:
    """Final weights (by name) and `_loss`/`_grad_norm` per step, after STEPS steps on this rank's share."""
    model = ToyVLForConditionalGeneration(CFG)
    args = _args(optim)
    optimizer = build_optimizer(build_param_groups(model, args), args, dp)
    step = TrainStep(model, optimizer, args, dp)
    losses, norms = [], []
    for index in range(STEPS):
        mine = samples(100 + index, SHAPES)[dp.rank :: dp.world_size]
        metrics = step.run([model.prepare_inputs(collate([s])) for s in mine], 1.0)
        assert not metrics.skipped, metrics
        losses.append(metrics.loss)
        norms.append(metrics.grad_norm)
    out = {name: p.asnumpy() for name, p in model.parameters_and_names()}
    out["_loss"], out["_grad_norm"] = np.asarray(losses), np.asarray(norms)
    return out


def main(out_dir: str) -> None:
    ms.set_device("CPU")
    dp = init_distributed()
    if dp.world_size != 2:
        raise SystemExit(f"expected a world of 2 under msrun, got {dp.world_size}")
    for optim in OPTIMS:
        np.savez(Path(out_dir) / f"{optim}-rank{dp.rank}.npz", **train(dp, optim))


if __name__ == "__main__":
    main(sys.argv[1])
