"""Fine-tune a Qwen-VL model: `python qwenvl/train/train_qwen.py <flags>` or `msrun ... train_qwen.py <flags>`.

The flags are upstream's (`--help` lists them all). The model family comes from the checkpoint's
`config.json`; models, tokenizers and processors load from local folders only. Ends with the full
model (Hugging Face format, with processor files carrying the training pixel limits) in `output_dir`,
written atomically file by file with `train_summary.json` last, and a printed summary. SIGTERM/SIGINT
stop at the next step boundary with a checkpoint and exit 143/130 (`qwenvl.train.graceful_stop`).
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwenvl.train.argument import parse_args  # noqa: E402
from qwenvl.train.graceful_stop import StopSignals, exit_code  # noqa: E402

SUMMARY_NAME = "train_summary.json"
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
    """Parse flags and train in graph mode (`qwenvl.runtime`), restoring the caller's mode and signal handlers."""
    from qwenvl.runtime import graph_mode, select_device

    model_args, data_args, training_args = parse_args(argv)
    stop = StopSignals().install()
    try:
        with graph_mode():
            return _train(model_args, data_args, training_args, select_device(), stop)
    finally:
        stop.uninstall()


def _train(model_args, data_args, training_args, device: str, stop: StopSignals) -> int:

    from qwenvl.data.pipeline import build_collator, build_dataset, build_encoder
    from qwenvl.model import load_model
    from qwenvl.train.checkpoint import write_model_folder
    from qwenvl.train.distributed import init_distributed
    from qwenvl.train.model_files import HFModelFiles
    from qwenvl.train.train_step import seed_everything
    from qwenvl.train.trainer import Trainer

    dp = init_distributed()
    seed_everything(training_args.seed)
    model_dir = Path(model_args.model_name_or_path)
    encoder = build_encoder(model_dir, data_args, training_args.model_max_length)
    dataset = build_dataset(encoder, data_args, training_args.seed)
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
    trainer = Trainer(model, training_args, dataset, collate, files, dp, eval_dataset=eval_dataset, stop=stop)
    if dp.is_main:
        for name, reason in NOT_APPLICABLE.items():
            if getattr(training_args, name):
                print(f"[train] --{name} ignored: {reason}")
        print(f"[train] {model.model_type} from {model_dir} on {device} x{dp.world_size}; {len(dataset)} samples, "
              f"{trainer.total_steps} steps; trainable parameters per part {trainable}")  # fmt: skip
    with stop.deferred():
        summary = trainer.train()
        if summary.stopped_by:  # the trainer wrote the checkpoint and said so
            return exit_code(signal.Signals[summary.stopped_by])
        if dp.is_main:
            final = lambda folder: _final_files(folder, files, model, summary, training_args)  # noqa: E731
            write_model_folder(training_args.output_dir, final, last=SUMMARY_NAME)
    if dp.is_main:
        print(
            f"[train] done: {summary.steps} steps, loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}, "
            f"{summary.tokens} supervised tokens, {summary.skipped_steps} skipped steps, "
            f"{len(summary.bad_samples)} bad samples skipped, mean step {summary.mean_step_seconds:.3f} s; "
            f"model saved to {training_args.output_dir}"
            + (f", last checkpoint {summary.last_checkpoint}" if summary.last_checkpoint else "")
        )
    if stop.received is not None:
        print(f"[train] {signal.Signals(stop.received).name} received at the end of training; the final model was "
              "still saved completely", flush=True)  # fmt: skip
        return exit_code(stop.received)
    return 0


def _final_files(folder: Path, files, model, summary, training_args) -> None:
    """The final model (not in a dry run) and `train_summary.json`, written into the temporary folder."""
    if not training_args.dry_run:
        files.save(model, folder)
    (folder / SUMMARY_NAME).write_text(json.dumps(asdict(summary), indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
