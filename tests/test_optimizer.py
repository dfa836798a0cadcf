"""The fused AdamW against a numpy transcription of torch.optim.AdamW, float16 masters, and optimizer state
files of any ZeRO layout (ranks' chunks joined, legacy whole-tensor files) loading into any other."""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn

from qwenvl.parallel.layout import ShardSpec
from qwenvl.parallel.world import DataParallel
from qwenvl.parallel.zero import ZeroConfig, ZeroPartition
from qwenvl.runtime import graph_mode
from qwenvl.train.optimizer import LARGE_TENSOR, AdamW, OptimizerState, build_optimizer, save_optimizer_state
from qwenvl.train.param_groups import ParamGroup

BETAS = (0.9, 0.95)
EPS = 1e-8
SHAPES = {"a.weight": (4, 3), "a.bias": (3,), "b.weight": (5, 2), "b.bias": (7,), "c.norm": (6,)}
GROUPS = [("decay", ["a.weight", "b.weight"], 1e-2, 0.1), ("no_decay", ["a.bias", "b.bias", "c.norm"], 3e-3, 0.0)]
LR_FACTORS = [0.25, 1.0, 0.5, 0.8, 0.1]
COEFS = [1.0, 0.5, 2.0, 0.25, 1.0]  # gradient unscaling / clipping factors folded into the update


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in SHAPES.items()}


def _grads(steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{name: rng.normal(0, 1, shape).astype(np.float32) for name, shape in SHAPES.items()} for _ in range(steps)]


# the two CPU paths of float32 weights: numpy in place for tensors under LARGE_TENSOR elements (host_adamw), the Adam
# kernel on moments kept at running scales for larger ones (every tensor here with large_tensor=1); half-precision
# weights take FusedCastAdamWeightDecay (test_half_precision_weights_follow_float32_masters)
KERNELS = {"host": LARGE_TENSOR, "scaled_moments": 1}


def _optimizer(values: dict[str, np.ndarray], dtype=ms.float32, large_tensor: int = LARGE_TENSOR):
    params = {name: Parameter(Tensor(value.copy(), dtype), name=name) for name, value in values.items()}
    groups = [ParamGroup(g, [params[n] for n in names], lr, wd) for g, names, lr, wd in GROUPS]
    return AdamW(ZeroPartition.build(groups, DataParallel(), ZeroConfig()), BETAS, EPS, large_tensor), params


