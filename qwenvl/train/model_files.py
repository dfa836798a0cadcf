"""Model folders the trainer writes: Hugging Face weights + config, tokenizer and processor files.

Every checkpoint and the final output load in `transformers` as they are, with the pixel limits and
video rules the run trained with (the processor files are written from the training settings).
"""

from __future__ import annotations

from pathlib import Path

from mindspore import nn

from qwenvl.data.image_processing import VisionSettings
from qwenvl.data.processor_files import write_processor_files


class HFModelFiles:
    """`save` a model folder; `load_into` reads a folder's weights back into a live model (resume)."""

    def __init__(self, source_dir: str | Path, settings: VisionSettings) -> None:
        self.source_dir = Path(source_dir)
        self.settings = settings

    def save(self, model: nn.Cell, out_dir: Path) -> None:
        from qwenvl.model import save_model

        save_model(model, out_dir)
        write_processor_files(out_dir, self.settings, tokenizer_dir=self.source_dir)

    def load_into(self, model: nn.Cell, checkpoint: Path) -> None:
        from qwenvl.model import load_weights

        load_weights(model, checkpoint)
