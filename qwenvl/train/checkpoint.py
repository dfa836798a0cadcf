"""Checkpoint folders `output_dir/checkpoint-N/`: atomic writes, manifests, verification, discovery, rotation.

A checkpoint is written into a hidden temporary folder; once every rank's files are there, the main
rank writes `trainer_state.json` and then `manifest.json` (size and SHA-256 of every other file in the
folder, whoever wrote it), fsyncs everything and renames the folder into place (an atomic rename on
POSIX). A crash mid-write therefore never leaves a `checkpoint-N`; leftovers (`.tmp-*` folders) are
removed at the next start. A folder counts as complete only with `manifest.json` and
`trainer_state.json`; before resuming, `checkpoint_problem` re-reads every file against the manifest,
so truncated, emptied, overwritten or bit-flipped files are found instead of loaded. Rotation renames a
doomed folder to a `.tmp-` name before deleting it, so a half-deleted folder never counts as complete.

SHA-256 (hashlib, C, releases the GIL, files hashed in parallel threads) rather than the CRC-32C of
`train_log.py`: that one is pure Python, megabytes per second, far too slow for multi-GB weights; and the
digests are the ones `sha256sum` prints, so a manifest can be checked by hand.

Contents: model weights + config (`save_model`), tokenizer and processor files, optimizer and
loss-scale state (`optimizer.safetensors`, or one `optimizer-rank<r>.safetensors` per rank when the
moments are sharded), `scheduler.json`, per-rank `rng_state-rank<r>.json`, `trainer_state.json`
(global step, data position, HF-like `log_history`) and `manifest.json`.

The final model in `output_dir` is written the same way (`write_model_folder`): into a temporary
folder, fsynced, then each file moved into place with an atomic `os.replace`, the completion marker last.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from qwenvl.errors import UserError

CHECKPOINT_PREFIX = "checkpoint-"
TEMP_PREFIX = ".tmp-"
FINAL_TEMP_NAME = TEMP_PREFIX + "final-model"
TRAINER_STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"
SCHEDULER_NAME = "scheduler.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_HASH_THREADS = 8


class CheckpointError(UserError):
    """A checkpoint that cannot be written or resumed from; the message is one line for the user."""


@dataclass
class DataPosition:
    """Where the data stream stands: the epoch's shuffled order is a function of (seed, epoch, world)."""

    epoch: int = 0
    step_in_epoch: int = 0
    seed: int = 0
    world_size: int = 1
    dataset_size: int = 0
    micro_batch_size: int = 1
    accumulation_steps: int = 1


@dataclass
class TrainerState:
    """`trainer_state.json`: what resume needs beyond tensors, in Hugging Face's spirit."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    data: DataPosition = field(default_factory=DataPosition)
    tokens_seen: int = 0
    skipped_steps: int = 0
    bad_samples: list[str] = field(default_factory=list)
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        """Parse `trainer_state.json`; a missing `global_step` or `data` or an unknown key is a ValueError."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or not {"global_step", "data"} <= raw.keys():
            raise ValueError("trainer state needs the keys 'global_step' and 'data'")
        try:
            raw["data"] = DataPosition(**raw["data"])
            return cls(**raw)
        except TypeError as exc:
            raise ValueError(f"trainer state has unexpected content: {exc}") from None


def checkpoint_step(path: str | Path) -> int | None:
    """N for a folder named `checkpoint-N`, else None."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """Both completion markers present (contents are checked by `checkpoint_problem`)."""
    return (path / MANIFEST_NAME).is_file() and (path / TRAINER_STATE_NAME).is_file()


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N` folder of `output_dir`, complete or not, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(step, path) for path in root.iterdir() if (step := checkpoint_step(path)) is not None and path.is_dir()]
    return [path for _, path in sorted(found)]


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of `output_dir`, oldest step first."""
    return [path for path in checkpoint_folders(output_dir) if is_complete(path)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete temporary folders left by a crash mid-write, mid-rotation or mid-final-save; returns them."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    ours = (TEMP_PREFIX + CHECKPOINT_PREFIX, FINAL_TEMP_NAME)
    stale = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(ours))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def rotate_checkpoints(output_dir: str | Path, limit: int | None) -> list[Path]:
    """Keep the newest `limit` complete checkpoints (HF's save_total_limit); returns the deleted ones.

    Each doomed folder is first renamed to a temporary name (one atomic step that takes it out of the
    complete set with both its markers), then deleted; a crash in between leaves a `.tmp-` folder that
    the next start removes, never a half-deleted `checkpoint-N`.
    """
    if not limit or limit <= 0:
        return []
    found = complete_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - limit)]
    for path in doomed:
        condemned = path.with_name(f"{TEMP_PREFIX}{path.name}.deleting")
        if condemned.exists():  # left by an earlier rotation cut short
            shutil.rmtree(condemned)
        os.rename(path, condemned)
        _fsync(path.parent)
        shutil.rmtree(condemned)
    return doomed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def temp_checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{TEMP_PREFIX}{CHECKPOINT_PREFIX}{step}"