def _torch_adamw(values, grads, factors, coefs, groups=GROUPS) -> dict[str, np.ndarray]:
    """torch.optim.AdamW (amsgrad=False, maximize=False) in float64 on grads * coef, each group's LR scaled."""
    beta1, beta2 = BETAS
    p = {n: v.astype(np.float64) for n, v in values.items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    v2 = {n: np.zeros_like(v) for n, v in p.items()}
    hyper = {n: (lr, wd) for _, names, lr, wd in groups for n in names}
    for t, (grad, factor, coef) in enumerate(zip(grads, factors, coefs), start=1):
        for n in p:
            lr, wd = hyper[n]
            lr = lr * factor
            g = grad[n].astype(np.float64) * coef
            p[n] = p[n] * (1 - lr * wd)
            m[n] = beta1 * m[n] + (1 - beta1) * g
            v2[n] = beta2 * v2[n] + (1 - beta2) * g * g
            step_size = lr / (1 - beta1**t)
            denom = np.sqrt(v2[n]) / np.sqrt(1 - beta2**t) + EPS
            p[n] = p[n] - step_size * m[n] / denom
    return p


def _step(opt: AdamW, grad: dict[str, np.ndarray], factor: float, coef: float = 1.0) -> None:
    opt.step([Tensor(grad[p.name], p.dtype) for p in opt.parameters], coef, factor)


def _values(params: dict[str, Parameter]) -> dict[str, np.ndarray]:
    return {n: p.asnumpy().astype(np.float32) for n, p in params.items()}


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_adamw_matches_torch_formula_over_steps(kernel):
    init, grads = _initial(), _grads(len(LR_FACTORS))
    opt, params = _optimizer(init, large_tensor=KERNELS[kernel])
    assert opt.scaled == [kernel == "scaled_moments"] * len(SHAPES)
    assert opt.on_host == [kernel == "host"] * len(SHAPES)
    for grad, factor, coef in zip(grads, LR_FACTORS, COEFS):
        _step(opt, grad, factor, coef)
    assert opt.step_count == len(LR_FACTORS)
    assert all(m is p for m, p in zip(opt.masters, opt.parameters))  # float32 weights are their own masters
    want = _torch_adamw(init, grads, LR_FACTORS, COEFS)
    _assert_close(_values(params), want)
    # the tolerance is fine enough to see the decoupled decay (lr * wd * |p| per step) and the coefficients
    undecayed = _torch_adamw(init, grads, LR_FACTORS, COEFS, [(g, n, lr, 0.0) for g, n, lr, _ in GROUPS])
    assert all(np.abs(want[n] - undecayed[n]).max() > 1e-4 for n in GROUPS[0][1])
    uncoefficiented = _torch_adamw(init, grads, LR_FACTORS, [1.0] * len(COEFS))
    assert max(np.abs(want[n] - uncoefficiented[n]).max() for n in SHAPES) > 1e-4


def test_half_precision_weights_follow_float32_masters():
    """float16 weights are updated through float32 masters: after many steps they hold the masters rounded,
    which follow the float32 run, where updating float16 weights directly would lose the small steps."""
    init, grads = _initial(), _grads(len(LR_FACTORS))
    opt, params = _optimizer(init, ms.float16)
    assert all(m.dtype == ms.float32 and m is not p for m, p in zip(opt.masters, opt.parameters))
    for grad, factor in zip(grads, LR_FACTORS):
        _step(opt, grad, factor)
    half = [{n: g.astype(np.float16).astype(np.float32) for n, g in grad.items()} for grad in grads]  # as passed
    want = _torch_adamw({n: v.astype(np.float16).astype(np.float32) for n, v in init.items()}, half, LR_FACTORS,
                        [1.0] * len(LR_FACTORS))  # fmt: skip
    _assert_close({m.name.removeprefix("master."): m.asnumpy() for m in opt.masters}, want, atol=2e-6)
    for name, value in _values(params).items():
        np.testing.assert_array_equal(value, want[name].astype(np.float16).astype(np.float32), err_msg=name)


def test_float32_weights_take_float16_gradients():
    """ZeRO-3 with half-precision compute hands float32 weight chunks float16 gradients: the update is torch's on
    those gradients, not on float16 squares or products (a loss scale puts them near float16's limits)."""
    init, grads = _initial(), _grads(len(LR_FACTORS))
    scale = 2.0**10
    opt, params = _optimizer(init)
    assert all(opt.on_host)
    for grad, factor in zip(grads, LR_FACTORS):
        opt.step([Tensor(grad[p.name] * scale, ms.float16) for p in opt.parameters], 1.0 / scale, factor)
    half = [{n: (g * scale).astype(np.float16).astype(np.float32) / scale for n, g in grad.items()} for grad in grads]
    _assert_close(_values(params), _torch_adamw(init, half, LR_FACTORS, [1.0] * len(LR_FACTORS)))


def test_rejects_wrong_gradient_count_duplicates_and_unknown_optim():
    opt, params = _optimizer(_initial())
    with pytest.raises(ValueError, match="gradients"):
        opt.step([Tensor(np.zeros(SHAPES["a.weight"], np.float32))], 1.0, 1.0)
    groups = [ParamGroup("a", [params["a.weight"]], 1e-3, 0.0), ParamGroup("again", [params["a.weight"]], 1e-3, 0.0)]
    with pytest.raises(ValueError, match="twice"):
        AdamW(ZeroPartition.build(groups, DataParallel(), ZeroConfig()))
    args = SimpleNamespace(optim="sgd", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    with pytest.raises(ValueError, match="unknown --optim"):
        build_optimizer(groups[:1], args)


def _saved(opt: AdamW, path) -> OptimizerState:
    state, metadata = opt.state_dict()
    save_optimizer_state(path, state, metadata)
    return OptimizerState([path])


@pytest.mark.parametrize("kernel", KERNELS)
def test_state_round_trip_continues_identically(tmp_path, kernel):
    init, grads = _initial(), _grads(len(LR_FACTORS))
    opt, params = _optimizer(init, large_tensor=KERNELS[kernel])
    for grad, factor, coef in zip(grads[:2], LR_FACTORS[:2], COEFS[:2]):
        _step(opt, grad, factor, coef)
    state = _saved(opt, tmp_path / "optimizer-rank0.safetensors")
    assert state.world == 1 and int(state.scalar("step")) == 2
    resumed, resumed_params = _optimizer(_values(params), large_tensor=KERNELS[kernel])
    resumed.load_state_dict(state)
    for grad, factor, coef in zip(grads[2:], LR_FACTORS[2:], COEFS[2:]):
        _step(opt, grad, factor, coef)
        _step(resumed, grad, factor, coef)
    for name, value in _values(params).items():
        np.testing.assert_array_equal(_values(resumed_params)[name], value, err_msg=name)
    _assert_close(_values(resumed_params), _torch_adamw(init, grads, LR_FACTORS, COEFS))


@pytest.mark.parametrize("saver,loader", [("scaled_moments", "host"), ("host", "scaled_moments")])
def test_moments_carry_over_between_the_two_paths(tmp_path, saver, loader):
    """A state saved by one path resumes under the other (another size rule): moments saved at a scale
    are multiplied out, true moments are taken at unit scale; the run continues on torch's trajectory."""
    init, grads = _initial(), _grads(len(LR_FACTORS))
    opt, params = _optimizer(init, large_tensor=KERNELS[saver])
    for grad, factor, coef in zip(grads[:2], LR_FACTORS[:2], COEFS[:2]):
        _step(opt, grad, factor, coef)
    state = _saved(opt, tmp_path / "optimizer-rank0.safetensors")
    assert state.has("exp_avg_scale.a.weight") == (saver == "scaled_moments")
    resumed, resumed_params = _optimizer(_values(params), large_tensor=KERNELS[loader])
    resumed.load_state_dict(state)
    for grad, factor, coef in zip(grads[2:], LR_FACTORS[2:], COEFS[2:]):
        _step(resumed, grad, factor, coef)
    _assert_close(_values(resumed_params), _torch_adamw(init, grads, LR_FACTORS, COEFS))


def test_chunks_saved_by_two_ranks_join_into_a_world_of_one(tmp_path):
    """A stage 1-3 run of two ranks saves each parameter's moments as two chunks (`ShardSpec` layout): a
    world of one (or another stage) rebuilds the whole tensors and continues from them."""
    init, grads = _initial(), _grads(len(LR_FACTORS))
    opt, params = _optimizer(init)
    for grad, factor in zip(grads[:3], LR_FACTORS[:3]):
        _step(opt, grad, factor)
    whole, _ = opt.state_dict()
    for rank in range(2):
        chunked = {"step": whole["step"]}
        for key, value in whole.items():
            if key != "step":
                chunked[key] = ShardSpec(value.shape, 2, rank).take(value)
        save_optimizer_state(tmp_path / f"optimizer-rank{rank}.safetensors", chunked,
                             {"zero_world": "2", "zero_rank": str(rank)})  # fmt: skip
    state = OptimizerState([tmp_path / f"optimizer-rank{r}.safetensors" for r in (1, 0)])
    assert state.world == 2
    np.testing.assert_array_equal(state.full("exp_avg.b.bias", ShardSpec((7,), 2, 0)), whole["exp_avg.b.bias"])
    resumed, resumed_params = _optimizer(_values(params))
    resumed.load_state_dict(state)
    _step(opt, grads[3], LR_FACTORS[3])
    _step(resumed, grads[3], LR_FACTORS[3])
    for name, value in _values(params).items():
        np.testing.assert_array_equal(_values(resumed_params)[name], value, err_msg=name)
    # this rank's share of a two-rank layout, from the whole tensor of a world-of-one file
    one = _saved(opt, tmp_path / "whole.safetensors")
    spec = ShardSpec((5, 2), 2, 1)
    moment = opt.state_dict()[0]["exp_avg.b.weight"]
    np.testing.assert_array_equal(spec.take(one.full("exp_avg.b.weight", spec)), moment.reshape(-1)[5:])


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16])
def test_state_file_streams_one_tensor_at_a_time(tmp_path, dtype):
    """Saving reads each tensor when it is written and drops it before reading the next (a whole copy of a
    rank's state, as `safetensors.numpy.save_file` makes, cost 170-306 MiB at 109-163 M with ZeRO-2); the file
    is a plain safetensors file with the layout metadata."""
    from safetensors import safe_open

    from qwenvl.model.checkpoint_io import LazyTensors

    values = _initial()
    # float32: host moments (tensors under 7 values) and kernel ones; float16: kernel moments and float32 masters
    opt, _ = _optimizer(values, dtype=dtype, large_tensor=7)
    _step(opt, _grads(1)[0], 1.0)
    state, metadata = opt.state_dict()
    assert len(opt.exp_avg) and (bool(opt._host_index) if dtype == ms.float32 else "master.a.weight" in state)
    names = {"F32": "float32", "F16": "float16", "F64": "float64", "I64": "int64"}
    alive, watched = [], LazyTensors()
    kept = {name for name in state if state[name] is state[name]}  # scalars the state holds anyway

    def read(name):
        assert all(ref() is None for ref in alive), f"an earlier tensor is still held when {name} is read"
        value = state[name]
        if name not in kept:
            alive.append(weakref.ref(value))
        return value

    for name in state:
        plan = state.plan(name)
        watched.add(name, plan.shape, names[plan.tag], lambda name=name: read(name))
    save_optimizer_state(tmp_path / "opt.safetensors", watched, metadata)
    assert len(alive) == len(state) - len(kept) and {k.split(".")[0] for k in kept} <= {"step", "exp_avg_scale", "exp_avg_sq_scale"}
    with safe_open(str(tmp_path / "opt.safetensors"), "np") as handle:
        assert handle.metadata()["zero_world"] == "1" and sorted(handle.keys()) == sorted(state)
        for name in state:
            np.testing.assert_array_equal(handle.get_tensor(name), state[name], err_msg=name)
    if dtype == ms.float16:
        master = state["master.a.weight"]
        assert master.dtype == np.float32 and np.abs(master - values["a.weight"]).max() > 0


