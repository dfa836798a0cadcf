"""Building blocks shared by the native Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Cells keep parameters in torch layouts (Linear weight (out, in)), stored in the model's compute dtype
(`parameter_dtype`; float32 master copies of trainable weights live in the optimizer), and compute in the
dtype of their input, so the model picks the compute dtype once by casting its embeddings. Softmax, norms
and the loss run in float32. Each Ascend fused kernel sits behind one small selector function with a plain
path computing the same thing, which is what CPU runs and tests exercise.

Memory rule for graph mode: never derive a weight-sized tensor (transpose, cast, gather) that no activation
depends on. MindSpore's scheduler runs such ops at the start of the step, so every layer's copy is alive
at once, and autodiff keeps them until the backward pass; matmuls therefore consume weights as stored.

The second half holds host-side (numpy) helpers for `prepare_inputs`: everything data-dependent (masks,
gather indices, vision rotary ids) is computed there so the compiled graph has no data-dependent control flow.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from qwenvl.constants import IGNORE_INDEX
from qwenvl.model.attention import swap_middle_axes
from qwenvl.model.device import on_ascend, on_cpu
from qwenvl.model.tensor_ops import unsqueeze
from qwenvl.model.weight_ops import MATMUL_NT, HalfOnCPU, Lookup, MatmulNT, WeightSource, attach_sources, shared_op

DTYPES = {"float32": ms.float32, "bfloat16": ms.bfloat16, "float16": ms.float16}


def matmul(a, b):
    """ops.matmul in the inputs' dtype; half precision on CPU is multiplied in float32 and rounded back (see
    `weight_ops.HalfOnCPU` for why)."""
    if on_cpu() and a.dtype != ms.float32:
        return ops.cast(ops.matmul(ops.cast(a, ms.float32), ops.cast(b, ms.float32)), a.dtype)
    return ops.matmul(a, b)


def expand_as(small, like):
    """`small` broadcast to `like`'s shape by its own op.

    MindSpore's CPU kernels for binary ops that broadcast implicitly keep per-element index maps (about 16
    bytes per output element) for the life of the compiled graph, one per op in the unrolled model; an
    explicit BroadcastTo followed by a same-shape op keeps none.
    """
    return ops.broadcast_to(small, like.shape)




def compute_dtype(name: str) -> ms.Type:
    """The MindSpore dtype for a model's `dtype=` name. bfloat16 is refused on CPU up front: MindSpore's
    CPU backend has no bfloat16 kernels for Mul, MatMul or Gather (float16 works there, matmuls in float32)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    if name == "bfloat16" and ms.get_context("device_target") == "CPU":
        raise ValueError("bfloat16 compute needs an Ascend or GPU device: MindSpore's CPU backend lacks bfloat16 "
                         "kernels; train in float32 (no dtype flag) or float16 (--fp16 True) on CPU")
    return DTYPES[name]


def activation_dtype(stored: ms.Type) -> ms.Type:
    """The dtype activations flow in for weights stored in `stored`: the same, except half precision on CPU,
    which computes in float32 (the weights stay stored in half precision and are read through `HalfOnCPU`; their
    gradients are half precision too, so fp16 loss scaling still sees overflows). Why: each of MindSpore 2.7's
    CPU float16 element-wise kernels (Mul, Add, SiLU, ...) keeps a private workspace of about 16 bytes per
    element for the life of the compiled graph (measured: 64 MiB per Mul of a 2048 x 2048 float16 tensor, none
    in float32 or for Cast), so a float16 decoder layer held about 4x the working memory of a float32 one."""
    if stored != ms.float32 and on_cpu():
        return ms.float32
    return stored


_PARAMETER_DTYPE = [ms.float32]


@contextmanager
def parameter_dtype(dtype: ms.Type) -> Iterator[None]:
    """Parameters created inside the block are stored in `dtype` (a model's weights live in its compute
    dtype; float32 master copies of trainable weights belong to the optimizer)."""
    _PARAMETER_DTYPE.append(dtype)
    try:
        yield
    finally:
        _PARAMETER_DTYPE.pop()


