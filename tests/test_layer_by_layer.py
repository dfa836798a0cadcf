"""Layer-by-layer execution (`qwenvl.train.layer_by_layer`) against the whole compiled graph.

The expectation is `ms.value_and_grad` of the whole model in one compiled graph (itself checked against
transformers in test_model_qwen2/3): the same loss, token count and every gradient, for every family with
images (Qwen3: deepstack features too), for a frozen base with LoRA adapters, and in float16. The layers'
own Parameters keep their storage and values; LoRA dropout differs per layer and repeats for one key.
"""

from __future__ import annotations

import inspect

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from qwenvl.model import build_model
from qwenvl.model.lora import LoraSettings, apply_lora
from qwenvl.runtime import graph_mode
from qwenvl.train.layer_by_layer import LayerByLayer
from qwenvl.train.train_step import _ScaledLoss
from tests.test_model_qwen2 import IDS, _sample, _single
from tests.test_model_qwen3 import _cases, _config
from tools.make_tiny_model import tiny_config


def _model_and_batch(family: str, dtype: str = "float32", tied: bool = False, dense_layers: tuple[int, ...] = ()):
    config = _config(family) if family.startswith("qwen3") else tiny_config(family, IDS)
    if dense_layers:  # Qwen3-VL-MoE layers with a dense MLP (`mlp_only_layers`) beside the MoE ones
        config["text_config"]["mlp_only_layers"] = list(dense_layers)
    if tied:
        config["tie_word_embeddings"] = True
        if "text_config" in config:
            config["text_config"]["tie_word_embeddings"] = True
    if family.startswith("qwen3"):
        return build_model(config, seed=1, dtype=dtype), _cases()["image_video"]
    sample = _sample(family, np.random.default_rng(0), images=[(1, 4, 4), (1, 6, 8)])
    return build_model(config, seed=0, dtype=dtype), _single(sample)


def _positional(model, batch) -> list:
    inputs = model.prepare_inputs(batch)
    names = list(inspect.signature(model.construct).parameters)
    return [inputs.get(name) for name in names[: max(names.index(n) for n in inputs) + 1]]


def _whole_graph(model, params, scale, values):
    with graph_mode():
        return ms.jit(ms.value_and_grad(_ScaledLoss(model), None, params, has_aux=True))(scale, *values)


def _assert_same(got, want, params, rtol=1e-6):
    (got_scaled, got_sum, got_tokens), got_grads = got
    (want_scaled, want_sum, want_tokens), want_grads = want
    assert float(got_tokens) == float(want_tokens)
    np.testing.assert_allclose(float(got_sum), float(want_sum), rtol=rtol)
    np.testing.assert_allclose(float(got_scaled), float(want_scaled), rtol=rtol)
    assert len(got_grads) == len(want_grads) == len(params)
    for param, g, w in zip(params, got_grads, want_grads):
        g, w = g.asnumpy().astype(np.float32), w.asnumpy().astype(np.float32)
        assert np.isfinite(g).all(), param.name
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=param.name)


@pytest.mark.parametrize("family,tied,dense", [
    ("qwen2vl", False, ()), ("qwen2.5vl", False, ()), ("qwen2.5vl", True, ()), ("qwen3vl", False, ()),
    ("qwen3vl", True, ()), ("qwen3vl_moe", False, ()), ("qwen3vl_moe", False, (0,))])  # fmt: skip
def test_every_gradient_equals_the_whole_graph(family, tied, dense):
    """Tied: the embedding table is the lm_head weight, with a gradient from the loss and one from the lookup.
    Dense: a MoE model whose first layer has a dense MLP runs on two compiled layers."""
    model, batch = _model_and_batch(family, tied=tied, dense_layers=dense)
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied
    params = list(model.trainable_params())
    values = _positional(model, batch)
    before = {p.name: p.asnumpy().copy() for p in model.get_parameters()}
    scale = Tensor(4.0, ms.float32)
    want = _whole_graph(model, params, scale, values)
    runner = LayerByLayer(model, params)
    assert len({id(group) for group in runner.group_of}) == 1 + len(dense)  # one compiled layer per structure
    assert runner.inputs_backward is not None  # the vision tower and embeddings train
    _assert_same(runner(scale, *values), want, params)
    _assert_same(runner(scale, *values), want, params)  # a second step reuses the graphs
    for param in model.get_parameters():  # the layers' own weights are untouched
        np.testing.assert_array_equal(param.asnumpy(), before[param.name], err_msg=param.name)