def publish_checkpoint(temp_dir: Path, final_dir: Path) -> Path:
    """fsync everything, then rename the temporary folder into place.

    An older folder of the same step (a resumed run saving again) is first moved aside under a
    temporary name, so at no moment does a half-deleted `checkpoint-N` exist.
    """
    _fsync_tree(temp_dir)
    displaced = temp_dir.with_name(temp_dir.name + ".old")
    if final_dir.exists():
        os.rename(final_dir, displaced)
    os.rename(temp_dir, final_dir)
    _fsync(final_dir.parent)
    shutil.rmtree(displaced, ignore_errors=True)
    return final_dir


def _files_under(root: Path) -> list[str]:
    """Relative POSIX paths of every file below `root`, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max(1, min(_HASH_THREADS, len(paths)))) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(folder: Path) -> dict[str, Any]:
    """`manifest.json`: size and SHA-256 of every other file in `folder` (subfolders included)."""
    names = [name for name in _files_under(folder) if name != MANIFEST_NAME]
    digests = _sha256_all([folder / name for name in names])
    files = {name: {"size": (folder / name).stat().st_size, "sha256": digest} for name, digest in zip(names, digests)}
    manifest = {"format": 1, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def _read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table; ValueError when it is not one we wrote."""
    raw = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    files = raw.get("files") if isinstance(raw, dict) else None
    entries = files.values() if isinstance(files, dict) else [None]
    if not all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
               for e in entries):  # fmt: skip
        raise ValueError("no table of file sizes and checksums")
    return files


def checkpoint_problem(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint folder, in a few words per file; None when every file matches its manifest."""
    root = Path(folder)
    if not root.is_dir():
        return "not a folder"
    if not (root / MANIFEST_NAME).is_file():
        return f"no {MANIFEST_NAME} (incomplete: interrupted, or not written by this trainer)"
    try:
        files = _read_manifest(root)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{MANIFEST_NAME} is unreadable ({exc})"
    if TRAINER_STATE_NAME not in files:
        return f"{MANIFEST_NAME} does not list {TRAINER_STATE_NAME}"
    problems, to_hash = [], []
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != entry["size"]:
            kind = "empty" if size == 0 else "truncated" if size < entry["size"] else "too long"
            problems.append(f"{name} is {kind} ({size} bytes, {entry['size']} expected)")
        else:
            to_hash.append(name)
    for name, digest in zip(to_hash, _sha256_all([root / name for name in to_hash])):
        if digest != files[name]["sha256"]:
            problems.append(f"{name} does not match its SHA-256 checksum (bytes changed)")
    if not problems:
        try:
            read_trainer_state(root)
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{TRAINER_STATE_NAME} is unreadable ({exc})")
    return "; ".join(problems) or None


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    write_files: Callable[[Path], None],
    state: TrainerState,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    write_rank_files: Callable[[Path], None] = lambda path: None,
) -> Path | None:
    """The multi-rank write protocol; returns the published folder on the main rank.

    main creates the temp folder -> barrier -> every rank writes its own files -> barrier -> main writes
    the shared files, `trainer_state.json` and last `manifest.json` (covering every rank's files),
    publishes -> barrier. On an error the temp folder is removed and the previous checkpoints are untouched.
    """
    temp_dir = temp_checkpoint_dir(output_dir, step)
    final_dir = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    try:
        if is_main:
            shutil.rmtree(temp_dir, ignore_errors=True)
            temp_dir.mkdir(parents=True)
        barrier()
        write_rank_files(temp_dir)
        barrier()
        published = None
        if is_main:
            write_files(temp_dir)
            (temp_dir / TRAINER_STATE_NAME).write_text(state.to_json(), encoding="utf-8")
            write_manifest(temp_dir)
            published = publish_checkpoint(temp_dir, final_dir)
        barrier()
        return published
    except BaseException:
        if is_main:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def write_model_folder(output_dir: str | Path, write_files: Callable[[Path], None], last: str) -> None:
    """Write files into `output_dir` without ever exposing a partial file.

    `write_files` fills a temporary folder inside `output_dir`; everything is fsynced and each file is
    then moved into place with `os.replace` (atomic per file), `last` (the completion marker) at the
    end. A crash leaves whole files only, old or new, and a temporary folder the next start removes.
    On an error the temporary folder is removed and `output_dir` keeps what it had.
    """
    root = Path(output_dir)
    temp = root / FINAL_TEMP_NAME
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        write_files(temp)
        _fsync_tree(temp)
        names = sorted(_files_under(temp), key=lambda name: name == last)
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp / name, root / name)
        _fsync(root)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def read_trainer_state(checkpoint: str | Path) -> TrainerState:
    return TrainerState.from_json((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))


def optimizer_files(checkpoint: str | Path) -> list[Path]:
    root = Path(checkpoint)
    return sorted(root.glob("optimizer.safetensors")) + sorted(root.glob("optimizer-rank*.safetensors"))


def rng_state() -> dict[str, Any]:
    """Python, numpy (global) and MindSpore generator states of this process, JSON-ready."""
    import mindspore as ms

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "mindspore": ms.get_rng_state().asnumpy().tolist(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    import mindspore as ms

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    ms.set_rng_state(ms.Tensor(np.asarray(state["mindspore"], np.uint8)))


def rng_file(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / f"rng_state-rank{rank}.json"
