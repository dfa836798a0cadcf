"""Fine-tune a Qwen-VL model: `python qwenvl/train/train_qwen.py <flags>` or `msrun ... train_qwen.py <flags>`.

The flags are upstream's (`--help` lists them all). The model family comes from the checkpoint's
`config.json`; models, tokenizers and processors load from local folders only. Ends with the full
model (Hugging Face format, with processor files carrying the training pixel limits) in `output_dir`,
written atomically file by file with `train_summary.json` last, and a printed summary. SIGTERM/SIGINT
stop at the next step boundary with a checkpoint and exit 143/130 (`qwenvl.train.graceful_stop`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwenvl.errors import FlagError  # noqa: E402
from qwenvl.train.argument import parse_args_with_notes  # noqa: E402
from qwenvl.train.graceful_stop import StopSignals, exit_code  # noqa: E402

SUMMARY_NAME = "train_summary.json"


def compute_dtype(training_args, device: str = "Ascend") -> str:
    """The model's compute dtype from --bf16/--fp16; bfloat16 on CPU is a FlagError telling the CLI fix."""
    if training_args.bf16 and training_args.fp16:
        raise FlagError("--bf16 and --fp16 are exclusive")
    if training_args.bf16 and device == "CPU":
        raise FlagError("--bf16 needs an Ascend device: MindSpore's CPU backend has no bfloat16 kernels. "
                        "On CPU pass --fp16 True (float16 compute) or no dtype flag (float32)")  # fmt: skip
    return "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else "float32"


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def configure_trainable(model, model_args, training_args) -> dict[str, int]:
    """Tuning flags, then LoRA adapters on top when `--lora_enable` (the LLM's base weights stay frozen).

    With LoRA the vision and merger flags still apply (upstream ignored them, #2079).
    """
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
    """Parse and validate flags, train in graph mode (`qwenvl.runtime`), restore the caller's mode and signal
    handlers afterwards.

    A user error (bad flag, bad sample, bad dataset or registry, missing model folder, a damaged checkpoint
    named by --resume_from_checkpoint, a rerun that conflicts with the checkpoint it would resume) is one
    `[train] error:` line on stderr and exit code 2; any other exception is a bug and keeps its traceback.
    SIGTERM/SIGINT stop at the next step boundary with a checkpoint and exit 143/130.
    """
    from qwenvl.errors import UserError
    from qwenvl.train.validation import validate_flags

    stop = StopSignals().install()
    try:
        model_args, data_args, training_args, notes = parse_args_with_notes(argv)
        validate_flags(model_args, data_args, training_args)
        if training_args.use_cpu:
            os.environ["QWENVL_DEVICE"] = "CPU"
        from qwenvl.runtime import graph_mode, select_device

        with graph_mode():
            device = select_device()
            dtype = compute_dtype(training_args, device)
            if not training_args.dry_run:
                return _train(model_args, data_args, training_args, device, dtype, notes, stop)
            # a dry run writes nothing where a real run lives: its log goes to a folder deleted afterwards
            scratch = tempfile.mkdtemp(prefix="qwenvl-dry-run-")
            try:
                dry = replace(training_args, output_dir=scratch)
                return _train(model_args, data_args, dry, device, dtype, notes, stop)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except UserError as exc:
        print(f"[train] error: {exc.one_line()}", file=sys.stderr)
        return 2
    finally:
        stop.uninstall()


