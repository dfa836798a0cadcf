"""The chunked LM loss (qwenvl/model/lm_loss.py) against the whole-logits loss (`layers.causal_lm_loss_sum`):
same loss and gradients with several chunks and padded rows, in float32, through the half-precision weight
source, and with the head frozen."""

from __future__ import annotations

import numpy as np
import pytest

from qwenvl.data.collators import collate_padded
from qwenvl.model import load_model
from qwenvl.model.lm_loss import _ChunkedCrossEntropy, _ChunkedCrossEntropyFrozenHead, chunk_rows, whole_logits_fit
from qwenvl.train.argument import parse_args
from qwenvl.train.freezing import apply_tuning_flags
from qwenvl.train.optimizer import build_optimizer
from qwenvl.train.param_groups import build_param_groups
from qwenvl.train.train_step import TrainStep
from tests.test_train_layouts import _samples


def test_both_chunked_losses_have_their_own_backward_pass():
    """The memory bound rests on the hand-written backward (recomputed chunk logits); autodiff would keep every
    chunk's logits and compute the same numbers, so equal gradients alone would not show it is in use."""
    assert "bprop" in vars(_ChunkedCrossEntropy) and "bprop" in vars(_ChunkedCrossEntropyFrozenHead)


def test_chunks_split_the_rows_evenly_within_the_budget():
    assert chunk_rows(10_000, 151936, 2**26) == 440  # 441 rows fit: 23 chunks of 435 rows, to a multiple of 8
    assert chunk_rows(10_000, 300, 2**26) == 10_000  # everything in one chunk
    assert chunk_rows(10_000, 10**9, 2**26) == 64  # never below 64 rows
    assert whole_logits_fit(511, 151936, 2**27) and not whole_logits_fit(2047, 151936, 2**27)


def _loss_and_grads(model_dir, batch, dtype: str, values: int | None, *flags: str):
    """(loss_sum, n_tokens, {name: grad}) of one compiled forward/backward; values None: whole logits."""
    model = load_model(model_dir, dtype=dtype)
    model_args, _, training = parse_args(["--tune_mm_llm", "True", "--tune_mm_mlp", "True", *flags])
    apply_tuning_flags(model, model_args)
    model.set_train(True)
    step = TrainStep(model, build_optimizer(build_param_groups(model, training), training), training)
    if values is None:
        model.lm_loss = None
    else:
        model.prepare_loss(values)
    loss_sum, n_tokens, grads = step.forward_backward(model.prepare_inputs(batch))
    named = {p.name: g.asnumpy().astype(np.float64) for p, g in zip(step.optimizer.parameters, grads)}
    return float(loss_sum.asnumpy()), float(n_tokens.asnumpy()), named


@pytest.mark.parametrize("family", ["qwen2.5vl", "qwen3vl"])
@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float16", 2e-2)])
def test_chunked_loss_equals_whole_logits(tiny_model_factory, family, dtype, rtol):
    model_dir = tiny_model_factory(family)
    samples, pad = _samples(model_dir)
    batch = collate_padded(samples, pad)
    rows = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
    vocab = int(load_model(model_dir).lm_head.weight.shape[0])
    values = 64 * vocab  # chunks of at most 64 rows: several
    assert rows > 2 * chunk_rows(rows, vocab, values)
    whole = _loss_and_grads(model_dir, batch, dtype, None)
    chunked = _loss_and_grads(model_dir, batch, dtype, values)
    assert chunked[1] == whole[1]
    assert chunked[0] == pytest.approx(whole[0], rel=rtol)
    assert whole[2].keys() == chunked[2].keys() and any("lm_head" in k or "embed_tokens" in k for k in whole[2])
    for name, grad in whole[2].items():
        np.testing.assert_allclose(chunked[2][name], grad, rtol=rtol, atol=rtol * np.abs(grad).max(), err_msg=name)


def test_frozen_head_gets_no_gradient_and_passes_the_same_one_down(tiny_model_factory):
    model_dir = tiny_model_factory("qwen2.5vl")
    samples, pad = _samples(model_dir)
    batch = collate_padded(samples, pad)
    vocab = int(load_model(model_dir).lm_head.weight.shape[0])
    flags = ("--tune_mm_llm", "False", "--tune_mm_vision", "True")  # merger and vision train, LLM + head frozen
    whole = _loss_and_grads(model_dir, batch, "float32", None, *flags)
    chunked = _loss_and_grads(model_dir, batch, "float32", 64 * vocab, *flags)
    assert not any("lm_head" in k or "embed_tokens" in k for k in chunked[2])
    for name, grad in whole[2].items():
        np.testing.assert_allclose(chunked[2][name], grad, rtol=1e-5, atol=1e-5 * np.abs(grad).max(), err_msg=name)
