"""Model sizes, batches and the loss every benchmark implementation shares (native, torch, mindnlp).

Weights: `make_weights(size)` builds the model once with `qwenvl.model.build_model` (seed 0) and writes it
with `save_model` (Hugging Face names), so every implementation loads the same folder.

Batches (`make_batch(workload, size)`, batch 1, no padding; numpy arrays, savable with `save_batch`):

- `textN` (N = 512, 1024, 2048): N random text tokens; every token is a target (labels = input_ids).
- `image448`: one 448x448 image, i.e. a 32x32 grid of 14-pixel patches (1024 patches, 256 image tokens after
  the 2x2 merge) inside 200 text tokens: 100 prompt tokens, <|vision_start|>, 256 <|image_pad|>,
  <|vision_end|>, 100 answer tokens; only the answer tokens are targets, so the loss reaches the vision tower
  through attention. 458 tokens in all. Pixel values are standard-normal (already "normalised" patches).
- `image224`: the same with a 224x224 image (256 patches, 64 image tokens) and 95 + 95 text tokens: 256 tokens.

Arrays: input_ids, labels (-100 = not a target), attention_mask (all ones), position_ids (3, 1, L) from our
rope index (the native model takes them; transformers computes its own from input_ids and the grid), and for
images pixel_values (patches, 3*2*14*14) and image_grid_thw (1, 3).

Loss (all implementations): token-mean cross-entropy of the shifted labels, i.e. the sum over positions t
with labels[t+1] != -100 of -log softmax(logits[t])[labels[t+1]], divided by the number of such positions
(`token_mean_cross_entropy` is the numpy definition).

Sizes (`config_for`): tiny (0.22 M), 120m (issue 14), mem109m / mem136m / mem163m (issue 10's memory configs).

    python bench/workloads.py --size 120m --workloads text512,image448 --work DIR
    # prints {"model": folder, "params": count, "batches": {workload: .npz}}

`prepare_in_child` runs that in a child process, so a benchmark parent holds neither MindSpore nor the model.
This module imports only numpy at import time: the torch reference process (which must not import
MindSpore or qwenvl) imports it for the constants, the batch files and the vision-gradient check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

IGNORE_INDEX = -100
PATCH = 14
MERGE = 2
TINY_IDS = {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}  # fmt: skip
QWEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645,
            "pad_token_id": 151643}  # fmt: skip
WORKLOADS = ("text512", "text1024", "text2048", "image448", "image224")


def _qwen25_config(text: dict, vision: dict, ids: dict) -> dict:
    """A Qwen2.5-VL config.json dict (the fields transformers 4.57 and our model read)."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    temporal = head_dim // 8  # mrope t/h/w sections of the rotary half: Qwen's [16, 24, 24] at head_dim 128
    section = [temporal, (head_dim // 2 - temporal) // 2, (head_dim // 2 - temporal) // 2]
    return {
        "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "initializer_range": 0.02,
        "attention_dropout": 0.0, "use_cache": False, "torch_dtype": "float32",
        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": section},
        **text, **ids,
        "vision_config": {"in_chans": 3, "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 2,
                          "hidden_act": "silu", "window_size": 112, "tokens_per_second": 2, "initializer_range": 0.02,
                          "out_hidden_size": text["hidden_size"], **vision},
    }  # fmt: skip


def _tiny() -> dict:
    """The tiny Qwen2.5-VL of tools/make_tiny_model.py with its 512-token vocabulary: 0.22 M params."""
    from tools.make_tiny_model import tiny_config

    return tiny_config("qwen2.5vl", {**TINY_IDS, "vocab_size": 512})


def config_for(size: str) -> dict:
    """HF config dict of a benchmark size.

    tiny: ~0.22 M params. 120m (issue 14): Qwen2.5-VL, LLM hidden 512 x 8 layers, vocab 151936 tied, vision
    depth 8 hidden 384 (intermediates 1536 / 1024: 119.7 M). mem109m / mem163m (issue 10): hidden 1024,
    vocab 32768 untied, vision hidden 640, (2 text layers, 2 vision blocks) / (6, 4): 109.0 M / 163.0 M.
    width768 / width1024 / width1280: the same with 4 text layers and 2 vision blocks, text hidden 768 / 1024 / 1280
    (intermediate 2.75x, head dim 64).
    """
    if size == "tiny":
        return _tiny()
    if size == "120m":
        text = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
                "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}  # fmt: skip
        vision = {"depth": 8, "hidden_size": 384, "intermediate_size": 1024, "num_heads": 6,
                  "fullatt_block_indexes": [3, 7]}  # fmt: skip
        return _qwen25_config(text, vision, QWEN_IDS)
    if size in MEMORY_SIZES or size in WIDTH_SIZES:
        hidden, layers, blocks = (1024, *MEMORY_SIZES[size]) if size in MEMORY_SIZES else (WIDTH_SIZES[size], 4, 2)
        text = {"hidden_size": hidden, "intermediate_size": hidden * 11 // 4, "num_hidden_layers": layers,
                "num_attention_heads": hidden // 64, "num_key_value_heads": 2, "vocab_size": 32768,
                "tie_word_embeddings": False}  # fmt: skip
        vision = {"depth": blocks, "hidden_size": 640, "intermediate_size": 1728, "num_heads": 10,
                  "fullatt_block_indexes": [blocks - 1]}  # fmt: skip
        return _qwen25_config(text, vision, {**QWEN_IDS, "image_token_id": 32001, "video_token_id": 32002,
                                             "vision_start_token_id": 32003, "vision_end_token_id": 32004,
                                             "bos_token_id": 32000, "eos_token_id": 32000, "pad_token_id": 32000})
    raise ValueError(f"unknown size {size!r}: one of {', '.join(SIZES)}")


# issue 10's memory configs (text layers, vision blocks): 109.0 M and 163.0 M parameters, and one between
MEMORY_SIZES = {"mem109m": (2, 2), "mem136m": (4, 3), "mem163m": (6, 4)}
# the same family at one depth (4 text layers, 2 vision blocks), text hidden size varied: costs that grow with the
# layer count (the compiled graph, each layer's activations) stay out of the slope over these
WIDTH_SIZES = {"width768": 768, "width1024": 1024, "width1280": 1280}
SIZES = ("tiny", "120m", *MEMORY_SIZES, *WIDTH_SIZES)
# image workloads: image side in pixels, and the prompt and answer text tokens around the image
IMAGES = {"image448": (448, 100), "image224": (224, 95), "image1k": (224, 479)}


def _text_settings(config: dict) -> dict:
    return {**config, **(config.get("text_config") or {})}


def make_weights(size: str | dict, root: str | Path | None = None, seed: int = 0) -> Path:
    """Folder with config.json + safetensors of `size` (a size name or a config dict), built once per config.

    The folder name carries a hash of the config and seed, so a second call with the same root reuses it.
    """
    config = config_for(size) if isinstance(size, str) else dict(size)
    digest = hashlib.sha256(json.dumps([config, seed], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(root) if root is not None else Path(tempfile.gettempdir()) / "qwenvl-bench-weights"
    out = root / f"{size if isinstance(size, str) else 'custom'}-{digest}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from qwenvl.model import build_model, save_model

    save_model(build_model(config, seed=seed), out)
    return out


def stored_parameters(model_dir: str | Path) -> int:
    """Parameters in a folder's safetensors (save_model writes tied weights once), from the file headers."""
    total = 0
    for path in Path(model_dir).glob("*.safetensors"):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
    return total


def make_batch(workload: str, size: str | dict, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch-1 row of `workload` for the vocabulary and token ids of `size` (layout: module docstring)."""
    config = config_for(size) if isinstance(size, str) else dict(size)
    text = _text_settings(config)
    ids = {key: int(config.get(key, text.get(key))) for key in TINY_IDS}
    tiny = max(ids.values()) < 16  # tiny ids sit below the text tokens, Qwen's above them
    first_text, last_text = (16, text["vocab_size"]) if tiny else (0, min(ids.values()))
    rng = np.random.default_rng(seed)

    def tokens(n: int) -> np.ndarray:
        return rng.integers(first_text, last_text, n)

    if workload.startswith("text"):
        input_ids = tokens(int(workload[4:]))[None]
        batch = {"input_ids": input_ids, "labels": input_ids.copy()}
    elif workload in IMAGES:
        side, text_tokens = IMAGES[workload]
        grid = np.array([[1, side // PATCH, side // PATCH]], np.int64)
        n_image = int(grid.prod()) // MERGE**2
        prompt, answer = tokens(text_tokens), tokens(text_tokens)
        row = np.concatenate([prompt, [ids["vision_start_token_id"]], np.full(n_image, ids["image_token_id"]),
                              [ids["vision_end_token_id"]], answer])  # fmt: skip
        input_ids = row[None]
        labels = np.full_like(input_ids, IGNORE_INDEX)
        labels[0, -len(answer) :] = answer
        patch_dim = 3 * 2 * PATCH * PATCH
        batch = {"input_ids": input_ids, "labels": labels, "image_grid_thw": grid,
                 "pixel_values": rng.standard_normal((int(grid.prod()), patch_dim)).astype(np.float32)}  # fmt: skip
    else:
        raise ValueError(f"unknown workload {workload!r}: one of {', '.join(WORKLOADS)}")
    batch["input_ids"] = batch["input_ids"].astype(np.int64)
    batch["labels"] = batch["labels"].astype(np.int64)
    batch["attention_mask"] = np.ones_like(batch["input_ids"])
    batch["position_ids"] = _position_ids(batch, ids)
    return batch


def _position_ids(batch: dict, ids: dict) -> np.ndarray:
    from qwenvl.data.rope2d import rope_index_fn

    position_ids, _ = rope_index_fn("qwen2.5vl")(
        MERGE, batch["input_ids"], batch.get("image_grid_thw"), None, image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"], vision_start_token_id=ids["vision_start_token_id"])  # fmt: skip
    return np.asarray(position_ids, np.int64)


def n_tokens(batch: dict) -> int:
    """Input tokens of a batch (the tokens/s numerator)."""
    return int(np.asarray(batch["input_ids"]).size)


def token_mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The shared loss definition in numpy (float64): shifted targets, -100 ignored, mean over targets."""
    logits = np.asarray(logits, np.float64)[:, :-1]
    targets = np.asarray(labels)[:, 1:]
    keep = targets != IGNORE_INDEX
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.where(keep, targets, 0)[..., None], -1)[..., 0]
    return float(-(picked * keep).sum() / keep.sum())


def save_batch(batch: dict, path: str | Path) -> Path:
    np.savez(path, **{key: value for key, value in batch.items() if value is not None})
    return Path(path)


def load_batch(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as stored:
        return {key: stored[key] for key in stored.files}


VISION_PREFIX = "model.visual."


def vision_grad_summary(named_grads) -> dict:
    """{"norm", "tensors", "zero": names} over the vision tower's gradients from (name, numpy array) pairs.

    The bench asserts `zero` is empty for every implementation, so each one does the vision backward pass.
    """
    squares, tensors, zero = 0.0, 0, []
    for name, grad in named_grads:
        if not name.startswith(VISION_PREFIX):
            continue
        tensors += 1
        square = float(np.square(np.asarray(grad, np.float64)).sum())
        squares += square
        if square == 0.0:
            zero.append(name)
    return {"norm": squares**0.5, "tensors": tensors, "zero": zero}


def check_vision_grads(summary: dict | None, impl: str) -> None:
    """AssertionError unless every vision-tower tensor got a non-zero gradient."""
    if summary is None or summary["tensors"] == 0:
        raise AssertionError(f"{impl}: no vision-tower gradients reported")
    if summary["zero"]:
        raise AssertionError(f"{impl}: {len(summary['zero'])}/{summary['tensors']} vision-tower gradients are all "
                             f"zero, e.g. {summary['zero'][:3]}")  # fmt: skip


def prepare_in_child(size: str, workloads: list[str], work: str | Path) -> dict:
    """{"model": folder, "params": count, "batches": {workload: npz}} for `size`, built in a child process (this
    venv's python), so the caller holds neither MindSpore nor the model while it measures other processes."""
    cmd = [sys.executable, __file__, "--size", size, "--workloads", ",".join(workloads), "--work", str(work)]
    env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"preparing {size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a size's weights and workload batches; print their paths.")
    parser.add_argument("--size", required=True, choices=SIZES)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list (textN for any N, image448)")
    parser.add_argument("--work", required=True, help="output folder")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_weights(args.size, work)
    batches = {w: str(save_batch(make_batch(w, args.size), work / f"{args.size}_{w}.npz"))
               for w in args.workloads.split(",")}
    print(json.dumps({"model": str(model_dir), "params": stored_parameters(model_dir), "batches": batches}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
