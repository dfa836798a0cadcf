"""Model folders the trainer writes: Hugging Face weights + config, tokenizer and processor files.

Every checkpoint and the final output load in `transformers` as they are, with the pixel limits and
video rules the run trained with (the processor files are written from the training settings). A LoRA
run writes a PEFT adapter instead of full weights, plus `non_lora_trainables.safetensors` holding the
full tensors of whatever else trained (vision tower, merger), so nothing trained is lost;
`tools/merge_lora.py` folds both into a full checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mindspore import Tensor, nn

from qwenvl.data.image_processing import VisionSettings
from qwenvl.data.processor_files import write_processor_files
from qwenvl.model.lora import NON_LORA_FILE


def non_lora_trainables(model: nn.Cell) -> dict[str, np.ndarray]:
    """The whole values of every trained non-LoRA tensor (ZeRO-3 chunks gathered: every rank must call it)."""
    sharded = getattr(model, "zero3", None)
    out = {}
    for name, param in model.parameters_and_names():
        if param.requires_grad and ".lora_" not in name:
            out[name] = sharded.gather(name, param) if sharded and name in sharded.specs else param.asnumpy()
    return out


class HFModelFiles:
    """`save` a model folder; `load_into` reads a folder's weights back into a live model (resume)."""

    def __init__(self, source_dir: str | Path, settings: VisionSettings) -> None:
        self.source_dir = Path(source_dir)
        self.settings = settings

    def save(self, model: nn.Cell, out_dir: Path, write: bool = True) -> None:
        """Write the folder; with ZeRO-3 every rank calls this (the weights are gathered) and one writes."""
        from safetensors.numpy import save_file

        if getattr(model, "lora_settings", None) is not None:
            from qwenvl.model.lora import save_adapter

            extra = non_lora_trainables(model)
            if write:
                save_adapter(model, out_dir, str(self.source_dir.resolve()))
                if extra:
                    save_file(extra, str(Path(out_dir) / NON_LORA_FILE))
        else:
            from qwenvl.model import save_model

            save_model(model, out_dir, write=write)
        if write:
            write_processor_files(out_dir, self.settings, tokenizer_dir=self.source_dir)

    def load_into(self, model: nn.Cell, checkpoint: Path) -> None:
        if getattr(model, "lora_settings", None) is None:
            from qwenvl.model import load_weights

            load_weights(model, checkpoint)
            return
        from safetensors.numpy import load_file

        from qwenvl.model.lora import read_adapter

        _, tensors = read_adapter(checkpoint)
        extra = checkpoint / NON_LORA_FILE
        if extra.is_file():
            tensors.update(load_file(str(extra)))
        params = dict(model.parameters_and_names())
        sharded = getattr(model, "zero3", None)
        for name, value in tensors.items():
            if name not in params:
                raise ValueError(f"{checkpoint}: tensor {name!r} is not a parameter of this model")
            if sharded and name in sharded.specs:
                value = sharded.specs[name].take(value)
            params[name].set_data(Tensor(value, params[name].dtype))