def use_half_precision_on_cpu(model: nn.Cell, dtype: ms.Type) -> None:
    """Half-precision weights on CPU are multiplied in float32 through `HalfOnCPU` sources."""
    if dtype != ms.float32 and ms.get_context("device_target") == "CPU":
        attach_sources(model, lambda param, shape: HalfOnCPU(shape, dtype))


def zeros_parameter(*shape: int) -> Parameter:
    """A parameter allocated lazily (filled later by `init_parameters` or a checkpoint), in the current
    `parameter_dtype`."""
    return Parameter(initializer("zeros", shape, _PARAMETER_DTYPE[-1]))


def ones_parameter(*shape: int) -> Parameter:
    return Parameter(initializer("ones", shape, _PARAMETER_DTYPE[-1]))


# ----------------------------------------------------------------------------------------------- cells


class MatrixLayer(nn.Cell):
    """y = x W^T + b over the last axis of x, W read as a (d_out, d_in) matrix in its stored layout.

    The matmul consumes the weight as stored (MatMul with transpose_b, no transposed copy per step);
    x is flattened to 2-D so the weight is never broadcast over a batch. A layer given a `WeightSource`
    (`use_source`) reads the weight through `weight_ops.MatmulNT` instead (half precision on CPU, ZeRO-3).
    """

    NORMAL_INIT = ("weight",)
    SOURCED = ("weight",)

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight_shape = (d_out, d_in)
        self.source = None
        self.op = None

    def use_source(self, source: WeightSource, name: str = "weight") -> None:
        self.source = source
        self.op = shared_op(MatmulNT, source)

    def source_of(self, name: str = "weight") -> WeightSource | None:
        return self.source

    def source_shape(self, name: str = "weight") -> tuple[int, ...]:
        return self.weight_shape

    def construct(self, x):
        d_out, d_in = self.weight_shape
        if self.op is None:
            return _project(x, self.weight, self.bias, d_out, d_in)
        y = self.op(x.reshape(-1, d_in), self.weight)
        return _with_bias(y, self.bias).reshape(x.shape[:-1] + (d_out,))


def _with_bias(y, bias):
    return y if bias is None else y + expand_as(ops.cast(bias, y.dtype), y)


def _project(x, weight, bias, d_out: int, d_in: int):
    """x W^T + b for a weight used as stored; a function for the reason `rotated_heads` gives (~4 MiB of host
    memory per float32 decoder layer)."""
    y = MATMUL_NT(x.reshape(-1, d_in), weight if len(weight.shape) == 2 else weight.reshape(d_out, d_in))
    return _with_bias(y, bias).reshape(x.shape[:-1] + (d_out,))


class Linear(MatrixLayer):
    """torch's Linear: (out, in) weight layout, optional bias, output in the input's dtype."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__(d_in, d_out)
        self.weight = zeros_parameter(d_out, d_in)
        self.bias = zeros_parameter(d_out) if bias else None


class Embedding(nn.Cell):
    """Row lookup of a (vocab, dim) table, returned in the table's dtype (the caller casts), or through a
    `WeightSource` (ZeRO-3 shards), then in the source's compute dtype."""

    NORMAL_INIT = ("weight",)
    SOURCED = ("weight",)

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.weight = zeros_parameter(vocab, dim)
        self.weight_shape = (vocab, dim)
        self.source = None
        self.op = None

    def use_source(self, source: WeightSource, name: str = "weight") -> None:
        self.source = source
        self.op = shared_op(Lookup, source)

    def source_of(self, name: str = "weight") -> WeightSource | None:
        return self.source

    def source_shape(self, name: str = "weight") -> tuple[int, ...]:
        return self.weight_shape

    def construct(self, ids):
        if self.op is None:
            return ops.gather(self.weight, ids, 0)
        return self.op(ids, self.weight)