def test_state_files_are_checked(tmp_path):
    opt, _ = _optimizer(_initial())
    state, metadata = opt.state_dict()
    save_optimizer_state(tmp_path / "r0.safetensors", state, {"zero_world": "2", "zero_rank": "0"})
    with pytest.raises(ValueError, match="saved by 2 ranks but 1 files"):
        OptimizerState([tmp_path / "r0.safetensors"])
    save_optimizer_state(tmp_path / "w1.safetensors", state, metadata)
    with pytest.raises(ValueError, match="mixed layouts"):
        OptimizerState([tmp_path / "r0.safetensors", tmp_path / "w1.safetensors"])
    partial = {k: v for k, v in state.items() if k != "exp_avg.a.weight"}
    save_optimizer_state(tmp_path / "partial.safetensors", partial, metadata)
    with pytest.raises(KeyError, match="exp_avg.a.weight"):
        opt.load_state_dict(OptimizerState([tmp_path / "partial.safetensors"]))
    save_optimizer_state(tmp_path / "shape.safetensors", {**state, "exp_avg.a.weight": np.zeros(5, np.float32)}, metadata)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(OptimizerState([tmp_path / "shape.safetensors"]))


def test_legacy_whole_parameter_files_load(tmp_path):
    """Files of earlier versions (no layout metadata; ZeRO-1 gave each rank whole parameters) still resume."""
    opt, _ = _optimizer(_initial())
    _step(opt, _grads(1)[0], 1.0)
    state, _ = opt.state_dict()
    names = sorted(k for k in state if k != "step")
    save_optimizer_state(tmp_path / "optimizer-rank0.safetensors", {"step": state["step"], **{k: state[k] for k in names[:4]}}, {})
    save_optimizer_state(tmp_path / "optimizer-rank1.safetensors", {"step": state["step"], **{k: state[k] for k in names[4:]}}, {})
    fresh, _ = _optimizer(_initial())
    fresh.load_state_dict(OptimizerState(sorted(tmp_path.glob("*.safetensors"))))
    got, _ = fresh.state_dict()
    for key in names:
        np.testing.assert_array_equal(got[key], state[key], err_msg=key)


