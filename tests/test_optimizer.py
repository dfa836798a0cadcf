"""AdamW against a numpy transcription of torch.optim.AdamW's update, ZeRO-1 against the unsharded update."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from mindspore import Parameter, Tensor, ops

from qwenvl.train.distributed import DataParallel
from qwenvl.train.optimizer import AdamW, ZeRO1AdamW, assign_shards, build_optimizer
from qwenvl.train.param_groups import ParamGroup

BETAS = (0.9, 0.95)
EPS = 1e-8
SHAPES = {"a.weight": (4, 3), "a.bias": (3,), "b.weight": (5, 2), "b.bias": (7,), "c.norm": (6,)}
GROUPS = [("decay", ["a.weight", "b.weight"], 1e-2, 0.1), ("no_decay", ["a.bias", "b.bias", "c.norm"], 3e-3, 0.0)]
LR_FACTORS = [0.25, 1.0, 0.5, 0.8, 0.1]


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in SHAPES.items()}


def _grads(steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in SHAPES.items()} for _ in range(steps)]


def _groups(values: dict[str, np.ndarray]) -> tuple[list[ParamGroup], dict[str, Parameter]]:
    params = {name: Parameter(Tensor(value.copy()), name=name) for name, value in values.items()}
    groups = [ParamGroup(g, [params[n] for n in names], lr, wd) for g, names, lr, wd in GROUPS]
    return groups, params


def _torch_adamw(values: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]], factors: list[float], groups=GROUPS) -> dict[str, np.ndarray]:
    """torch.optim.AdamW (amsgrad=False, maximize=False) in float64, each group's LR scaled by the factor."""
    beta1, beta2 = BETAS
    p = {n: v.astype(np.float64) for n, v in values.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    v2 = {n: np.zeros_like(v) for n, v in p.items()}
    hyper = {n: (lr, wd) for _, names, lr, wd in groups for n in names}
    for t, (grad, factor) in enumerate(zip(grads, factors), start=1):
        for n in p:
            lr, wd = hyper[n]
            lr = lr * factor
            g = grad[n].astype(np.float64)
            p[n] = p[n] * (1 - lr * wd)
            m[n] = beta1 * m[n] + (1 - beta1) * g
            v2[n] = beta2 * v2[n] + (1 - beta2) * g * g
            step_size = lr / (1 - beta1**t)
            denom = np.sqrt(v2[n]) / np.sqrt(1 - beta2**t) + EPS
            p[n] = p[n] - step_size * m[n] / denom
    return p


def _step(opt: AdamW, grad: dict[str, np.ndarray], factor: float) -> None:
    opt.step([Tensor(grad[p.name]) for p in opt.parameters], factor)


def _values(params: dict[str, Parameter]) -> dict[str, np.ndarray]:
    return {n: p.asnumpy() for n, p in params.items()}


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)


def test_adamw_matches_torch_formula_over_steps():
    init, grads = _initial(), _grads(len(LR_FACTORS))
    groups, params = _groups(init)
    opt = AdamW(groups, BETAS, EPS)
    for grad, factor in zip(grads, LR_FACTORS):
        _step(opt, grad, factor)
    assert opt.step_count == len(LR_FACTORS)
    want = _torch_adamw(init, grads, LR_FACTORS)
    _assert_close(_values(params), want)
    # the tolerance is fine enough to see the decoupled decay (lr * wd * |p| per step)
    undecayed = _torch_adamw(init, grads, LR_FACTORS, [(g, n, lr, 0.0) for g, n, lr, _ in GROUPS])
    assert all(np.abs(want[n] - undecayed[n]).max() > 1e-4 for n in GROUPS[0][1])


def test_adamw_rejects_wrong_gradient_count_and_duplicates():
    groups, params = _groups(_initial())
    opt = AdamW(groups, BETAS, EPS)
    with pytest.raises(ValueError, match="gradients"):
        opt.step([Tensor(np.zeros(SHAPES["a.weight"], np.float32))], 1.0)
    with pytest.raises(ValueError, match="twice"):
        AdamW([groups[0], ParamGroup("again", [params["a.weight"]], 1e-3, 0.0)])


def test_adamw_state_dict_round_trip_continues_identically():
    init, grads = _initial(), _grads(len(LR_FACTORS))
    groups, params = _groups(init)
    opt = AdamW(groups, BETAS, EPS)
    for grad, factor in zip(grads[:2], LR_FACTORS[:2]):
        _step(opt, grad, factor)
    state = {k: v.copy() for k, v in opt.state_dict().items()}
    assert int(state["step"]) == 2
    assert {k for k in state if k != "step"} == {f"{m}.{n}" for m in ("exp_avg", "exp_avg_sq") for n in SHAPES}

    resumed_groups, resumed_params = _groups(_values(params))
    resumed = AdamW(resumed_groups, BETAS, EPS)
    resumed.load_state_dict(state)
    for grad, factor in zip(grads[2:], LR_FACTORS[2:]):
        _step(opt, grad, factor)
        _step(resumed, grad, factor)
    got = _values(resumed_params)
    for name, value in _values(params).items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    _assert_close(got, _torch_adamw(init, grads, LR_FACTORS))


