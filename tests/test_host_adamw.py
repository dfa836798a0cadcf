"""The numpy AdamW of small CPU tensors (`qwenvl.train.host_adamw`) over several chunks against the float64
transcription of torch.optim.AdamW in test_optimizer, and its work space bounded by the chunk, not the model."""

from __future__ import annotations

import tracemalloc

import numpy as np
from mindspore import Parameter, Tensor

from qwenvl.train.host_adamw import HostAdamW
from tests.test_optimizer import BETAS, COEFS, EPS, LR_FACTORS, _torch_adamw

# three (lr, decay) groups whose tensors interleave, so chunks must regroup them; sizes 12..40 against a chunk of 30
SHAPES = {"a": (4, 3), "b": (5,), "c": (2, 10), "d": (40,), "e": (7,), "f": (3, 3), "g": (0,)}
GROUPS = [("g1", ["a", "d", "g"], 1e-2, 0.1), ("g2", ["b", "e"], 3e-3, 0.0), ("g3", ["c", "f"], 5e-3, 0.05)]


def _hyper(name: str) -> tuple[float, float]:
    return next((lr, wd) for _, names, lr, wd in GROUPS if name in names)


def _adamw(values: dict[str, np.ndarray], chunk: int) -> tuple[HostAdamW, list[Parameter]]:
    params = [Parameter(Tensor(value.copy()), name=name) for name, value in values.items()]
    hyper = [_hyper(p.name) for p in params]
    return HostAdamW(params, [h[0] for h in hyper], [h[1] for h in hyper], BETAS, EPS, chunk), params


def _bias_corrections(step: int) -> tuple[float, float]:
    return 1.0 - BETAS[0] ** step, (1.0 - BETAS[1] ** step) ** 0.5


def test_chunks_group_tensors_by_hyperparameters_and_update_like_torch():
    rng = np.random.default_rng(0)
    init = {name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in SHAPES.items()}
    grads = [{n: rng.normal(0, 1, s).astype(np.float32) for n, s in SHAPES.items()} for _ in LR_FACTORS]
    opt, params = _adamw(init, chunk=30)
    # every chunk is one group's tensors, at most 30 elements unless a single tensor is larger (d: 40)
    for part in opt.chunks:
        assert {_hyper(params[i].name) for i in part.members} == {(part.lr, part.weight_decay)}
        assert part.stop - part.start == sum(params[i].size for i in part.members)
        assert part.stop - part.start <= 30 or len(part.members) == 1
    assert len(opt.chunks) == 5 and opt._grad.size == 40
    assert sorted(i for part in opt.chunks for i in part.members) == list(range(len(SHAPES)))
    for step, (grad, factor, coef) in enumerate(zip(grads, LR_FACTORS, COEFS), start=1):
        opt.step([Tensor(grad[p.name]) for p in params], coef, factor, *_bias_corrections(step))
    want = _torch_adamw(init, grads, LR_FACTORS, COEFS, GROUPS)
    for index, p in enumerate(params):
        np.testing.assert_allclose(p.asnumpy(), want[p.name], rtol=0, atol=1e-6, err_msg=p.name)
        exp_avg, _ = opt.moments(index)
        assert exp_avg.shape == (p.size,)


def test_work_space_is_bounded_by_the_chunk_not_the_model():
    """100 tensors of 1,000 elements in chunks of 4,000: a step allocates (numpy, traced) under one chunk's worth of
    float32 per scratch-free temporary, far below the 400 KB one temporary of all the tensors would take."""
    rng = np.random.default_rng(1)
    values = {f"t{i}": rng.normal(0, 1, 1000).astype(np.float32) for i in range(100)}
    params = [Parameter(Tensor(v.copy()), name=n) for n, v in values.items()]
    opt = HostAdamW(params, [1e-3] * 100, [0.1] * 100, BETAS, EPS, chunk=4000)
    grads = [Tensor(rng.normal(0, 1, 1000).astype(np.float32)) for _ in params]
    opt.step(grads, 0.5, 1.0, *_bias_corrections(1))
    tracemalloc.start()
    try:
        opt.step(grads, 0.5, 1.0, *_bias_corrections(2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert opt._grad.size == 4000
    assert peak < 4000 * 4 * 2, peak