class PatchProjection(MatrixLayer):
    """HF's Conv3d patch embedding (stride == kernel) as one matmul on flattened (N, C*T*P*P) patches.

    The weight keeps the Conv3d shape (embed, C, T, P, P) so checkpoints load unchanged.
    """

    def __init__(self, in_channels: int, temporal: int, patch: int, embed_dim: int, bias: bool = False) -> None:
        super().__init__(in_channels * temporal * patch * patch, embed_dim)
        self.weight = zeros_parameter(embed_dim, in_channels, temporal, patch, patch)
        self.bias = zeros_parameter(embed_dim) if bias else None


def rms_norm(x, weight, eps: float):
    """weight * (x / rms(x)) computed in float32, returned in x's dtype (HF Qwen2RMSNorm rounding)."""
    dtype = x.dtype
    if on_ascend():
        return ops.rms_norm(x, ops.cast(weight, dtype), eps)[0]
    h = ops.cast(x, ms.float32)
    h = h * expand_as(ops.rsqrt((h * h).mean(-1, keep_dims=True) + eps), h)
    h = ops.cast(h, dtype)
    return expand_as(ops.cast(weight, dtype), h) * h


class RMSNorm(nn.Cell):
    """Qwen2/Qwen3 RMSNorm (class name must not contain "LayerNorm": weight-decay grouping reads it)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = ones_parameter(dim)
        self.eps = float(eps)

    def construct(self, x):
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Cell):
    """torch.nn.LayerNorm in float32, output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = ones_parameter(dim)
        self.bias = zeros_parameter(dim)
        self.eps = float(eps)

    def construct(self, x):
        h = ops.cast(x, ms.float32)
        centred = h - expand_as(h.mean(-1, keep_dims=True), h)
        scale = ops.rsqrt((centred * centred).mean(-1, keep_dims=True) + self.eps)
        weight, bias = ops.cast(self.weight, ms.float32), ops.cast(self.bias, ms.float32)
        h = centred * expand_as(scale, h) * expand_as(weight, h) + expand_as(bias, h)
        return ops.cast(h, x.dtype)


def quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


def gelu_exact(x):
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


ACTIVATIONS: dict[str, Callable] = {
    "silu": ops.silu,
    "quick_gelu": quick_gelu,
    "gelu": gelu_exact,
    "gelu_pytorch_tanh": gelu_tanh,
}


def activation(name: str) -> Callable:
    """HF ACT2FN equivalent for the activations the Qwen-VL configs use."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# -------------------------------------------------------------------------------------- rotary embeddings


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


def apply_rotary(x, cos, sin):
    """x * cos + rotate_half(x) * sin in float32 (cos/sin broadcast to x), returned in x's dtype.

    On Ascend, 4-D inputs (BNSD x with 11SD/B1SD cos, or BSND x with 1S1D/BS1D cos) use the fused kernel.
    """
    if on_ascend() and x.ndim == 4 and cos.ndim == 4:
        return ops.rotary_position_embedding(x, ops.cast(cos, x.dtype), ops.cast(sin, x.dtype), 0)
    h = ops.cast(x, ms.float32)
    return ops.cast(h * expand_as(cos, h) + rotate_half(h) * expand_as(sin, h), x.dtype)


def rotated_heads(q, k, v, cos, sin, head_dim: int):
    """Projections (B, L, H*D) or (B, L, H, D) -> heads (B, H, L, D), q and k rotated.

    A function rather than inline in each attention's `construct`: MindSpore parses a cell's `construct` once per
    instance (per layer) but a function once, and keeps what it parsed; this one saves ~3 MiB of host memory per
    decoder layer (`bench/graph_memory.py`)."""
    b, length = q.shape[0], q.shape[1]
    q = swap_middle_axes(q.reshape(b, length, -1, head_dim))
    k = swap_middle_axes(k.reshape(b, length, -1, head_dim))
    v = swap_middle_axes(v.reshape(b, length, -1, head_dim))
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def inv_freq(dim: int, theta: float) -> np.ndarray:
    """Default RoPE inverse frequencies 1 / theta^(2i/dim), float32 as HF computes them."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)


