"""Attention within segments (the samples of a packed row, the real tokens of a padded row, the frames and
windows of the vision towers), described by one segment id per position: O(L) inputs, no L x L mask.

Ascend: the fused flash-attention kernel in TND layout, the segments given as cumulative lengths
(`tnd_lengths`, built on the host). CPU: the fused kernel of `cpu_attention` (flash attention's scheme in C++,
for head sizes it instantiates) when it builds on the host; otherwise (and in the tests that name it) the blocked
twin here: the same maths in blocks of query rows, the mask of each block built inside the graph from the segment
ids, and a hand-written backward that recomputes each block's scores and probabilities (as flash attention does): what is kept for the backward
pass is q, k, v and the output, never a (rows x keys) tensor, so memory grows linearly with the sequence and
with the number of packed samples. Each block waits for the previous one (`ops.depend`), so one block's
transients are alive at a time; causal blocks stop near their last row. Shorter sequences (unchained blocks)
build each block's mask once per step, for every layer (`_scores`).
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.ops import constexpr

from qwenvl.model.cpu_attention import fused_head_dim, shared_fused_attention
from qwenvl.model.device import on_ascend
from qwenvl.model.shared_cells import shared_cell
from qwenvl.model.tensor_ops import unsqueeze

NEG_INF = -1e9
QUERY_BLOCK = 512  # rows per block on CPU: the largest transient is (batch, heads, 512, keys) scores

_BMM = ops.BatchMatMul()
_BMM_NT = ops.BatchMatMul(transpose_b=True)
_BMM_TN = ops.BatchMatMul(transpose_a=True)
_SOFTMAX = ops.Softmax(-1)  # the fused kernel: ~13x faster on CPU than max, exp, sum and divide as separate ops




@constexpr
def _causal_block(rows: int, start: int, lo: int, keys: int) -> Tensor:
    """(rows, keys) bool: query start + i may see key lo + j <= start + i."""
    return Tensor(lo + np.arange(keys)[None, :] <= (start + np.arange(rows))[:, None])


def _key_span(stop: int, block: int, length: int) -> int:
    """Keys a chained causal block of rows ending at `stop` computes: `stop` rounded up to block x a power of
    two. The causal mask hides the extra keys. Exact spans would give every block a different size, and
    MindSpore's CPU memory pool serves each new size with fresh memory (measured: a causal 8192-token row
    then holds ~2x the transients of 8 rows of 1024); a few size classes let later blocks reuse the memory
    of earlier ones, for at most 2x (on average ~1.3x) the score computations of exact spans."""
    keys = block
    while keys < stop:
        keys *= 2
    return min(keys, length)


CHAIN_BYTES = 2**28  # blocks whose float32 scores together exceed this run one after another


def _key_range(start: int, stop: int, length: int, causal: bool, reach: int) -> tuple[int, int]:
    """Keys [lo, hi) rows [start, stop) can see: all (causal: up to the last row), or with segments of at most
    `reach` positions only those within reach - 1 of the block."""
    hi = stop if causal else length
    if not reach:
        return 0, hi
    return max(0, start - reach + 1), min(hi, stop + reach - 1)


@constexpr
def _plan_blocks(batch: int, heads: int, length: int, block: int, causal: bool, reach: int) -> tuple:
    """(chained, ((start, stop, lo, hi), ...)): the blocks of query rows and the keys [lo, hi) each computes.
    Chained (one after another, largest first, causal spans from 0 in size classes) only when the blocks'
    float32 scores together exceed CHAIN_BYTES; smaller ones run as the runtime schedules them, in parallel,
    which is faster for short sequences."""
    spans = [(start, min(start + block, length)) for start in range(0, length, block)]
    exact = tuple((start, stop) + _key_range(start, stop, length, causal, reach) for start, stop in spans)
    if batch * heads * sum((stop - start) * (hi - lo) for start, stop, lo, hi in exact) * 4 <= CHAIN_BYTES:
        return False, exact
    if not causal or reach:
        return True, exact[::-1]
    return True, tuple((start, stop, 0, _key_span(stop, block, length)) for start, stop in reversed(spans))


def _f32(x):
    return ops.cast(x, ms.float32)


def _span(x, start: int, stop: int, axis: int = 2):
    """Positions [start, stop) of `axis`, or `x` itself when that is all of them (a slice is a copy on CPU)."""
    if start == 0 and stop == x.shape[axis]:
        return x
    if axis == 1:
        return x[:, start:stop]
    return x[:, :, start:stop]


def _mask_bias(seg, start: int, stop: int, lo: int, hi: int, causal: bool):
    """(B, 1, rows, keys) float32 added to the scores: 0 where query start + i may see key lo + j (same
    segment; causal: not after it), NEG_INF elsewhere. Added rather than filled in: MindSpore's CPU MaskedFill
    takes ~4x the time of broadcasting a float32 bias over the heads and adding it (4 x 512 x 512 scores)."""
    rows = _span(seg, start, stop, 1)
    rows = ops.select(rows < 0, -rows - 1, rows)  # padding queries belong to their row's segment
    rows, keys = _f32(unsqueeze(rows, 2)), _f32(unsqueeze(_span(seg, lo, hi, 1), 2))
    # row id - key id for every pair as one matmul, [rows, 1] @ [1, -keys]^T (ids < 2^24 are exact in float32):
    # half the time of broadcasting both id vectors to (rows, keys) and comparing
    allowed = _BMM_NT(_with_ones_column(rows), ops.cat((ops.ones_like(keys), -keys), -1)) == 0
    if causal:
        allowed = ops.logical_and(allowed, _expand(_causal_block(stop - start, start, lo, hi - lo), allowed))
    # from the comparison's result by two scalar operations: no (rows, keys) constant in the compiled graph
    return unsqueeze(ops.cast(allowed, ms.float32) * -NEG_INF + NEG_INF, 1)


def _expand(small, like):
    """Explicit broadcast (MindSpore's CPU kernels for implicitly broadcasting binary ops keep index maps)."""
    return ops.broadcast_to(small, like.shape)


def _with_ones_column(x):
    """(..., D) -> (..., D + 1), the last column ones: a matmul with it adds a per-row term to every product."""
    return ops.cat((x, ops.ones(x.shape[:-1] + (1,), x.dtype)), -1)


def _repeat_heads(x, n_rep: int):
    """(B, Hkv, L, D) -> (B, Hkv*n_rep, L, D), each kv head repeated in place (HF repeat_kv)."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return ops.broadcast_to(unsqueeze(x, 2), (b, h, n_rep, length, d)).reshape(b, h * n_rep, length, d)


def _sum_heads(x, n_rep: int):
    """The gradient of `_repeat_heads`: (B, Hkv*n_rep, L, D) summed back to (B, Hkv, L, D)."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x.reshape(b, h // n_rep, n_rep, length, d).sum(2)


class _BlockedAttention(nn.Cell):
    """softmax(q k^T * scale + mask) v over query blocks; the backward pass recomputes the probabilities.

    The reach (see `SegmentAttention`) is the constructor's, else the length of the optional `reach` input,
    whose values are never read: a static bound that comes with the data, and a new one compiles a new graph."""

    def __init__(self, scale: float, causal: bool, block: int = QUERY_BLOCK, reach: int = 0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.causal = causal
        self.block = int(block)
        self.reach = int(reach)

    def _scores(self, q, k, seg, start: int, stop: int, lo: int, hi: int, after):
        """Masked, scaled float32 scores of rows [start, stop) against keys [lo, hi): (B, H, rows, keys).
        Unchained, a block's mask bias is the same expression of the segment ids in every layer and in the
        backward pass, and the compiler computes it once per step; chained, it waits for `after` (below) and
        is built per use, so the masks of a long sequence are never alive together.

        Computed only once `after` (the previous block's result) exists: left alone, the scheduler runs every
        block's first matmul up front and every block's transients are alive at once, so memory would grow
        with the number of blocks (the sequence length) times the keys."""
        if after is not None:  # the mask waits too: it depends on nothing else, so it would be built first
            q, seg = ops.depend(q, after), ops.depend(seg, after)
        scores = _BMM_NT(_f32(_span(q, start, stop)) * self.scale, _f32(_span(k, lo, hi)))
        return scores + _expand(_mask_bias(seg, start, stop, lo, hi, self.causal), scores)

    def _reach(self, reach) -> int:
        if self.reach or reach is None:
            return self.reach
        return reach.shape[0]

    def construct(self, q, k, v, seg, reach=None):
        n_rep = q.shape[1] // k.shape[1]
        k, v = _repeat_heads(k, n_rep), _repeat_heads(v, n_rep)
        outs = []
        chain, blocks = _plan_blocks(q.shape[0], q.shape[1], q.shape[2], self.block, self.causal, self._reach(reach))
        for start, stop, lo, hi in blocks:
            scores = self._scores(q, k, seg, start, stop, lo, hi, outs[-1] if outs and chain else None)
            outs.append(ops.cast(_BMM(_SOFTMAX(scores), _f32(_span(v, lo, hi))), q.dtype))
        if len(outs) == 1:
            return outs[0]
        return ops.cat(outs[::-1] if chain else outs, 2)  # chained: computed last block first

    def bprop(self, q, k, v, seg, reach, out, dout):
        # everything recomputed here waits for the incoming gradient: the scheduler would otherwise run the
        # recomputation of every layer at the start of the backward pass, keeping all of them at once
        d_out = _f32(dout)
        q, k, v = ops.depend(q, d_out), ops.depend(k, d_out), ops.depend(v, d_out)
        n_rep = q.shape[1] // k.shape[1]
        kr = _repeat_heads(k, n_rep)
        v_ones = _with_ones_column(_f32(_repeat_heads(v, n_rep)))
        output = out
        length = q.shape[2]
        dq_blocks, dk, dv = [], None, None
        chain, blocks = _plan_blocks(q.shape[0], q.shape[1], length, self.block, self.causal, self._reach(reach))
        for start, stop, lo, hi in blocks:
            after = dk if dq_blocks and chain else None
            if after is not None:  # every input of this block waits for the previous one (see `_scores`)
                d_out, output, v_ones = (ops.depend(t, after) for t in (d_out, output, v_ones))
            probs = _SOFTMAX(self._scores(q, kr, seg, start, stop, lo, hi, after))
            grad_out = _span(d_out, start, stop)
            dv_block = _BMM_TN(probs, grad_out)  # (B, H, keys, D)
            delta = (grad_out * _f32(_span(output, start, stop))).sum(-1, keepdims=True)
            # (dout v^T - delta) * scale as one matmul: [dout * scale, -delta * scale] @ [v, 1]^T; broadcasting
            # the (rows, 1) column over the keys instead costs ~4x the matmul on CPU (BroadcastTo, then Sub)
            centred = _BMM_NT(ops.cat((grad_out * self.scale, delta * -self.scale), -1), _span(v_ones, lo, hi))
            d_scores = probs * centred
            dq_blocks.append(_BMM(d_scores, _f32(_span(kr, lo, hi))))
            dk_block = _BMM_TN(d_scores, _f32(_span(q, start, stop)))
            if lo > 0:
                before = ops.zeros((dk_block.shape[0], dk_block.shape[1], lo, dk_block.shape[3]), ms.float32)
                dv_block, dk_block = ops.cat((before, dv_block), 2), ops.cat((before, dk_block), 2)
            if hi < length:
                after_keys = ops.zeros((dk_block.shape[0], dk_block.shape[1], length - hi, dk_block.shape[3]),
                                       ms.float32)  # fmt: skip
                dv_block, dk_block = ops.cat((dv_block, after_keys), 2), ops.cat((dk_block, after_keys), 2)
            dv = dv_block if dv is None else dv + dv_block
            dk = dk_block if dk is None else dk + dk_block
        dq = dq_blocks[0] if len(dq_blocks) == 1 else ops.cat(dq_blocks[::-1] if chain else dq_blocks, 2)
        dq = ops.cast(dq, q.dtype)
        dk, dv = ops.cast(_sum_heads(dk, n_rep), k.dtype), ops.cast(_sum_heads(dv, n_rep), v.dtype)
        return (dq, dk, dv, ops.zeros_like(seg),
                None if reach is None else ops.zeros_like(reach))


def shared_blocked_attention(scale: float, causal: bool, reach: int = 0, block: int = QUERY_BLOCK) -> _BlockedAttention:
    """The `_BlockedAttention` of this configuration, shared by every layer that has it (`shared_cells`)."""
    key = (_BlockedAttention, float(scale), bool(causal), int(reach), int(block))
    return shared_cell(key, lambda: _BlockedAttention(float(scale), bool(causal), block=int(block), reach=int(reach)))


class SegmentAttention(nn.Cell):
    """Attention of (B, H, L, D) queries on (B, Hkv, L, D) keys/values within equal segment ids (B, L),
    causal or not; returns (B, L, H*D). A negative id -(s + 1) marks padding: seen by no query, itself
    querying segment s. `lengths` (Ascend only): `tnd_lengths` of the same ids, where padding forms its own
    segments (their outputs are never used). The reach: no real segment is longer, so the CPU twin computes
    each block of queries against the keys within reach of it only. It is fixed by the model for Qwen2.5-VL's
    windows (`reach` > 0), or given per call as the length of a `reach` input (the longest vision frame the
    data can hold, `vision_reach`). A padding segment may be longer: its rows then see part of it, and their
    outputs are unused as always."""

    def __init__(self, scale: float, causal: bool, reach: int = 0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.causal = causal
        self.core = shared_blocked_attention(scale, causal, reach)
        fused = None if on_ascend() else shared_fused_attention(scale, causal)
        self.use_fused = fused is not None
        self.fused = fused if fused is not None else self.core  # (an attribute graph mode can always resolve)

    def construct(self, q, k, v, seg, lengths=None, reach=None):
        b, h, length, d = q.shape
        if on_ascend() and lengths is not None and q.dtype != ms.float32:
            return self._flash(q, k, v, lengths).reshape(b, length, h * d)
        if self.use_fused and fused_head_dim(d):
            return self.fused(q, k, v, seg)[0].reshape(b, length, h * d)
        out = self.core(q, k, v, seg, reach)
        return swap_middle_axes(out).reshape(b, length, h * d)

    def _flash(self, q, k, v, lengths):
        """Ascend's fused kernel in TND layout: (B*L, heads, D) with the segments' cumulative lengths."""
        b, h, length, d = q.shape
        tokens = lambda t: swap_middle_axes(t).reshape(b * length, t.shape[1], d)  # noqa: E731
        sparse = 3 if self.causal else 0
        return ops.flash_attention_score(tokens(q), tokens(k), tokens(v), h, attn_mask=_causal_2048(self.causal),
                                         actual_seq_qlen=lengths, actual_seq_kvlen=lengths, scalar_value=self.scale,
                                         pre_tokens=2147483647, next_tokens=0 if self.causal else 2147483647,
                                         input_layout="TND", sparse_mode=sparse)  # fmt: skip


@constexpr
def _causal_2048(causal: bool):
    """The compressed causal mask flash attention takes with sparse_mode 3 (True above the diagonal)."""
    if not causal:
        return None
    return Tensor(np.triu(np.ones((2048, 2048), np.uint8), 1))


@constexpr
def _swapped_rows(batch: int, first: int, second: int) -> Tensor:
    """Row order taking (batch, first, second) rows to (batch, second, first)."""
    rows = np.arange(batch * first * second, dtype=np.int32).reshape(batch, first, second)
    return Tensor(rows.transpose(0, 2, 1).reshape(-1))


class SwapMiddleAxes(nn.Cell):
    """(B, A, C, D) -> (B, C, A, D), e.g. (batch, length, heads, head_dim) to heads-major and back.

    On CPU a row gather with a gather back in the backward pass: MindSpore's CPU Transpose kernel keeps an
    8-byte index per element for the life of the compiled graph, once per transpose in the unrolled model.
    """

    def construct(self, x):
        if on_ascend():
            return ops.transpose(x, (0, 2, 1, 3))
        b, a, c, d = x.shape
        return ops.gather(x.reshape(b * a * c, d), _swapped_rows(b, a, c), 0).reshape(b, c, a, d)

    def bprop(self, x, out, dout):
        return (self.construct(dout),)


swap_middle_axes = SwapMiddleAxes()


# ----------------------------------------------------------------------------------- host-side (numpy)


def segment_ids(length: int, cu_seqlens: np.ndarray) -> np.ndarray:
    """(length,) index of the cu_seqlens segment each position falls in."""
    return np.searchsorted(np.asarray(cu_seqlens)[1:], np.arange(length), side="right").astype(np.int32)


def text_segment_ids(batch_size: int, length: int, attention_mask: np.ndarray | None = None,
                     cu_seqlens: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """(B, L) int32 segment ids of the language model: the samples of a flattened/packed row (`cu_seqlens`),
    and padding (`attention_mask` False) as -(s + 1): no query sees it as a key, and as a query it belongs to
    segment s, seeing the real keys before it as Hugging Face's padding mask does (its output is unused)."""
    seg = np.zeros((batch_size, length), np.int32)
    if cu_seqlens is not None:
        seg[:] = segment_ids(length, cu_seqlens)[None]
    if attention_mask is not None:
        seg = np.where(np.asarray(attention_mask, bool), seg, -seg - 1).astype(np.int32)
    return seg


def tnd_lengths(segments: np.ndarray) -> np.ndarray:
    """Cumulative lengths (int64) of the runs of equal ids over the flattened (B*L) positions: flash attention's
    actual_seq_qlen/kvlen in TND layout. A row boundary always ends a run."""
    seg = np.asarray(segments)
    flat = seg.reshape(-1)
    starts = np.ones(flat.size, bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[:: seg.shape[-1]] = True
    bounds = np.append(np.flatnonzero(starts)[1:], flat.size)
    return bounds.astype(np.int64)


def with_tnd_lengths(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """On Ascend, each `<name>_segments` input gets its `<name>_lengths` (flash attention's TND lengths);
    elsewhere the inputs are returned as they are (an unused input would still be part of the compiled shape)."""
    if ms.get_context("device_target") != "Ascend":
        return arrays
    lengths = {k.replace("_segments", "_lengths"): tnd_lengths(v) for k, v in arrays.items() if k.endswith("_segments")}
    return {**arrays, **lengths}