def _train(model_args, data_args, training_args, device: str, dtype: str, notes: list[str], stop: StopSignals) -> int:
    from qwenvl.data.buckets import ShapeBuckets, describe_buckets
    from qwenvl.data.pipeline import build_collator, build_dataset, build_encoder
    from qwenvl.model import build_empty, load_weights
    from qwenvl.parallel.world import init_distributed
    from qwenvl.parallel.zero import zero_config
    from qwenvl.parallel.zero3 import shard_weights
    from qwenvl.train.checkpoint import write_model_folder
    from qwenvl.train.model_files import HFModelFiles
    from qwenvl.train.run_record import WithRunArgs, json_safe, run_args, write_run_args
    from qwenvl.train.train_step import seed_everything
    from qwenvl.train.trainer import Trainer

    dp = init_distributed()
    if dp.is_main:
        for note in notes:
            print(f"[train] {note}")
    seed_everything(training_args.seed)
    model_dir = Path(model_args.model_name_or_path)
    output_dir = Path(training_args.output_dir)
    encoder = build_encoder(model_dir, data_args, training_args.model_max_length)
    dataset = build_dataset(encoder, data_args, training_args.seed, skip_bad=training_args.skip_bad_samples)
    eval_dataset = (
        build_dataset(encoder, data_args, training_args.seed, names=data_args.eval_dataset_use)
        if data_args.eval_dataset_use
        else None
    )
    rows = training_args.per_device_train_batch_size
    buckets = ShapeBuckets.from_flag(data_args.length_buckets, rows, training_args.model_max_length,
                                     encoder.settings.frame_patch_bound)  # fmt: skip
    collate = build_collator(encoder, data_args, buckets, rows)
    zero, zero_note = zero_config(training_args)
    if zero_note and dp.is_main:
        print(f"[train] {zero_note}")
    # built empty, then frozen / adapted / sharded, then filled: no rank ever holds a whole ZeRO-3 copy
    model = build_empty(model_dir, dtype=dtype)
    trainable = configure_trainable(model, model_args, training_args)
    if zero.stage == 3 and dp.world_size > 1:
        shard_weights(model, dp.world_size, dp.rank, zero.persistence_threshold, from_values=False)
    load_weights(model, model_dir)
    if training_args.gradient_checkpointing:
        model.enable_recompute()
    record = run_args(model_args, data_args, training_args, world_size=dp.world_size)
    files = WithRunArgs(HFModelFiles(model_dir, encoder.settings), record)
    trainer = Trainer(model, training_args, dataset, collate, files, dp, progress=not training_args.disable_tqdm,
                      eval_dataset=eval_dataset, stop=stop, zero=zero)  # fmt: skip
    trainer.run_record = record
    if dp.is_main:
        print(f"[train] {model.model_type} from {model_dir} on {device} x{dp.world_size}; {len(dataset)} samples, "
              f"{trainer.total_steps} steps; trainable parameters per part {trainable}")  # fmt: skip
        print(f"[train] {describe_buckets(buckets)}")
        if trainer.step_fn.layer_runner is not None:
            print(f"[train] layer by layer: {trainer.step_fn.layer_runner.describe()}")
    finished = trainer.finished_checkpoint()
    if finished is not None and (output_dir / SUMMARY_NAME).is_file():
        if dp.is_main:
            print(f"[train] nothing to do: {output_dir} already holds this run, finished at step {trainer.total_steps} "
                  f"({finished.name}); pass --overwrite_output_dir True to train it again")  # fmt: skip
        return 0
    if dp.is_main and not training_args.dry_run:
        write_run_args(output_dir, record)
    with stop.deferred():
        outcome = trainer.train()
        if outcome.stopped_by:  # the trainer wrote the checkpoint and said so
            return exit_code(signal.Signals[outcome.stopped_by])
        summary = json_safe(asdict(outcome))
        if not training_args.dry_run:
            if dp.is_main:
                final = lambda folder: _final_files(folder, files, model, summary)  # noqa: E731
                write_model_folder(output_dir, final, last=SUMMARY_NAME)
            else:  # takes part in gathering ZeRO-3 weights, writes nothing
                files.save(model, output_dir, write=False)
    if not dp.is_main:
        return 0
    result = (f"[train] done: {summary['steps']} steps, loss {_number(summary['first_loss'], '.4f')} -> "
              f"{_number(summary['last_loss'], '.4f')}, {summary['tokens']} supervised tokens, "
              f"{summary['skipped_steps']} skipped steps, {len(summary['bad_samples'])} bad samples skipped, "
              f"mean step {summary['mean_step_seconds']:.3f} s")  # fmt: skip
    if training_args.dry_run:
        print(f"{result}; dry run: nothing saved (no checkpoint, no model, no logs)")
        return 0
    print(f"{result}; model saved to {output_dir}"
          + (f", last checkpoint {summary['last_checkpoint']}" if summary["last_checkpoint"] else ""))  # fmt: skip
    if stop.received is not None:
        print(f"[train] {signal.Signals(stop.received).name} received at the end of training; the final model was "
              "still saved completely", flush=True)  # fmt: skip
        return exit_code(stop.received)
    return 0


def _final_files(folder: Path, files, model, summary: dict) -> None:
    """The final model and `train_summary.json` (valid JSON: null for undefined numbers), into the temp folder."""
    files.save(model, folder)
    (folder / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, allow_nan=False), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
