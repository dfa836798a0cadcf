"""Dataset registry: the same shape as upstream's `data_dict`, plus registration without editing code.

`--dataset_use` takes a comma list of entries. Each entry is a registered name or a path to a
`.json`/`.jsonl` annotation file, optionally followed by `%N` (integer percent): below 100 a seeded
random subset, above 100 upsampling (whole copies plus a seeded subset of the remainder).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qwenvl.errors import UserError

_DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"

# Upstream's placeholder entries keep their names so existing launch flags resolve; edit the paths,
# or better, pass a registry file with --dataset_registry (see `load_registry_file`).
CAMBRIAN_737K = {"annotation_path": "PATH_TO_CAMBRIAN_737K_ANNOTATION", "data_path": ""}
CAMBRIAN_737K_PACK = {"annotation_path": "PATH_TO_CAMBRIAN_737K_ANNOTATION_PACKED", "data_path": ""}
MP_DOC = {"annotation_path": "PATH_TO_MP_DOC_ANNOTATION", "data_path": "PATH_TO_MP_DOC_DATA"}
CLEVR_MC = {"annotation_path": "PATH_TO_CLEVR_MC_ANNOTATION", "data_path": "PATH_TO_CLEVR_MC_DATA"}
VIDEOCHATGPT = {"annotation_path": "PATH_TO_VIDEOCHATGPT_ANNOTATION", "data_path": "PATH_TO_VIDEOCHATGPT_DATA"}
DEMO_IMAGES = {"annotation_path": str(_DEMO_DIR / "demo_images.json"), "data_path": str(_DEMO_DIR)}

data_dict: dict[str, dict[str, str]] = {
    "cambrian_737k": CAMBRIAN_737K,
    "cambrian_737k_pack": CAMBRIAN_737K_PACK,
    "mp_doc": MP_DOC,
    "clevr_mc": CLEVR_MC,
    "videochatgpt": VIDEOCHATGPT,
    "demo_images": DEMO_IMAGES,
}

_RATE = re.compile(r"%(\d+)$")
_ANNOTATION_SUFFIXES = (".json", ".jsonl")


def parse_sampling_rate(entry: str) -> float:
    """`name%50` -> 0.5, `name` -> 1.0; only integer percents, as upstream."""
    match = _RATE.search(entry)
    return int(match.group(1)) / 100.0 if match else 1.0


def _strip_rate(entry: str) -> str:
    return _RATE.sub("", entry)


class RegistryError(UserError):
    """An unknown dataset name or an unreadable registry file."""


def _read_registry(path: Path) -> object:
    import yaml

    try:
        text = path.read_text(encoding="utf-8-sig")
        return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())
        kind = path.suffix[1:] or "JSON"
        raise RegistryError(f"--dataset_registry {path}: cannot read it as {kind}: {reason}") from exc


def load_registry_file(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Read a user registry (JSON or YAML): `{name: {annotation_path, data_path}}`.

    Relative paths in the file are resolved against the registry file's folder, so a registry can
    travel with its data. Any problem is a `RegistryError` naming the file.
    """
    path = Path(path)
    entries = _read_registry(path)
    if not isinstance(entries, dict):
        raise RegistryError(f"{path}: a registry file maps dataset names to {{annotation_path, data_path}}")
    registry = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or "annotation_path" not in entry:
            raise RegistryError(f"{path}: entry {name!r} needs an 'annotation_path' (and optionally 'data_path')")
        registry[name] = {
            "annotation_path": str(path.parent / entry["annotation_path"]),
            "data_path": str(path.parent / entry.get("data_path", "")),
        }
    return registry


def _is_annotation_path(name: str) -> bool:
    return name.endswith(_ANNOTATION_SUFFIXES) and ("/" in name or os.path.exists(name))


def data_list(
    dataset_names: list[str] | str, registry: dict[str, dict[str, str]] | None = None
) -> list[dict[str, object]]:
    """Resolve `--dataset_use` entries to configs with `annotation_path`, `data_path`, `sampling_rate`.

    Registry entries win over file paths; a path entry's media folder is the annotation's folder.
    Unknown names raise a RegistryError listing every known name.
    """
    if isinstance(dataset_names, str):
        dataset_names = [n for n in (part.strip() for part in dataset_names.split(",")) if n]
    known = {**data_dict, **(registry or {})}
    configs = []
    for entry in dataset_names:
        name = _strip_rate(entry)
        if name in known:
            config: dict[str, object] = dict(known[name])
        elif _is_annotation_path(name):
            config = {"annotation_path": name, "data_path": str(Path(name).resolve().parent)}
        else:
            raise RegistryError(
                f"do not find dataset {name!r}: not a registered name and not a path to a .json/.jsonl file. "
                f"Known names: {', '.join(sorted(known))}"
            )
        config["name"] = name
        config["sampling_rate"] = parse_sampling_rate(entry)
        configs.append(config)
    return configs