def mrope_selector(mrope_section: Sequence[int], half: int, interleaved: bool = False) -> np.ndarray:
    """(3, half) one-hot: which of the (t, h, w) position rows drives each frequency channel.

    Chunked (Qwen2/2.5-VL): channels [0, s0) use t, [s0, s0+s1) use h, the rest w.
    Interleaved (Qwen3-VL): channel j uses h if j % 3 == 1 and j < 3*s1, w if j % 3 == 2 and j < 3*s2, else t.
    """
    owner = np.zeros(half, np.int64)
    if interleaved:
        for row, offset in ((1, 1), (2, 2)):
            owner[offset : mrope_section[row] * 3 : 3] = row
    else:
        bounds = np.cumsum(mrope_section)
        owner = np.searchsorted(bounds, np.arange(half), side="right").clip(max=2)
    return (owner[None, :] == np.arange(3)[:, None]).astype(np.float32)


class MRotaryEmbedding(nn.Cell):
    """(cos, sin) of shape (B, L, head_dim) in float32 from (3, B, L) position ids (multimodal RoPE)."""

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int], interleaved: bool = False) -> None:
        super().__init__()
        self.inv_freq = Tensor(inv_freq(head_dim, theta))
        self.selector = Tensor(mrope_selector(mrope_section, head_dim // 2, interleaved)[:, None, None, :])

    def construct(self, position_ids):
        pos = unsqueeze(ops.cast(position_ids, ms.float32), -1)
        shape = pos.shape[:-1] + self.inv_freq.shape  # (3, B, L, half)
        freqs = ops.broadcast_to(pos, shape) * ops.broadcast_to(self.inv_freq, shape)
        freqs = (freqs * ops.broadcast_to(self.selector, shape)).sum(0)
        emb = ops.cat((freqs, freqs), -1)
        return ops.cos(emb), ops.sin(emb)


# --------------------------------------------------------------------------------------------------- loss


def causal_lm_loss_sum(logits, labels):
    """(sum of shifted cross-entropy over supervised targets, their count), float32 scalars.

    logits[:, t] predicts labels[:, t + 1]; targets equal to IGNORE_INDEX are skipped. Logits of all but the
    last position (one shorter than the labels) are taken as they are: cheaper than slicing whole logits.
    """
    target = labels[:, 1:]
    valid = ops.cast(target != IGNORE_INDEX, ms.float32)
    if logits.shape[1] == labels.shape[1]:
        logits = logits[:, :-1]
    logp = ops.log_softmax(ops.cast(logits, ms.float32), -1)
    picked = ops.gather_elements(logp, -1, ops.maximum(target, 0).expand_dims(-1)).squeeze(-1)
    return -(picked * valid).sum(), valid.sum()


# -------------------------------------------------------------------------------------------- initialise


def init_parameters(model: nn.Cell, seed: int, std: float) -> None:
    """Deterministic random init: every cell's NORMAL_INIT parameters ~ normal(0, std), in name order.

    Biases and norm weights keep their construction values (0 and 1). Shared (tied) parameters are drawn once.
    """
    rng = np.random.default_rng(seed)
    seen: set[int] = set()
    for _, cell in sorted(model.cells_and_names(), key=lambda item: item[0]):
        for attr in getattr(cell, "NORMAL_INIT", ()):
            param = getattr(cell, attr)
            if id(param) in seen:
                continue
            seen.add(id(param))
            param.set_data(Tensor(rng.normal(0.0, std, param.shape).astype(np.float32)))


def set_recompute(cells: Sequence[nn.Cell]) -> None:
    """Gradient checkpointing: recompute each cell's activations in the backward pass."""
    for cell in cells:
        cell.recompute()


# ----------------------------------------------------------------------------------- host-side (numpy)


def padded_patch_count(batch: dict, n_real: int) -> int:
    """How many vision patches the step gets: the collator's shape bucket (`vision_patches`), else the real
    count. The padding patches form one segment of their own whose features nothing gathers."""
    target = int(batch.get("vision_patches") or n_real)
    if target < n_real:
        raise ValueError(f"vision_patches {target} is below the batch's {n_real} patches")
    return target


def vision_reach(batch: dict, frame_patches: np.ndarray) -> dict[str, np.ndarray]:
    """`vision_reach`: zeros as long as the longest frame the run's data can hold (the collator's
    `vision_frame_patches`, a bound of the pixel limits) or as this batch's longest frame if that is longer;
    nothing without a bound. Only its length is read, as a static bound on the keys a full-attention vision
    block computes on CPU, so the bound is part of the compiled shape and normally the same for the whole run."""
    bound = int(batch.get("vision_frame_patches") or 0)
    if not bound:
        return {}
    return {"vision_reach": np.zeros(max(bound, int(np.max(frame_patches))), np.int8)}


def frame_cu_seqlens(grid_thw: np.ndarray) -> np.ndarray:
    """[0, h*w, 2*h*w, ...]: one attention block per temporal frame of every image/video (HF cu_seqlens)."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    sizes = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def vision_rope_ids(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(N, 2) (row, col) patch coordinates in the merge-window-major order the vision towers use."""
    ids = []
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
        cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
        pair = np.stack([rows, cols], -1).reshape(h // merge, merge, w // merge, merge, 2)
        pair = pair.transpose(0, 2, 1, 3, 4).reshape(-1, 2)
        ids.append(np.tile(pair, (int(t), 1)))
    return np.concatenate(ids).astype(np.int64)


def vision_rope_cos_sin(rope_ids: np.ndarray, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """(N, head_dim) float32 cos and sin of the 2-D vision rotary embedding (HF VisionRotaryEmbedding(head_dim/2))."""
    freq = inv_freq(head_dim // 2, theta)
    angles = (rope_ids[:, :, None].astype(np.float32) * freq[None, None, :]).reshape(len(rope_ids), -1)
    emb = np.concatenate([angles, angles], -1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


IDLE_IMAGE = "idle_image"  # batch key: its one image is idle (`with_idle_image`)


def with_idle_image(batch: dict, merge: int, patch_values: int) -> dict:
    """A text-only batch with one merge window of zero pixels added, whose feature no token takes.

    Its vision tower runs, so a ZeRO-3 rank with no image gathers the vision weights and reduces their gradients
    as the ranks with images do (`qwenvl.parallel.zero3.align_vision`); every gradient it adds is exactly zero
    (the feature's slot weight is 0). `patch_values`: the values of one patch (channels x temporal x patch^2).
    """
    return {**batch, "pixel_values": np.zeros((merge * merge, patch_values), np.float32),
            "image_grid_thw": np.asarray([[1, merge, merge]], np.int64), IDLE_IMAGE: True}  # fmt: skip


def scattered_counts(batch: dict, n_image: int, n_video: int) -> tuple[int, int]:
    """The merged image and video features tokens take: none of an idle image (`with_idle_image`)."""
    return (0, n_video) if batch.get(IDLE_IMAGE) else (n_image, n_video)


def vision_scatter_index(
    input_ids: np.ndarray, image_token_id: int, video_token_id: int, n_image: int, n_video: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where merged vision features go: ((B, L) int32 gather index, (B, L, 1) float32 0/1 slot mask).

    Image tokens take image features in reading order, video tokens take the video features that follow them
    (features are laid out [images..., videos...]). ValueError when the token counts differ from the features.
    """
    ids = np.asarray(input_ids)
    image_at = ids == image_token_id
    video_at = ids == video_token_id
    if int(image_at.sum()) != n_image:
        raise ValueError(f"{int(image_at.sum())} image pad tokens in input_ids but {n_image} merged image patches")
    if int(video_at.sum()) != n_video:
        raise ValueError(f"{int(video_at.sum())} video pad tokens in input_ids but {n_video} merged video patches")
    index = np.zeros(ids.shape, np.int64)
    index[image_at] = np.arange(n_image)
    index[video_at] = n_image + np.arange(n_video)
    slots = (image_at | video_at)[..., None].astype(np.float32)
    return index.astype(np.int32), slots
