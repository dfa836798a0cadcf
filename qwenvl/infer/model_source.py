"""Which folders the evaluation tools read, and with which data settings.

`--model` is a full model folder, or a LoRA run folder (its `adapter_config.json` names the base);
`--adapter` adds a LoRA adapter to a full model. The pixel limits, video rules and system prompt are
the ones the model was trained with, as its folder records them (`recorded_data_settings`); a flag given
on the command line overrides one of them. Results belong to what was evaluated: the adapter's folder
when there is one, else the model's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path

from qwenvl.data.arguments import DataArguments
from qwenvl.data.pipeline import add_data_flags
from qwenvl.data.processor_files import recorded_data_settings
from qwenvl.family import model_family


class ModelSourceError(ValueError):
    """A --model/--adapter/--base combination that names no usable model: one line, exit code 2."""


@dataclass(frozen=True)
class ModelSource:
    base: Path
    adapter: Path | None = None

    @property
    def trained(self) -> Path:
        """The folder of what was trained (the adapter's, or the model's): its settings and its results."""
        return self.adapter or self.base


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def resolve_model(model: str, adapter: str | None = None, base: str | None = None) -> ModelSource:
    """Full model (+ optional adapter), or a LoRA folder as --model whose base is --base or its adapter_config's."""
    folder = Path(model)
    if _is_model(folder):
        if base is not None:
            raise ModelSourceError(f"--base is for a LoRA folder given as --model; {folder} is a full model")
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelSourceError(f"--adapter {adapter}: no adapter_config.json (not a LoRA adapter folder)")
        return ModelSource(folder, Path(adapter) if adapter else None)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"--model {folder}: neither a model folder (config.json) nor a LoRA folder "
                               "(adapter_config.json)")  # fmt: skip
    if adapter is not None:
        raise ModelSourceError(f"--model {folder} is a LoRA adapter: give its base model as --base, not --adapter")
    if base is None:
        base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
        if not _is_model(Path(base)):
            raise ModelSourceError(f"--model {folder} is a LoRA adapter whose base {base!r} is not a local model "
                                   "folder here: pass --base BASE_MODEL_DIR")  # fmt: skip
    elif not _is_model(Path(base)):
        raise ModelSourceError(f"--base {base}: not a model folder (no config.json)")
    return ModelSource(Path(base), folder)


def add_model_data_flags(parser: argparse.ArgumentParser) -> None:
    """The training data flags, defaulting to what the model folder records rather than to training's defaults."""
    add_data_flags(parser)
    names = {f.name for f in fields(DataArguments)}
    for action in parser._actions:
        if action.dest in names:
            action.default = None
            action.help = action.help.replace("(default: ", "(default: the model's own, else ")
    parser.epilog = ("Pixel, video and system-prompt flags default to the model's own settings: its args.json, "
                     "qwenvl_vision.json and processor configs (the training defaults where none is recorded).")


def model_data_args(source: ModelSource, namespace: argparse.Namespace) -> tuple[DataArguments, str]:
    """DataArguments from the flags given, else the folder's records, else the defaults; and a line saying so."""
    recorded, files = recorded_data_settings(source.trained, model_family(source.base))
    given = {f.name: v for f in fields(DataArguments) if (v := getattr(namespace, f.name, None)) is not None}
    data_args = DataArguments(**{**recorded, **given})
    limits = f"min_pixels {data_args.min_pixels}, max_pixels {data_args.max_pixels}"
    where = f"{source.trained} ({', '.join(files)})" if files else "the training defaults (the folder records none)"
    overridden = f"; from flags: {', '.join(sorted(given))}" if given else ""
    return data_args, f"data settings of {where}: {limits}{overridden}"
