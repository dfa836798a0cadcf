"""The language-model loss straight from the last hidden states, the vocabulary logits one chunk of rows at a time
once they exceed CHUNK_VALUES (smaller ones take the plain loss: `ChunkedLossHead._loss`).

Why: the (tokens x vocab) float32 logits are the largest tensor of a step (8192 tokens x 151936 = 5 GB, and
autodiff would keep them and their gradient besides). In training the forward pass computes each chunk's logits,
their log-softmax, the chunk's loss and its logits gradient, and multiplies that into the hidden-state and head
weight gradients at once; the backward pass only scales those two by the incoming gradient. At most one chunk of
logits exists at a time (the chunks are chained with `ops.depend`, and all have one size so MindSpore's memory
pool reuses one block), and none is computed twice. Evaluation computes the losses alone. The head weight is
read as `MatrixLayer` reads it: as stored, or through its `WeightSource` (half precision on CPU, ZeRO-3 shards
gathered).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import constexpr

from qwenvl.constants import IGNORE_INDEX
from qwenvl.model.layers import causal_lm_loss_sum
from qwenvl.model.weight_ops import MATMUL_NT, WeightSource, matmul_dtype

CHUNK_VALUES = 2**27  # logits per chunk (512 MiB in float32)
_MM_NN = ops.MatMul()
_MM_TN = ops.MatMul(transpose_a=True)
# the fused kernel: on CPU several times faster than max, subtract, exp and sum as separate ops, each of which
# would also broadcast a (rows, 1) column to (rows, vocab)
_LOG_SOFTMAX = ops.LogSoftmax(-1)


@constexpr
def chunk_rows(rows: int, vocab: int, values: int = CHUNK_VALUES) -> int:
    """Rows per chunk: the rows split evenly into as few chunks as keep each within `values` logits (at least
    64 rows), rounded up to a multiple of 8; all rows when they fit. Even chunks pad at most a few rows."""
    most = max(64, values // max(vocab, 1))
    if rows <= most:
        return rows
    chunks = -(-rows // most)
    size = -(-rows // chunks)
    return -(-size // 8) * 8


@constexpr
def whole_logits_fit(rows: int, vocab: int, values: int = CHUNK_VALUES) -> bool:
    """Whether the logits fit in one chunk: then the plain loss (autodiff keeps the logits, no recomputation)
    is both as small and faster."""
    return rows * vocab <= values


@constexpr
def _padded_rows(rows: int, chunk: int) -> int:
    return -(-rows // chunk) * chunk


def _row_weights(valid, start: int, stop: int, like):
    """(rows, like's width) weight of each row's loss: 1.0 for a supervised row, 0.0 otherwise."""
    return ops.broadcast_to(valid[start:stop].reshape(-1, 1), (stop - start, like.shape[-1]))


class _ChunkedLoss(nn.Cell):
    """The chunk loop shared by the two losses below: the head weight read through `source` (or as stored when it
    is None), logits of rows [start, stop) chained after `after`."""

    def __init__(self, source: WeightSource | None, values: int) -> None:
        super().__init__()
        self.source = source
        self.values = values

    def _weight(self, stored, anchor, dtype):
        if self.source is None:
            return ops.cast(ops.depend(stored, anchor), dtype)
        return self.source.full(stored, anchor, dtype)

    def _logits(self, h, w, start: int, stop: int, after):
        rows = h[start:stop] if after is None else ops.depend(h, after)[start:stop]
        return ops.cast(MATMUL_NT(ops.cast(rows, w.dtype), w), ms.float32)

    def _chunk_loss(self, log_p, target, valid, start: int, stop: int):
        picked = ops.gather_elements(log_p, 1, target[start:stop].reshape(-1, 1)).reshape(-1)
        return -(picked * valid[start:stop]).sum()


class _ChunkedCrossEntropy(_ChunkedLoss):
    """(sum of -log softmax(h W^T)[target] over valid rows, count of valid rows) for 2-D h; `valid` is 1.0 / 0.0
    per row. Forward only: what evaluation runs (training takes `_ChunkedCrossEntropyWithGrads`)."""

    def construct(self, h, target, valid, stored):
        w = self._weight(stored, h, matmul_dtype(h.dtype))
        chunk = chunk_rows(h.shape[0], w.shape[0], self.values)
        total = None
        for start in range(0, h.shape[0], chunk):
            log_p = _LOG_SOFTMAX(self._logits(h, w, start, start + chunk, total))
            part = self._chunk_loss(log_p, target, valid, start, start + chunk)
            total = part if total is None else total + part
        return total, valid.sum()


class _ChunkedCrossEntropyWithGrads(_ChunkedLoss):
    """The same loss for training, with its gradients computed in the same pass over the chunks (as Liger-Kernel's
    fused linear cross-entropy does): (loss_sum, count, d loss_sum / d h, d loss_sum / d W) with W the full
    head weight (a float32 scalar placeholder for a frozen head, which gets no weight gradient at all).

    Each chunk's logits become its log-softmax, its loss and its logits gradient (softmax - onehot, rows weighted
    by `valid`), which is multiplied into the hidden-state gradient and added into the weight gradient before the
    next chunk's logits exist. The backward pass only scales the two by the incoming gradient: no chunk's logits
    are computed twice (recomputing them in the backward pass cost a third of the head's matmuls, the largest of
    a step at vocabulary 151936), and the head weight is not read (ZeRO-3: not gathered) a second time.
    """

    def __init__(self, source: WeightSource | None, values: int, trainable: bool) -> None:
        super().__init__(source, values)
        self.trainable = trainable

    def construct(self, h, target, valid, stored):
        w = self._weight(stored, h, matmul_dtype(h.dtype))
        w32 = ops.cast(w, ms.float32)
        chunk = chunk_rows(h.shape[0], w.shape[0], self.values)
        total, dh_chunks, dw, after = None, [], ops.zeros((), ms.float32), None
        for start in range(0, h.shape[0], chunk):
            stop = start + chunk
            log_p = _LOG_SOFTMAX(self._logits(h, w, start, stop, after))
            part = self._chunk_loss(log_p, target, valid, start, stop)
            total = part if total is None else total + part
            onehot = ops.one_hot(target[start:stop], w.shape[0], ops.ones((), ms.float32), ops.zeros((), ms.float32))
            d_logits = ops.exp(log_p) - onehot
            dh = _MM_NN(d_logits, w32)
            dh_chunks.append(dh * _row_weights(valid, start, stop, dh))
            after = dh_chunks[-1]
            if self.trainable:
                rows = ops.cast(h[start:stop], ms.float32)
                part_w = _MM_TN(d_logits, rows * _row_weights(valid, start, stop, rows))
                dw = part_w if start == 0 else dw + part_w  # no zero-filled start
                after = ops.depend(after, dw)  # this chunk's logits gradient is spent before the next logits exist
        return total, valid.sum(), ops.cat(dh_chunks, 0), dw

    def bprop(self, h, target, valid, stored, out, dout):
        d_loss = dout[0]  # a 0-d tensor: the products below broadcast it without per-element index maps
        dh = ops.cast(out[2] * d_loss, h.dtype)
        if not self.trainable:
            return dh, ops.zeros_like(target), ops.zeros_like(valid), ops.zeros((), stored.dtype)
        dw = out[3] * d_loss
        if self.source is None:
            dw_stored = ops.cast(dw, stored.dtype).reshape(stored.shape)
        else:
            dw_stored = self.source.grad(ops.cast(dw, self.source.compute_dtype), stored)
        return ops.depend(dh, dw_stored), ops.zeros_like(target), ops.zeros_like(valid), dw_stored


class ChunkedLmLoss(nn.Cell):
    """Shifted causal-LM loss of a head `MatrixLayer` on hidden states: (loss_sum, n_tokens), the numbers of
    `layers.causal_lm_loss_sum(head(hidden), labels)` without the logits tensor. Built for the head's
    source and trainability of the step being compiled (`lm_loss_for`)."""

    def __init__(self, source: WeightSource | None, trainable: bool, weight_shape: tuple[int, int],
                 values: int = CHUNK_VALUES) -> None:  # fmt: skip
        super().__init__()
        self.core = _ChunkedCrossEntropyWithGrads(source, values, trainable)
        self.forward_only = _ChunkedCrossEntropy(source, values)
        self.weight_shape = tuple(weight_shape)
        self.values = int(values)

    def construct(self, hidden, labels, stored):
        vocab, d_in = self.weight_shape
        h = hidden[:, :-1].reshape(-1, d_in)
        target = labels[:, 1:].reshape(-1)
        rows = h.shape[0]
        padded = _padded_rows(rows, chunk_rows(rows, vocab, self.values))
        if padded != rows:  # every chunk one size (one memory block reused); the extra rows are not counted
            h = ops.cat((h, ops.zeros((padded - rows, d_in), h.dtype)), 0)
            target = ops.cat((target, ops.fill(target.dtype, (padded - rows,), IGNORE_INDEX)), 0)
        valid = ops.cast(target != IGNORE_INDEX, ms.float32)
        if self.core.source is None and len(stored.shape) != 2:
            stored = stored.reshape(self.weight_shape)
        if not self.training:
            return self.forward_only(h, ops.maximum(target, 0), valid, stored)
        loss_sum, count, _, _ = self.core(h, ops.maximum(target, 0), valid, stored)
        return loss_sum, count


def lm_loss_for(head: nn.Cell, values: int = CHUNK_VALUES) -> ChunkedLmLoss:
    """The chunked loss of `head` (a `MatrixLayer`) as it stands now: its source and `requires_grad`."""
    return ChunkedLmLoss(head.source, bool(head.weight.requires_grad), head.weight_shape, values)


class ChunkedLossHead:
    """Mixin of the model cells: the loss of `self.lm_head` on hidden states, chunked once `prepare_loss` ran
    (`weight_ops.sync_trainable`, before a training step compiles), else through the whole logits.
    `init_loss` (in the model's __init__) declares the child cell slot."""

    def init_loss(self) -> None:
        self._cells["lm_loss"] = None

    def prepare_loss(self, values: int = CHUNK_VALUES) -> None:
        self.lm_loss = lm_loss_for(self.lm_head, values)

    def loss_after_layers(self, x, labels):
        """(loss_sum, n_tokens) from the last decoder layer's output: the final norm, then the loss."""
        return self._loss(self.model.language_model.norm(x), labels)

    def _loss(self, hidden, labels):
        rows = hidden.shape[0] * (hidden.shape[1] - 1)
        if self.lm_loss is None or whole_logits_fit(rows, self.lm_head.weight_shape[0], self.lm_loss.values):
            return causal_lm_loss_sum(ops.cast(self.lm_head(hidden[:, :-1]), ms.float32), labels)
        return self.lm_loss(hidden, labels, self.lm_head.weight)
