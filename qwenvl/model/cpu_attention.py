"""The CPU twin's fused attention: `cpu_attention.cc` built once per machine and called as MindSpore Custom "aot"
kernels, so a CPU step never writes (rows x keys) scores, masks or probabilities (flash attention's scheme).

Why: with the blocked twin (`attention._BlockedAttention`) a tiny model's 2048-token step was mostly its L x L
blocks (BatchMatMul, Softmax, the mask-bias Add and their backward), where torch's CPU attention is fused.

The library is compiled with the host's C++ compiler (`CXX`, else `c++` / `g++`) for the host CPU
(`-march=native`, OpenMP) into `QWENVL_KERNEL_CACHE` (default `~/.cache/qwenvl-ms/kernels`), keyed by source,
flags, compiler and CPU, so one build serves every later process. Without a compiler, when the build fails, or
with `QWENVL_CPU_ATTENTION=blocked`, attention takes the blocked twin, with one warning saying why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import warnings
from functools import lru_cache
from pathlib import Path

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops import CustomRegOp, DataType

from qwenvl.model.shared_cells import shared_cell

SOURCE = Path(__file__).with_name("cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128)  # the head sizes the library instantiates
CHOICE_ENV = "QWENVL_CPU_ATTENTION"  # "fused" (default) or "blocked"


def _compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CXX"), "c++", "g++", "clang++") if name)
    return next((path for path in found if path), None)


def _cpu_signature() -> str:
    """The CPU model and feature flags (`-march=native` builds for them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return os.uname().machine
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted)) or os.uname().machine


def build_library() -> Path:
    """The compiled library, built on first use (a few seconds) and reused. Raises RuntimeError with the
    compiler's message when it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in (
        SOURCE.read_bytes(), " ".join(FLAGS), version, _cpu_signature()))).hexdigest()[:16]  # fmt: skip
    folder = Path(os.environ.get("QWENVL_KERNEL_CACHE") or Path.home() / ".cache/qwenvl-ms/kernels")
    target = folder / f"cpu_attention-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{target.name}.{os.getpid()}"  # ranks building at once each rename a whole file
    done = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True,
                          check=False)  # fmt: skip
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
    os.replace(partial, target)
    return target


@lru_cache(maxsize=None)
def library() -> Path | None:
    """The library this process uses, or None (blocked twin) with one warning saying why."""
    choice = os.environ.get(CHOICE_ENV, "fused")
    if choice not in ("fused", "blocked"):
        raise ValueError(f"{CHOICE_ENV}={choice!r}: expected 'fused' or 'blocked'")
    if choice == "blocked":
        return None
    try:
        return build_library()
    except (RuntimeError, OSError) as error:
        warnings.warn(f"fused CPU attention unavailable, using the blocked twin: {error}", RuntimeWarning, stacklevel=2)
        return None


def fused_head_dim(head_dim: int) -> bool:
    return head_dim in HEAD_DIMS


def _kernel(path: Path, name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> ops.Custom:
    """The Custom op of one entry point; its output shapes and types come from the library's C++ infer functions,
    its output count from the registration (float32 tensors, int32 segment ids)."""
    registration = CustomRegOp(name)
    for index, input_name in enumerate(inputs):
        registration = registration.input(index, input_name)
    for index, output_name in enumerate(outputs):
        registration = registration.output(index, output_name)
    formats = [DataType.I32_Default if n == "seg" else DataType.F32_Default for n in inputs + outputs]
    info = registration.dtype_format(*formats).target("CPU").get_op_info()
    return ops.Custom(f"{path}:{name}", out_shape=None, out_dtype=None, func_type="aot", reg_info=info)


def _f32(x):
    return ops.cast(x, ms.float32)


class FusedSegmentAttention(nn.Cell):
    """(B, H, L, D) queries on (B, Hkv, L, D) keys/values within equal segment ids (B, L), as
    `attention.SegmentAttention`: returns ((B, L, H, D) output in the queries' dtype, (B, H, L) float32
    log-sum-exp). Computed in float32; the backward pass recomputes the probabilities block by block and sums each
    kv head's gradients over its query heads in place."""

    def __init__(self, scale: float, causal: bool, path: Path) -> None:
        super().__init__()
        kind = "causal" if causal else "full"
        self.scale = Tensor([scale], ms.float32)
        self.forward_kernel = _kernel(path, f"attention_forward_{kind}", ("q", "k", "v", "seg", "scale"),
                                      ("out", "lse"))  # fmt: skip
        self.backward_kernel = _kernel(path, f"attention_backward_{kind}",
                                       ("q", "k", "v", "seg", "scale", "out", "dout", "lse"), ("dq", "dk", "dv"))

    def __deepcopy__(self, memo) -> "FusedSegmentAttention":
        """Itself: one shared, never-changed instance (`shared_cells`), so a copied layer (`layer_by_layer`) keeps
        it; MindSpore 2.7 cannot copy a Custom primitive (its `__deepcopy__` passes `name`, which it refuses)."""
        return self

    def construct(self, q, k, v, seg):
        out, lse = self.forward_kernel(_f32(q), _f32(k), _f32(v), ops.cast(seg, ms.int32), self.scale)
        return ops.cast(out, q.dtype), lse

    def bprop(self, q, k, v, seg, result, d_result):
        out, lse = result
        dq, dk, dv = self.backward_kernel(_f32(q), _f32(k), _f32(v), ops.cast(seg, ms.int32), self.scale, _f32(out),
                                          _f32(d_result[0]), lse)  # fmt: skip
        return ops.cast(dq, q.dtype), ops.cast(dk, k.dtype), ops.cast(dv, v.dtype), ops.zeros_like(seg)


def shared_fused_attention(scale: float, causal: bool) -> FusedSegmentAttention | None:
    """The fused attention of this configuration, shared by every layer that has it; None where the library is
    unavailable (the caller takes the blocked twin)."""
    path = library()
    if path is None:
        return None
    key = (FusedSegmentAttention, float(scale), bool(causal), str(path))
    return shared_cell(key, lambda: FusedSegmentAttention(float(scale), bool(causal), path))
