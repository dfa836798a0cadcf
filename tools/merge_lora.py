"""Merge a LoRA adapter (PEFT format, as training writes it) into its base model: a full checkpoint.

    python tools/merge_lora.py --base DIR --adapter DIR --out DIR

Every adapted weight becomes W + (lora_alpha / r) * B @ A; tensors in `non_lora_trainables.safetensors`
(vision tower or merger trained alongside LoRA) replace the base ones. The output has the base's
config.json and tensor names, and the processor and tokenizer files of the adapter folder (the training
pixel limits) or, where it has none, of the base, so it loads in `transformers` and in train_qwen.py;
the LoRA run's `args.json` comes along, so evaluate.py and infer.py ask the merged model as it was trained.
Upstream has no merge tool (QwenLM/Qwen3-VL#1715).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "qwenvl_vision.json", "generation_config.json", "args.json",
)  # fmt: skip


def merge_checkpoint(base: Path, adapter: Path, out: Path, max_shard_size: int = 5 * 2**30) -> dict[str, int]:
    """Write the merged checkpoint; returns counts of merged and replaced tensors."""
    from qwenvl.model.checkpoint_io import (TensorPlan, checkpoint_files, iter_safetensors, safetensors_tag, to_disk_name,
                                            to_memory_name, write_safetensors)  # fmt: skip
    from qwenvl.model.lora import merged_weights

    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    weights = {to_memory_name(name): array for path in checkpoint_files(base) for name, array in iter_safetensors(path)}
    merged, n_modules, replaced = merged_weights(weights, adapter)
    out.mkdir(parents=True, exist_ok=True)
    model_type = config["model_type"]
    items = list(merged.items())
    plans = [TensorPlan(to_disk_name(n, model_type), a.shape, safetensors_tag(a.dtype.name)) for n, a in items]
    write_safetensors(plans, lambda i: items[i][1], out, max_shard_size)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in PROCESSOR_FILES:
        source = adapter / name if (adapter / name).is_file() else base / name
        if source.is_file():
            shutil.copyfile(source, out / name)
    return {"merged": n_modules, "replaced": replaced}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model folder (config.json + safetensors)")
    parser.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--out", required=True, help="output folder for the merged checkpoint")
    args = parser.parse_args(argv)
    base, adapter, out = Path(args.base), Path(args.adapter), Path(args.out)
    for folder, needed in ((base, "config.json"), (adapter, "adapter_config.json"), (adapter, "adapter_model.safetensors")):
        if not (folder / needed).is_file():
            print(f"[merge_lora] error: {folder / needed} not found", file=sys.stderr)
            return 2
    try:
        counts = merge_checkpoint(base, adapter, out)
    except (ValueError, KeyError) as exc:
        print(f"[merge_lora] error: {exc}", file=sys.stderr)
        return 2
    print(f"[merge_lora] merged {counts['merged']} LoRA modules, replaced {counts['replaced']} trained tensors -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