class _Read(nn.Cell):
    """A compiled graph reading Parameters: what the next forward pass sees."""

    def __init__(self, params) -> None:
        super().__init__()
        self.weights = ms.ParameterTuple(params)

    def construct(self, x):
        return [w * x for w in self.weights]


def test_host_updates_reach_compiled_graphs_also_after_set_data():
    """The numpy update writes where compiled graphs read a Parameter, also for one `set_data` just replaced (a
    checkpoint load) and that no graph has read since: the first step's values computed by hand. Graph mode, as
    training runs (in PyNative mode a compiled graph keeps reading the storage a Parameter had when it first ran)."""
    init = {name: np.full(shape, 1.0, np.float32) for name, shape in SHAPES.items()}
    grad = {name: np.full(shape, 0.5, np.float32) for name, shape in SHAPES.items()}
    hyper = {n: (lr, wd) for _, names, lr, wd in GROUPS for n in names}
    with graph_mode():
        opt, params = _optimizer(init)
        assert all(opt.on_host)
        read = ms.jit(_Read(list(params.values())).construct)
        one = Tensor(1.0, ms.float32)
        read(one)
        params["b.bias"].set_data(Tensor(np.full(SHAPES["b.bias"], 3.0, np.float32)))
        _step(opt, grad, 1.0)
        seen = read(one)
    # step 1: m = 0.1 g, v = 0.05 g^2; the update lr * (m / 0.1) / (sqrt(v / 0.05) + eps) = lr * g / (|g| + eps)
    for (name, param), value in zip(params.items(), seen):
        lr, wd = hyper[name]
        want = (3.0 if name == "b.bias" else 1.0) * (1 - lr * wd) - lr * 0.5 / (0.5 + EPS)
        np.testing.assert_allclose(value.asnumpy(), want, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(param.asnumpy(), want, rtol=1e-6, err_msg=name)