@pytest.mark.parametrize("family", ["qwen2.5vl", "qwen3vl"])
def test_a_text_only_micro_batch_hands_no_vision_gradient_to_reduce(family):
    """Without images the input stage's graph takes no vision weight: `reduce` (ZeRO-2/3's reduce-scatter, here a
    recorder) never sees a vision slot, and the vision gradients are what `zeros` makes (here a marked value, to
    tell them from computed zeros). Every other gradient equals the whole graph's; a batch with images after it
    still reduces the vision gradients."""
    model, batch = _model_and_batch(family)
    text = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids", "attention_mask")}
    vision_ids = [model.config.get("image_token_id", 151655), model.config.get("video_token_id", 151656)]
    text["input_ids"] = np.where(np.isin(text["input_ids"], vision_ids), 20, text["input_ids"])
    params = list(model.trainable_params())
    vision = {i for i, p in enumerate(params) if p.name.startswith("model.visual.")}
    assert vision
    reduced, made = [], []

    def reduce(slots, grads):
        reduced.append(set(slots))
        return grads

    def zeros(slots):
        made.append(list(slots))
        return [ms.ops.full(params[i].shape, 7.0, dtype=params[i].dtype) for i in slots]

    runner = LayerByLayer(model, params, reduce, zeros)
    scale = Tensor(1.0, ms.float32)
    got = runner(scale, *_positional(model, text))
    assert not any(slots & vision for slots in reduced) and made == [sorted(vision)]
    (_, want_sum, _), want = _whole_graph(model, params, scale, _positional(model, text))
    np.testing.assert_allclose(float(got[0][1]), float(want_sum), rtol=1e-6)
    for i, param in enumerate(params):
        expected = np.full(param.shape, 7.0, np.float32) if i in vision else want[i].asnumpy()
        np.testing.assert_allclose(got[1][i].asnumpy(), expected, rtol=1e-6, atol=1e-7, err_msg=param.name)
    reduced.clear()
    runner(scale, *_positional(model, batch))
    assert vision <= set().union(*reduced) and made == [sorted(vision)]


def test_frozen_base_with_lora_adapters_skips_the_tower_backward():
    model, batch = _model_and_batch("qwen2.5vl")
    for param in model.get_parameters():
        param.requires_grad = False
    apply_lora(model, LoraSettings(4, 8.0, 0.0, ("q_proj", "v_proj", "down_proj")))
    params = list(model.trainable_params())
    assert params and all("lora_" in p.name for p in params)
    rng = np.random.default_rng(3)
    for param in params:  # B starts at zero: move it so the adapters' input gradients are not zero
        param.set_data(Tensor(rng.normal(0, 0.05, param.shape).astype(np.float32)))
    values = _positional(model, batch)
    runner = LayerByLayer(model, params)
    assert runner.inputs_backward is None  # nothing before the layers trains
    scale = Tensor(1.0, ms.float32)
    _assert_same(runner(scale, *values), _whole_graph(model, params, scale, values), params)


def test_float16_weights_equal_the_whole_graph():
    model, batch = _model_and_batch("qwen2.5vl", dtype="float16")
    params = list(model.trainable_params())
    assert params[0].dtype == ms.float16
    values = _positional(model, batch)
    scale = Tensor(1024.0, ms.float32)
    _assert_same(LayerByLayer(model, params)(scale, *values), _whole_graph(model, params, scale, values), params,
                 rtol=1e-3)  # fmt: skip


def test_lora_dropout_differs_per_layer_and_repeats_for_one_key():
    """With dropout the masks are a function of (step key, layer): one key gives one result, another key another,
    and the result differs from no dropout; the finite difference along the adapters confirms the backward pass
    recomputes each layer with the mask its forward pass used."""
    model, batch = _model_and_batch("qwen2.5vl")
    for param in model.get_parameters():
        param.requires_grad = False
    apply_lora(model, LoraSettings(4, 8.0, 0.5, ("q_proj", "v_proj")))
    model.set_train(True)
    params = list(model.trainable_params())
    rng = np.random.default_rng(5)
    for param in params:
        param.set_data(Tensor(rng.normal(0, 0.3, param.shape).astype(np.float32)))
    values = _positional(model, batch)
    runner = LayerByLayer(model, params)
    scale = Tensor(1.0, ms.float32)

    def run(step: int):
        model.dropout_key.set(seed=7, step=step, micro_batch=0, rank=0)
        (_, loss_sum, _), grads = runner(scale, *values)
        return float(loss_sum), [g.asnumpy() for g in grads]

    loss_a, grads_a = run(1)
    loss_again, grads_again = run(1)
    loss_b, _ = run(2)
    assert loss_again == loss_a and all(np.array_equal(x, y) for x, y in zip(grads_a, grads_again))
    assert loss_b != loss_a
    direction = [rng.normal(0, 1, p.shape).astype(np.float32) for p in params]
    slope = sum(float((g * d).sum()) for g, d in zip(grads_a, direction))
    originals = [p.asnumpy().copy() for p in params]
    eps, ends = 1e-3, []
    for sign in (1, -1):
        for param, original, d in zip(params, originals, direction):
            param.set_data(Tensor(original + sign * eps * d))
        ends.append(run(1)[0])
    np.testing.assert_allclose((ends[0] - ends[1]) / (2 * eps), slope, rtol=2e-2)


def test_a_model_without_layer_inputs_is_refused():
    from tests.toy_model import ToyVLForConditionalGeneration
    from tests.toy_batches import CFG

    model = ToyVLForConditionalGeneration(CFG)
    with pytest.raises(ValueError, match="layer_inputs"):
        LayerByLayer(model, list(model.trainable_params()))
