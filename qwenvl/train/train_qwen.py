"""Fine-tune a Qwen-VL model: `python qwenvl/train/train_qwen.py <flags>` or `msrun ... train_qwen.py <flags>`.

The flags are upstream's (`--help` lists them all). The model family comes from the checkpoint's
`config.json`; models, tokenizers and processors load from local folders only. Ends with the full
model (Hugging Face format, with processor files carrying the training pixel limits) in `output_dir`
and a printed summary.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwenvl.train.argument import parse_args  # noqa: E402

NOT_APPLICABLE = {"deepspeed": "DeepSpeed is not used; ZeRO-1 is --optim adamw_zero1_mindspore"}


def compute_dtype(training_args) -> str:
    if training_args.bf16 and training_args.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive")
    return "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else "float32"


def configure_trainable(model, model_args, training_args) -> dict[str, int]:
    """Tuning flags, then LoRA adapters on top when `--lora_enable` (the LLM's base weights stay frozen).

    With LoRA the vision and merger flags still apply (upstream ignored them, #2079).
    """
    from dataclasses import replace

    from qwenvl.train.freezing import apply_tuning_flags

    if not training_args.lora_enable:
        return apply_tuning_flags(model, model_args)
    from qwenvl.model.lora import LoraSettings, apply_lora

    if model_args.tune_mm_llm:
        print("[train] --tune_mm_llm ignored with --lora_enable: the LLM is adapted by LoRA, its base weights frozen")
    trainable = apply_tuning_flags(model, replace(model_args, tune_mm_llm=False))
    targets = tuple(t.strip() for t in training_args.lora_target_modules.split(",") if t.strip())
    settings = LoraSettings(training_args.lora_r, float(training_args.lora_alpha), training_args.lora_dropout,
                            targets, training_args.lora_vision)  # fmt: skip
    adapted = apply_lora(model, settings, seed=training_args.seed)
    trainable["lora"] = sum(int(p.size) for n, p in model.parameters_and_names() if ".lora_" in n)
    print(f"[train] LoRA r={settings.r} alpha={settings.alpha} dropout={settings.dropout} on {len(adapted)} modules")
    return trainable


def main(argv: list[str] | None = None) -> int:
    """Parse and validate flags, train in graph mode (`qwenvl.runtime`), restore the caller's mode afterwards.

    A user error (bad flag, bad sample, bad dataset or registry, missing model folder) is one line on
    stderr and exit code 2; any other exception is a bug and keeps its traceback.
    """
    from qwenvl.errors import UserError
    from qwenvl.train.validation import validate_flags

    try:
        model_args, data_args, training_args = parse_args(argv)
        validate_flags(model_args, data_args, training_args)
        from qwenvl.runtime import graph_mode, select_device

        with graph_mode():
            return _train(model_args, data_args, training_args, select_device())
    except UserError as exc:
        print(f"[train] error: {exc.one_line()}", file=sys.stderr)
        return 2


def _train(model_args, data_args, training_args, device: str) -> int:

    from qwenvl.data.pipeline import build_collator, build_dataset, build_encoder
    from qwenvl.model import load_model
    from qwenvl.train.distributed import init_distributed
    from qwenvl.train.model_files import HFModelFiles
    from qwenvl.train.train_step import seed_everything
    from qwenvl.train.trainer import Trainer

    dp = init_distributed()
    seed_everything(training_args.seed)
    model_dir = Path(model_args.model_name_or_path)
    encoder = build_encoder(model_dir, data_args, training_args.model_max_length)
    dataset = build_dataset(encoder, data_args, training_args.seed, skip_bad=training_args.skip_bad_samples)
    eval_dataset = (
        build_dataset(encoder, data_args, training_args.seed, names=data_args.eval_dataset_use)
        if data_args.eval_dataset_use
        else None
    )
    collate = build_collator(encoder, data_args, pad_to_multiple_of=64)
    model = load_model(model_dir, dtype=compute_dtype(training_args))
    trainable = configure_trainable(model, model_args, training_args)
    if training_args.gradient_checkpointing:
        model.enable_recompute()
    files = HFModelFiles(model_dir, encoder.settings)
    trainer = Trainer(model, training_args, dataset, collate, files, dp, eval_dataset=eval_dataset)
    if dp.is_main:
        for name, reason in NOT_APPLICABLE.items():
            if getattr(training_args, name):
                print(f"[train] --{name} ignored: {reason}")
        print(f"[train] {model.model_type} from {model_dir} on {device} x{dp.world_size}; {len(dataset)} samples, "
              f"{trainer.total_steps} steps; trainable parameters per part {trainable}")  # fmt: skip
    summary = trainer.train()
    if dp.is_main:
        if not training_args.dry_run:
            files.save(model, Path(training_args.output_dir))
        (Path(training_args.output_dir) / "train_summary.json").write_text(
            json.dumps(asdict(summary), indent=2), encoding="utf-8"
        )
        print(
            f"[train] done: {summary.steps} steps, loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}, "
            f"{summary.tokens} supervised tokens, {summary.skipped_steps} skipped steps, "
            f"{len(summary.bad_samples)} bad samples skipped, mean step {summary.mean_step_seconds:.3f} s; "
            f"model saved to {training_args.output_dir}"
            + (f", last checkpoint {summary.last_checkpoint}" if summary.last_checkpoint else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
