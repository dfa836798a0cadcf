"""LoRA adapters on the native models, saved and loaded in PEFT's format.

`apply_lora` swaps each targeted `Linear` for a `LoraLinear` that keeps the base weight and bias (same
Parameter objects, same Hugging Face names) and adds `lora_A.weight` (r, in) and `lora_B.weight`
(out, r): y = x W^T + b + dropout(x) A^T B^T * alpha / r, PEFT's initialisation (A Kaiming-uniform with
a = sqrt(5), B zero, so training starts from the base model). Targets are module names in the language
model (`q_proj`, ...) and optionally the vision attention (`qkv`, `proj` inside `model.visual.blocks`);
upstream's PEFT call could adapt only the LLM.

Dropout on the adapter input is a pure function of a key, so runs are reproducible and a resumed run draws
exactly the masks the uninterrupted one would (see `dropout_mask` and `DropoutKey`).

The adapter folder is what `peft.PeftModel.from_pretrained` reads: `adapter_config.json` (a regex
`target_modules` naming exactly the adapted modules) and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight`. Merging (W + scale * B A) is `merge_lora`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from qwenvl.model.layers import Linear, MatrixLayer, parameter_dtype
from qwenvl.model.weight_ops import HalfOnCPU

PEFT_PREFIX = "base_model.model."
NON_LORA_FILE = "non_lora_trainables.safetensors"
VISION_TARGETS = ("qkv", "proj")
_LLM_PREFIX = "model.language_model.layers."
_VISION_PREFIX = "model.visual.blocks."
# lowbias32 (Chris Wellons' hash-prospector): multipliers as int32, and masks turning arithmetic shifts logical
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B - 2**32
_KEEP_BITS = 24


def _i32(value: int) -> Tensor:
    return Tensor(value, ms.int32)


def _lowbias32(x):
    """A 32-bit integer hash with good avalanche, in wrapping int32 arithmetic (the same bits as uint32)."""
    x = ops.bitwise_xor(x, ops.bitwise_and(ops.bitwise_right_shift(x, _i32(16)), _i32(0xFFFF)))
    x = x * _i32(_MUL1)
    x = ops.bitwise_xor(x, ops.bitwise_and(ops.bitwise_right_shift(x, _i32(15)), _i32(0x1FFFF)))
    x = x * _i32(_MUL2)
    return ops.bitwise_xor(x, ops.bitwise_and(ops.bitwise_right_shift(x, _i32(16)), _i32(0xFFFF)))


def dropout_mask(x, key, salt: int, p: float):
    """Dropout multipliers for `x` (0 or 1 / (1 - p)), a pure function of (key, salt, element index).

    Counter-based: element i keeps when the low 24 bits of lowbias32(lowbias32(i ^ key[0]) ^ key[1] ^ salt)
    reach p * 2**24. Nothing is stateful, so the mask is the same in a recomputed forward (gradient
    checkpointing) and in a resumed run, on any backend with int32 arithmetic. MindSpore's `nn.Dropout`
    keeps a hidden per-kernel state instead, which neither a checkpoint nor a restart can reproduce.
    """
    index = ops.arange(0, x.size, dtype=ms.int32).reshape(x.shape)
    mixed = _lowbias32(ops.bitwise_xor(index, key[0]))
    bits = _lowbias32(ops.bitwise_xor(mixed, ops.bitwise_xor(key[1], _i32(salt))))
    keep = ops.bitwise_and(bits, _i32((1 << _KEEP_BITS) - 1)) >= _i32(round(p * 2**_KEEP_BITS))
    return ops.cast(keep, x.dtype) * (1.0 / (1.0 - p))


class DropoutKey:
    """The key every dropout in the compiled step draws from: one int32 pair in a non-trained Parameter.

    The trainer sets it before each micro-batch from (seed, global step, micro-batch, rank), all saved in
    a checkpoint, so the masks depend on nothing else; `ops.assign` orders the update with the compiled
    steps on the device queue.
    """

    def __init__(self) -> None:
        self.param = Parameter(Tensor(np.zeros(2, np.int32)), name="lora_dropout_key", requires_grad=False)
        self.words_now: np.ndarray | None = None  # what `set` last wrote

    @staticmethod
    def words(seed: int, step: int, micro_batch: int, rank: int) -> np.ndarray:
        """Two well-mixed int32 words for one (seed, step, micro-batch, rank) (numpy's SeedSequence hashing)."""
        entropy = [seed % 2**32, step, micro_batch, rank]
        return np.random.SeedSequence(entropy).generate_state(2, np.uint32).view(np.int32)

    def set(self, seed: int, step: int, micro_batch: int, rank: int) -> None:
        self.words_now = self.words(seed, step, micro_batch, rank)
        ops.assign(self.param, Tensor(self.words_now))

    def set_layer(self, layer: int | None) -> None:
        """Key decoder layer `layer` apart from the others (layer-by-layer execution runs every layer on the first
        one's salts): the words `set` last wrote mixed with the index; None restores those words."""
        if self.words_now is None:
            return
        words = self.words_now
        if layer is not None:
            mixed = np.random.SeedSequence([int(w) % 2**32 for w in words] + [layer]).generate_state(2, np.uint32)
            words = mixed.view(np.int32)
        ops.assign(self.param, Tensor(words))


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    vision: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(MatrixLayer):
    """A `Linear` plus a low-rank update; `weight`/`bias` are the base layer's own parameters (and its weight
    source, if any); the adapters are stored in the base weight's dtype.

    With dropout, the key Parameter is shared by every adapted module; `salt` (from the module's position)
    makes their masks differ.
    """

    def __init__(
        self, base: Linear, settings: LoraSettings, rng: np.random.Generator, key: DropoutKey, position: int = 0
    ) -> None:
        d_out, d_in = base.weight_shape
        super().__init__(d_in, d_out)
        self.weight = base.weight
        self.bias = base.bias
        if base.source is not None:
            self.use_source(base.source)
        with parameter_dtype(base.weight.dtype):
            self.lora_A = Linear(d_in, settings.r, bias=False)
            self.lora_B = Linear(settings.r, d_out, bias=False)
        if isinstance(base.source, HalfOnCPU):
            for adapter in (self.lora_A, self.lora_B):
                adapter.use_source(HalfOnCPU(adapter.weight_shape, base.source.compute_dtype))
        bound = 1.0 / math.sqrt(d_in)
        self.lora_A.weight.set_data(Tensor(rng.uniform(-bound, bound, (settings.r, d_in)), base.weight.dtype))
        self.lora_B.weight.set_data(Tensor(np.zeros((d_out, settings.r)), base.weight.dtype))
        self.p = float(settings.dropout)
        self.dropout_key = key
        self.lora_dropout_key = key.param if self.p > 0 else None
        self.salt = int(DropoutKey.words(position, 0, 0, 0)[0])
        self.scaling = settings.scaling

    def construct(self, x):
        y = super().construct(x)
        h = x
        if self.training and self.lora_dropout_key is not None:
            h = x * dropout_mask(x, self.lora_dropout_key, self.salt, self.p)
        return y + self.lora_B(self.lora_A(h)) * self.scaling


def _is_target(name: str, settings: LoraSettings) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith(_LLM_PREFIX):
        return leaf in settings.target_modules
    return settings.vision and name.startswith(_VISION_PREFIX) and leaf in VISION_TARGETS


def apply_lora(model: nn.Cell, settings: LoraSettings, seed: int = 0) -> list[str]:
    """Wrap every targeted Linear; returns the adapted module names. Parameter names stay full paths."""
    rng = np.random.default_rng(seed)
    targets = [(name, cell) for name, cell in model.cells_and_names() if isinstance(cell, Linear) and _is_target(name, settings)]
    if not targets:
        raise ValueError(f"LoRA target modules {settings.target_modules} match no Linear layer of the model")
    key = DropoutKey()
    for position, (name, cell) in enumerate(targets):
        parent_name, _, attr = name.rpartition(".")
        setattr(_sub_cell(model, parent_name), attr, LoraLinear(cell, settings, rng, key, position))
    for full_name, param in model.parameters_and_names():
        param.name = full_name
    if settings.dropout > 0:
        model.dropout_key = key
    model.lora_settings = settings
    model.lora_modules = [name for name, _ in targets]
    return model.lora_modules


def _sub_cell(model: nn.Cell, dotted: str) -> nn.Cell:
    cell = model
    for part in dotted.split("."):
        cell = cell[int(part)] if part.isdigit() else getattr(cell, part)
    return cell


def lora_parameters(model: nn.Cell) -> dict[str, Parameter]:
    return {name: p for name, p in model.parameters_and_names() if ".lora_A." in name or ".lora_B." in name}


def base_state(model: nn.Cell) -> dict[str, np.ndarray]:
    """The base model's weights (LoRA tensors left out), by Hugging Face name."""
    return {name: p.asnumpy() for name, p in model.parameters_and_names() if ".lora_" not in name}


def target_regex(modules: list[str]) -> str:
    """A PEFT `target_modules` regex matching exactly these module names (full match)."""
    return "|".join(re.escape(m) for m in modules)


def save_adapter(model: nn.Cell, out_dir: str | Path, base_model_name_or_path: str = "") -> Path:
    """`adapter_config.json` + `adapter_model.safetensors` in PEFT's layout."""
    from safetensors.numpy import save_file

    settings: LoraSettings = model.lora_settings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + name: p.asnumpy() for name, p in lora_parameters(model).items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": target_regex(model.lora_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config, {module name: (A, B) tensors by `<module>.lora_A.weight` keys without the prefix})."""
    from safetensors.numpy import load_file

    folder = Path(adapter_dir)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    raw = load_file(str(folder / "adapter_model.safetensors"))
    tensors = {}
    for key, value in raw.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        tensors[name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = value
    return config, tensors


def merge_lora(base: dict[str, np.ndarray], config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Base weights with every adapted `W` replaced by `W + (alpha / r) * B @ A` (float32 maths)."""
    scaling = float(config["lora_alpha"]) / float(config["r"])
    merged = dict(base)
    modules = {key.rsplit(".lora_", 1)[0] for key in tensors if ".lora_A." in key}
    for module in sorted(modules):
        weight_name = f"{module}.weight"
        if weight_name not in merged:
            raise ValueError(f"adapter module {module!r} has no base weight {weight_name!r}")
        a = tensors[f"{module}.lora_A.weight"].astype(np.float32)
        b = tensors[f"{module}.lora_B.weight"].astype(np.float32)
        w = merged[weight_name]
        merged[weight_name] = (w.astype(np.float32) + scaling * (b @ a)).astype(w.dtype)
    return merged


def merged_weights(base: dict[str, np.ndarray], adapter_dir: str | Path) -> tuple[dict[str, np.ndarray], int, int]:
    """Base weights with the adapter merged and the adapter folder's non-LoRA trained tensors in place.

    Returns (weights, merged module count, replaced tensor count).
    """
    from safetensors.numpy import load_file

    folder = Path(adapter_dir)
    config, tensors = read_adapter(folder)
    merged = merge_lora(base, config, tensors)
    replaced = 0
    extra = folder / NON_LORA_FILE
    if extra.is_file():
        for name, value in load_file(str(extra)).items():
            if name not in merged or merged[name].shape != value.shape:
                raise ValueError(f"{extra}: {name!r} {value.shape} does not match the base model")
            merged[name] = value.astype(np.float32)
            replaced += 1
    n_modules = len({key.rsplit(".lora_", 1)[0] for key in tensors if ".lora_A." in key})
    return merged, n_modules, replaced