def test_adamw_load_state_dict_checks_names_and_shapes():
    groups, _ = _groups(_initial())
    opt = AdamW(groups, BETAS, EPS)
    state = opt.state_dict()
    with pytest.raises(KeyError, match="exp_avg.a.weight"):
        opt.load_state_dict({k: v for k, v in state.items() if k != "exp_avg.a.weight"})
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict({**state, "exp_avg.a.weight": np.zeros((3, 4), np.float32)})


def test_assign_shards_balances_largest_first():
    # 10 -> r0; 9 -> r1; 4 -> r1 (13); 3 -> r0 (13); 1 -> tie, lower rank r0
    assert assign_shards([4, 10, 1, 9, 3], 2) == [[1, 2, 4], [0, 3]]
    owned = assign_shards([1] * 5, 3)
    assert sorted(i for r in owned for i in r) == list(range(5))


def _zero_pair(init: dict[str, np.ndarray]):
    """Two ranks' optimizers over two replicas of the same parameters."""
    replicas = [_groups(init) for _ in range(2)]
    opts = [ZeRO1AdamW(groups, DataParallel(rank, 2), BETAS, EPS) for rank, (groups, _) in enumerate(replicas)]
    return opts, [params for _, params in replicas]


def _zero_step(opts: list[ZeRO1AdamW], grad: dict[str, np.ndarray], factor: float, monkeypatch) -> None:
    """rank 0 calls step(); its all_gather runs rank 1's update and concatenates the shards in rank order."""
    gathered = {}

    def all_gather(dp: DataParallel, shard):
        assert dp.rank == 0 and dp.world_size == 2
        other = opts[1].update_shard([Tensor(grad[p.name]) for p in opts[1].parameters], factor)
        assert other.shape == shard.shape
        gathered["buffer"] = ops.cat([shard, other])
        return gathered["buffer"]

    monkeypatch.setattr(DataParallel, "all_gather", all_gather)
    _step(opts[0], grad, factor)
    opts[1].apply_gathered(gathered["buffer"])


def test_zero1_two_ranks_equal_unsharded(monkeypatch):
    init, grads = _initial(), _grads(len(LR_FACTORS))
    opts, replicas = _zero_pair(init)
    assert all(opts[0].owned) and all(opts[1].owned)
    assert opts[0].owned == opts[1].owned
    for grad, factor in zip(grads, LR_FACTORS):
        _zero_step(opts, grad, factor, monkeypatch)
    want = _torch_adamw(init, grads, LR_FACTORS)
    for params in replicas:
        _assert_close(_values(params), want)
    # each rank keeps moments only for the parameters it owns; together they cover every parameter
    keys = [set(opt.state_dict()) - {"step"} for opt in opts]
    assert not keys[0] & keys[1]
    owned_names = [{opts[0].parameters[i].name for i in opts[0].owned[r]} for r in range(2)]
    for rank in range(2):
        assert keys[rank] == {f"{m}.{n}" for m in ("exp_avg", "exp_avg_sq") for n in owned_names[rank]}


def test_zero1_shards_resume_into_plain_adamw(monkeypatch):
    """The ranks' state dicts merged (as ShardedArrays does) resume an unsharded run identically."""
    init, grads = _initial(), _grads(len(LR_FACTORS))
    opts, replicas = _zero_pair(init)
    for grad, factor in zip(grads[:3], LR_FACTORS[:3]):
        _zero_step(opts, grad, factor, monkeypatch)
    merged = {**opts[0].state_dict(), **opts[1].state_dict()}
    groups, params = _groups(_values(replicas[0]))
    plain = AdamW(groups, BETAS, EPS)
    plain.load_state_dict(merged)
    assert plain.step_count == 3
    for grad, factor in zip(grads[3:], LR_FACTORS[3:]):
        _step(plain, grad, factor)
    _assert_close(_values(params), _torch_adamw(init, grads, LR_FACTORS))


def _args(optim: str) -> SimpleNamespace:
    return SimpleNamespace(optim=optim, adam_beta1=0.8, adam_beta2=0.9, adam_epsilon=1e-6)


def test_build_optimizer_by_name():
    groups, _ = _groups(_initial())
    for name in ("adamw_mindspore", "adamw_torch"):
        opt = build_optimizer(groups, _args(name))
        assert type(opt) is AdamW and opt.betas == (0.8, 0.9) and opt.eps == 1e-6
    zero = build_optimizer(groups, _args("adamw_zero1_mindspore"), DataParallel(1, 2))
    assert isinstance(zero, ZeRO1AdamW) and zero.dp.rank == 1
    with pytest.raises(ValueError, match="unknown --optim"):
        build_optimizer(groups, _args("sgd"))
