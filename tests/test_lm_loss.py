"""The chunked LM loss (qwenvl/model/lm_loss.py) against the whole-logits loss (`layers.causal_lm_loss_sum`):
same loss and gradients with several chunks and padded rows, in float32, through the half-precision weight
source, and with the head frozen."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwenvl.data.collators import collate_padded
from qwenvl.model import load_model
from qwenvl.model.lm_loss import _ChunkedCrossEntropyWithGrads, chunk_rows, whole_logits_fit
from qwenvl.train.argument import parse_args
from qwenvl.train.freezing import apply_tuning_flags
from qwenvl.train.optimizer import build_optimizer
from qwenvl.train.param_groups import build_param_groups
from qwenvl.train.train_step import TrainStep
from tests.test_train_layouts import _samples


def test_the_training_loss_has_its_own_backward_pass():
    """The memory bound rests on the hand-written backward (gradients computed chunk by chunk in the forward
    pass); autodiff would keep every chunk's logits and compute the same numbers, so equal gradients alone would
    not show it is in use."""
    assert "bprop" in vars(_ChunkedCrossEntropyWithGrads)


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


_COUNT_HEAD_MATMULS = """
import sys
from pathlib import Path
import numpy as np
from qwenvl.data.collators import collate_padded
from qwenvl.model import load_model
from qwenvl.runtime import graph_mode, select_device
from qwenvl.train.argument import parse_args
from qwenvl.train.freezing import apply_tuning_flags
from qwenvl.train.optimizer import build_optimizer
from qwenvl.train.param_groups import build_param_groups
from qwenvl.train.train_step import TrainStep
from tests.test_train_layouts import _samples

model_dir, values = Path(sys.argv[1]), int(sys.argv[2])
select_device()
with graph_mode():
    model = load_model(model_dir)
    model_args, _, training = parse_args(["--tune_mm_llm", "True", "--tune_mm_mlp", "True"])
    apply_tuning_flags(model, model_args)
    model.set_train(True)
    step = TrainStep(model, build_optimizer(build_param_groups(model, training), training), training)
    model.prepare_loss(values)
    samples, pad = _samples(model_dir)
    inputs = model.prepare_inputs(collate_padded(samples, pad))
    step.forward_backward(inputs)
    print("TIMED STEP", flush=True)
    step.forward_backward(inputs)
"""


def test_each_chunk_of_logits_is_computed_once_per_step(tiny_model_factory, tmp_path):
    """The compiled training step multiplies the head weight into a chunk's logits once (forward pass), never again
    in the backward pass; read from oneDNN's log of the matmuls MindSpore's CPU kernels run (`DNNL_VERBOSE`)."""
    model_dir = tiny_model_factory("qwen2.5vl")
    samples, pad = _samples(model_dir)
    input_ids = collate_padded(samples, pad)["input_ids"]
    rows = input_ids.shape[0] * (input_ids.shape[1] - 1)
    vocab, hidden = (int(n) for n in load_model(model_dir).lm_head.weight.shape)
    values = 64 * vocab
    chunk = chunk_rows(rows, vocab, values)
    script = tmp_path / "count.py"  # MindSpore compiles graphs from source files only
    script.write_text(_COUNT_HEAD_MATMULS)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DNNL_VERBOSE": "1", "GLOG_v": "3", "QWENVL_DEVICE": "CPU", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(script), str(model_dir), str(values)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    step_log = done.stdout.split("TIMED STEP", 1)[1]
    shapes = [line.split(",")[-2] for line in step_log.splitlines() if line.startswith("dnnl_verbose,exec,cpu,matmul")]
    logits = f"{chunk}x{hidden}:{hidden}x{vocab}:{chunk}x{vocab}"
    assert rows > 2 * chunk and shapes.count(logits) == -(-rows // chunk), shapes


def test_evaluation_takes_the_chunked_loss_without_gradients(tiny_model_factory):
    """With the model in evaluation mode (as `Trainer.evaluate` compiles it) the chunked loss computes the loss
    alone, and it equals the whole-logits loss."""
    import mindspore as ms

    model_dir = tiny_model_factory("qwen2.5vl")
    samples, pad = _samples(model_dir)
    batch = collate_padded(samples, pad)
    model = load_model(model_dir)
    vocab = int(model.lm_head.weight.shape[0])
    inputs = model.prepare_inputs(batch)
    names = list(inspect.signature(model.construct).parameters)
    positional = [inputs.get(name) for name in names[: max(names.index(name) for name in inputs) + 1]]

    def forward(*values):
        return model(*values)

    model.set_train(False)
    whole = [float(t.asnumpy()) for t in ms.jit(forward)(*positional)]
    model.prepare_loss(64 * vocab)
    assert not model.lm_loss.training
    chunked = [float(t.asnumpy()) for t in ms.jit(forward)(*positional)]
    assert chunked[1] == whole[1] and chunked[0] == pytest.approx(whole[0], rel=1e-5)
