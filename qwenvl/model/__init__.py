"""Native MindSpore Qwen-VL models: build from a Hugging Face config, load and save HF safetensors checkpoints.

`MODEL_CLASSES[model_type]` imports a family's module on first use, so one family's module never has to
import for another's to work.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from qwenvl.model.checkpoint_io import (
    StoredTensor,
    TensorPlan,
    checkpoint_files,
    safetensors_tag,
    stored_tensors,
    to_disk_name,
    to_memory_name,
    write_safetensors,
)
from qwenvl.model.layers import init_parameters

if TYPE_CHECKING:
    from qwenvl.parallel.layout import ShardSpec

_REGISTRY = {
    "qwen2_vl": ("qwenvl.model.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwenvl.model.qwen2_vl", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("qwenvl.model.qwen3_vl", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("qwenvl.model.qwen3_vl", "Qwen3VLMoeForConditionalGeneration"),
}


class _LazyClasses(Mapping):
    """model_type -> model class, importing the family module on access; lists only importable families."""

    def __getitem__(self, model_type: str) -> type:
        if model_type not in _REGISTRY:
            raise KeyError(f"model_type {model_type!r} is not one of {sorted(_REGISTRY)}")
        module, name = _REGISTRY[model_type]
        return getattr(importlib.import_module(module), name)

    def __iter__(self) -> Iterator[str]:
        return (key for key, (module, _) in _REGISTRY.items() if importlib.util.find_spec(module) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


MODEL_CLASSES: Mapping[str, type] = _LazyClasses()


def read_config(config: dict | str | Path) -> dict:
    """A config dict from a dict, a config.json path or a folder holding config.json."""
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _instantiate(config: dict, dtype: str) -> nn.Cell:
    model_type = config.get("model_type")
    if model_type not in _REGISTRY:
        raise ValueError(f"model_type {model_type!r} is not one of {sorted(_REGISTRY)}")
    return MODEL_CLASSES[model_type](config, dtype=dtype)


def _initializer_range(config: dict) -> float:
    return float((config.get("text_config") or {}).get("initializer_range", config.get("initializer_range", 0.02)))


def build_model(config: dict | str | Path, seed: int = 0, dtype: str = "float32") -> nn.Cell:
    """A randomly initialised model (normal(0, initializer_range) weights, zero biases, unit norms), seeded."""
    config = read_config(config)
    model = _instantiate(config, dtype)
    init_parameters(model, seed, _initializer_range(config))
    return model


def named_parameters(model: nn.Cell) -> dict:
    """name -> Parameter, each shared (tied) parameter once under its first name, as HF state dicts list them."""
    out, seen = {}, set()
    for name, param in model.parameters_and_names():
        if id(param) not in seen:
            seen.add(id(param))
            out[name] = param
    return out


def _is_tied(model: nn.Cell) -> bool:
    return model.lm_head.weight is model.model.language_model.embed_tokens.weight


def build_empty(config: dict | str | Path, dtype: str = "float32") -> nn.Cell:
    """The model with its parameters allocated lazily, to be filled by `load_weights` (after freezing,
    LoRA and ZeRO-3 sharding have decided what each parameter holds, so no rank needs a whole copy)."""
    return _instantiate(read_config(config), dtype)


def load_model(model_dir: str | Path, dtype: str = "float32") -> nn.Cell:
    """Model from a checkpoint folder, streaming tensors into parameters; legacy and 4.57 names both accepted.

    ValueError naming missing, unexpected or shape-mismatched tensors.
    """
    model = build_empty(model_dir, dtype)
    load_weights(model, model_dir)
    return model


def _base_parameters(model: nn.Cell) -> dict:
    """The parameters a Hugging Face checkpoint holds: LoRA adapters and their dropout key left out."""
    return {name: p for name, p in named_parameters(model).items() if ".lora_" not in name}


def _sharded(model: nn.Cell):
    """`model.zero3` when ZeRO-3 sharded its weights (`qwenvl.parallel.zero3.shard_weights`), else None."""
    return getattr(model, "zero3", None)


def _read_for(stored: StoredTensor, dtype: ms.Type, spec: ShardSpec | None) -> np.ndarray:
    """A stored tensor's values for a parameter of `dtype` (numpy has no bfloat16: float32 then), whole or,
    for a ZeRO-3 chunk, only this rank's part, zero-padded to the chunk."""
    target = np.float16 if dtype == ms.float16 else np.float32
    if spec is None or spec.world == 1:
        return stored.read(target).reshape(stored.shape)
    return spec.pad(stored.read(target, *spec.bounds()))


def load_weights(model: nn.Cell, model_dir: str | Path) -> None:
    """Stream a checkpoint folder's tensors into an existing model (resume keeps the same Parameter objects),
    each converted to its parameter's dtype; a ZeRO-3 sharded parameter takes only this rank's chunk."""
    model_dir = Path(model_dir)
    placement = _sharded(model).specs if _sharded(model) else {}
    params = _base_parameters(model)
    optional = {"lm_head.weight"} if _is_tied(model) else set()
    loaded, unexpected, mismatched = set(), [], []
    for path in checkpoint_files(model_dir):
        for stored in stored_tensors(path):
            name = to_memory_name(stored.name)
            if name in optional:
                continue
            if name not in params:
                unexpected.append(stored.name)
                continue
            spec = placement.get(name)
            expected = spec.shape if spec else tuple(params[name].shape)
            if tuple(stored.shape) != tuple(expected):
                mismatched.append(f"{stored.name}: checkpoint {tuple(stored.shape)} vs model {tuple(expected)}")
                continue
            params[name].set_data(Tensor(_read_for(stored, params[name].dtype, spec), params[name].dtype))
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    problems = [f"{label} ({len(items)}): {', '.join(items[:10])}{' ...' if len(items) > 10 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if items]  # fmt: skip
    if problems:
        raise ValueError(f"checkpoint {model_dir} does not match {type(model).__name__}: " + "; ".join(problems))


def save_model(model: nn.Cell, out_dir: str | Path, max_shard_size: int = 5 * 2**30, write: bool = True) -> None:
    """config.json + safetensors in the model's dtype, with the tensor names transformers 4.57 writes.

    Tensors stream one at a time. ZeRO-3 chunks are gathered whole, a collective: then every rank calls
    `save_model` on the same model and only the one with `write` writes.
    """
    out = Path(out_dir)
    sharded = _sharded(model)
    specs = sharded.specs if sharded else {}
    params = list(_base_parameters(model).items())
    dtype = str(model.compute_dtype).lower()
    plans = [TensorPlan(to_disk_name(name, model.model_type), tuple(specs[name].shape if name in specs else p.shape),
                        safetensors_tag(dtype if name in specs else str(p.dtype))) for name, p in params]  # fmt: skip

    def read(i: int) -> np.ndarray:
        name, param = params[i]
        return sharded.gather(name, param) if name in specs else param.asnumpy()

    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**model.config, "torch_dtype": dtype}, indent=2), encoding="utf-8")
    write_safetensors(plans, read, out if write else None, max_shard_size)
