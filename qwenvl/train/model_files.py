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
    return {n: p.asnumpy() for n, p in model.parameters_and_names() if p.requires_grad and ".lora_" not in n}


class HFModelFiles:
    """`save` a model folder; `load_into` reads a folder's weights back into a live model (resume)."""

    def __init__(self, source_dir: str | Path, settings: VisionSettings) -> None:
        self.source_dir = Path(source_dir)
        self.settings = settings

    def save(self, model: nn.Cell, out_dir: Path) -> None:
        from safetensors.numpy import save_file

        if getattr(model, "lora_settings", None) is not None:
            from qwenvl.model.lora import save_adapter

            save_adapter(model, out_dir, str(self.source_dir.resolve()))
            extra = non_lora_trainables(model)
            if extra:
                save_file(extra, str(Path(out_dir) / NON_LORA_FILE))
        else:
            from qwenvl.model import save_model

            save_model(model, out_dir)
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
        for name, value in tensors.items():
            if name not in params:
                raise ValueError(f"{checkpoint}: tensor {name!r} is not a parameter of this model")
            params[name].set_data(Tensor(value))
