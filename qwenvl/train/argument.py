"""Training flags: upstream's ModelArguments, DataArguments and TrainingArguments, names and defaults kept.

A user's `sft.sh` runs after swapping `torchrun` for `msrun`: every flag of Hugging Face's
`TrainingArguments` (transformers 4.57) and of upstream's scripts is accepted. Most are applied with the
same meaning; older spellings are aliases (`ALIASES`); the rest, which steer torch, CUDA, DeepSpeed,
the Hub or trackers, are listed with the reason in `NOT_APPLICABLE` and reported once at start
(`ignored_flag_notes`) instead of being rejected or ignored silently.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from qwenvl.cli_args import add_dataclass_args, dataclass_from_args, parse_bool
from qwenvl.data.arguments import DataArguments

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr")
REPORT_TARGETS = ("none", "tensorboard")
OPTIMIZERS = ("adamw_mindspore", "adamw_zero1_mindspore", "adamw_torch")


def _flag(default, help_text: str, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = _flag(None, "local model folder (config.json, safetensors); required")
    tune_mm_llm: bool = _flag(False, "train the language model (embeddings, decoder layers, norm, lm_head)")
    tune_mm_mlp: bool = _flag(False, "train the vision-language merger (and Qwen3 deepstack mergers)")
    tune_mm_vision: bool = _flag(False, "train the vision tower (set before the merger flag, as upstream)")


@dataclass
class TrainingArguments:
    output_dir: str = _flag("output", "where checkpoints, logs and the final model go")
    overwrite_output_dir: bool = _flag(False, "start afresh: delete output_dir's checkpoints and logs, no resume")
    cache_dir: str | None = _flag(None, "unused: models load from local folders only")
    optim: str = _flag("adamw_mindspore", "optimizer; adamw_torch is an alias of adamw_mindspore, adamw_zero1_mindspore "
                                          "of --zero_stage 1", choices=OPTIMIZERS)
    model_max_length: int = _flag(512, "per-sample token limit (text tails are cut, vision blocks never)")
    num_train_epochs: float = _flag(3.0, "epochs (fractions allowed)")
    max_steps: int = _flag(-1, "stop after this many optimizer steps (overrides epochs when > 0)")
    per_device_train_batch_size: int = _flag(8, "samples per device per micro-batch")
    per_device_eval_batch_size: int = _flag(8, "samples per device per evaluation batch")
    gradient_accumulation_steps: int = _flag(1, "micro-batches per optimizer step")
    learning_rate: float = _flag(5e-5, "base learning rate (LLM and everything not in another group)")
    mm_projector_lr: float | None = _flag(None, "learning rate for merger parameters")
    vision_tower_lr: float | None = _flag(None, "learning rate for the vision tower (only with mm_projector_lr)")
    weight_decay: float = _flag(0.0, "decoupled weight decay (biases and norms excluded)")
    adam_beta1: float = _flag(0.9, "AdamW beta1")
    adam_beta2: float = _flag(0.999, "AdamW beta2")
    adam_epsilon: float = _flag(1e-8, "AdamW epsilon")
    max_grad_norm: float = _flag(1.0, "global gradient-norm clipping (0 disables)")
    lr_scheduler_type: str = _flag("linear", "learning-rate schedule", choices=SCHEDULERS)
    lr_scheduler_kwargs: str = _flag("{}", "JSON of schedule options: num_cycles (cosine), min_lr or min_lr_rate "
                                     "(cosine_with_min_lr)")
    warmup_ratio: float = _flag(0.0, "warmup as a fraction of total steps")
    warmup_steps: int = _flag(0, "warmup steps (overrides warmup_ratio when > 0)")
    logging_steps: float = _flag(500, "log every N optimizer steps")
    save_strategy: str = _flag("steps", "when to save checkpoints", choices=("no", "steps", "epoch"))
    save_steps: float = _flag(500, "save every N optimizer steps")
    save_total_limit: int | None = _flag(None, "keep at most this many checkpoints (oldest deleted)")
    eval_strategy: str = _flag("no", "when to evaluate", choices=("no", "steps", "epoch"))
    eval_steps: float | None = _flag(None, "evaluate every N steps (defaults to logging_steps)")
    bf16: bool = _flag(False, "bfloat16 compute with fp32 master weights")
    fp16: bool = _flag(False, "float16 compute with fp32 master weights and dynamic loss scaling")
    gradient_checkpointing: bool = _flag(False, "recompute activations per decoder layer / vision block")
    layer_by_layer: bool = _flag(False, "run the decoder one layer at a time, each layer's activations recomputed in "
                                        "the backward pass: one compiled graph per layer kind, whatever the depth "
                                        "(the CPU memory saver; docs/parallel.md)")
    dataloader_num_workers: int = _flag(0, "loader worker processes")
    disable_tqdm: bool = _flag(False, "no progress bar (log lines only)")
    use_cpu: bool = _flag(False, "train on CPU even when an Ascend device is present (as QWENVL_DEVICE=CPU)")
    seed: int = _flag(42, "seed for initialisation, sampling, shuffling and dropout")
    report_to: str = _flag("none", "comma list; tensorboard writes TensorBoard events; others (wandb, ...) are "
                           "reported as not applicable: the JSONL log is always written")
    run_name: str | None = _flag(None, "a name for the run in logs")
    resume_from_checkpoint: str | None = _flag(None, "checkpoint folder to resume from (default: latest in output_dir)")
    deepspeed: str | None = _flag(None, "a DeepSpeed JSON config (upstream's zero2.json / zero3.json): its ZeRO stage, "
                                        "reduce_bucket_size and stage3_param_persistence_threshold are applied")
    zero_stage: int | None = _flag(None, "ZeRO stage 0-3: 1 shards the optimizer state, 2 also the gradients, 3 also the "
                                         "weights (gathered layer by layer); default: --deepspeed's, else 0",
                                   choices=(0, 1, 2, 3))
    lora_enable: bool = _flag(False, "train LoRA adapters instead of full weights")
    lora_r: int = _flag(64, "LoRA rank")
    lora_alpha: int = _flag(128, "LoRA alpha (scaling alpha / r)")
    lora_dropout: float = _flag(0.0, "LoRA dropout, used as given (upstream turns 0 into 0.05)")
    lora_target_modules: str = _flag("q_proj,k_proj,v_proj,o_proj", "comma list of LLM module names to adapt")
    lora_vision: bool = _flag(False, "also adapt the vision attention (qkv, proj)")
    group_by_modality_length: bool = _flag(False, "micro-batches of one modality (with / without vision) and similar "
                                                   "length: fewer padded tokens, fewer compiled shapes")
    group_by_length: bool = _flag(False, "as --group_by_modality_length (samples are always grouped by modality too)")
    skip_bad_samples: bool = _flag(False, "log and skip samples that fail to load instead of stopping")
    dry_run: bool = _flag(False, "run, print memory and step time, write no checkpoint")
    peak_tflops: float | None = _flag(None, "peak TFLOP/s of one device for the MFU in the log (default: a table of "
                                            "Ascend devices; none on CPU, where MFU is then not logged)")


# Older or per-GPU spellings of flags above, applied as those flags (HF still reads per_gpu_*; torch-era
# scripts pass --evaluation_strategy, renamed --eval_strategy in transformers 4.41 and later removed).
ALIASES = {
    "evaluation_strategy": "eval_strategy",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "no_cuda": "use_cpu",
}

_HUB = "no Hugging Face Hub access: models are local folders"
_FSDP = "no PyTorch FSDP here; --optim adamw_zero1_mindspore shards the optimizer state"
_DDP = "no torch DDP: the gradients of all trainable parameters are summed by one fused AllReduce"
_COMPILE = "the train step is always compiled (MindSpore graph mode)"
_EVAL_METRICS = "evaluation during training computes loss and perplexity; generation metrics are tools/evaluate.py"
_BEST = "no best-model tracking: output_dir holds the final weights, eval losses are in train_log.jsonl"
_BUCKETING = "use --group_by_modality_length (length groups) and --length_buckets (compiled shapes)"
_LOG_LEVELS = "the main rank prints; every rank's output is in msrun's worker logs"
_TRACKERS = ("no tracker integrations: metrics go to output_dir/train_log.jsonl (and TensorBoard with "
             "--report_to tensorboard)")

# Every other flag of HF TrainingArguments (transformers 4.57) and of scripts derived from upstream's sft.sh:
# accepted, not applied here, and why. `ignored_flag_notes` reports the ones a command line sets.
NOT_APPLICABLE = {
    "do_train": "training always runs (this entry point only trains)",
    "do_eval": "evaluation during training follows --eval_strategy and --eval_dataset_use",
    "do_predict": "no prediction pass; tools/evaluate.py generates and scores answers",
    "prediction_loss_only": _EVAL_METRICS,
    "eval_accumulation_steps": "evaluation keeps running sums of loss and tokens, nothing to accumulate",
    "eval_delay": "evaluation runs at every --eval_steps from the start",
    "torch_empty_cache_steps": "no torch CUDA cache; MindSpore manages device memory",
    "log_level": _LOG_LEVELS,
    "log_level_replica": _LOG_LEVELS,
    "log_on_each_node": _LOG_LEVELS,
    "logging_dir": "TensorBoard events go to output_dir/runs (--report_to tensorboard)",
    "logging_strategy": "logs are written every --logging_steps steps and at the last step",
    "logging_first_step": "the first log line is at --logging_steps",
    "logging_nan_inf_filter": "a step with a non-finite loss is skipped and counted (skipped_steps in the log)",
    "save_safetensors": "weights are always saved as safetensors",
    "save_on_each_node": "the main rank writes checkpoints; output_dir must be shared by the nodes",
    "save_only_model": "checkpoints always hold optimizer, scheduler and RNG state so that resume is exact; "
    "the final output_dir holds only the model",
    "restore_callback_states_from_checkpoint": "there are no trainer callbacks",
    "use_mps_device": "Apple MPS is not a MindSpore device",
    "data_seed": "the data order follows --seed",
    "jit_mode_eval": _COMPILE,
    "fp16_opt_level": "no Apex AMP: --fp16 is float16 compute with float32 master weights and loss scaling",
    "half_precision_backend": "MindSpore's own float16/bfloat16 compute (no apex or cpu_amp backends)",
    "fp16_backend": "MindSpore's own float16/bfloat16 compute (no apex or cpu_amp backends)",
    "bf16_full_eval": "evaluation uses the training compute dtype",
    "fp16_full_eval": "evaluation uses the training compute dtype",
    "tf32": "TF32 is an NVIDIA matmul mode; here matmuls run in the --bf16/--fp16/float32 compute dtype",
    "local_rank": "msrun gives every worker its rank",
    "ddp_backend": "msrun starts HCCL (Ascend) or MCCL (CPU) communication",
    "ddp_timeout": "pass msrun's --cluster_time_out (MSRUN_ARGS of scripts/launch_msrun.sh)",
    "ddp_find_unused_parameters": _DDP,
    "ddp_bucket_cap_mb": _DDP,
    "ddp_broadcast_buffers": _DDP,
    "tpu_num_cores": "no TPU",
    "tpu_metrics_debug": "no TPU",
    "debug": "torch debug modes do not apply; --dry_run measures step time and memory",
    "dataloader_drop_last": "an epoch's last, smaller micro-batch is always trained (HF's default); the loss is "
    "token-weighted, so it counts per token",
    "dataloader_prefetch_factor": "the loader prepares two steps ahead",
    "dataloader_pin_memory": "no pinned host memory: batches are numpy arrays handed to MindSpore",
    "dataloader_persistent_workers": "loader workers live for the whole run",
    "past_index": "no past states (Transformer-XL/XLNet only)",
    "remove_unused_columns": "batches hold exactly the model's inputs",
    "label_names": "the labels are the batch's labels",
    "load_best_model_at_end": _BEST,
    "metric_for_best_model": _BEST,
    "greater_is_better": _BEST,
    "ignore_data_skip": "resume rebuilds the data position without reading the skipped batches",
    "fsdp": _FSDP,
    "fsdp_min_num_params": _FSDP,
    "fsdp_config": _FSDP,
    "fsdp_transformer_layer_cls_to_wrap": _FSDP,
    "accelerator_config": "no Hugging Face Accelerate",
    "parallelism_config": "data parallel only, launched by msrun",
    "label_smoothing_factor": "the loss is plain token-mean cross-entropy (no label smoothing)",
    "optim_args": "AdamW takes --adam_beta1/--adam_beta2/--adam_epsilon/--weight_decay",
    "adafactor": "the optimizer is AdamW (--optim)",
    "data_group": _BUCKETING,
    "length_column_name": "lengths come from the encoded samples",
    "project": _TRACKERS,
    "trackio_space_id": _TRACKERS,
    "skip_memory_metrics": "memory is always logged (train_log.jsonl)",
    "use_legacy_prediction_loop": "no prediction loop",
    "push_to_hub": _HUB,
    "hub_model_id": _HUB,
    "hub_strategy": _HUB,
    "hub_token": _HUB,
    "hub_private_repo": _HUB,
    "hub_always_push": _HUB,
    "hub_revision": _HUB,
    "push_to_hub_model_id": _HUB,
    "push_to_hub_organization": _HUB,
    "push_to_hub_token": _HUB,
    "gradient_checkpointing_kwargs": "recompute is per decoder layer / vision block (torch checkpoint options)",
    "include_inputs_for_metrics": _EVAL_METRICS,
    "include_for_metrics": _EVAL_METRICS,
    "eval_do_concat_batches": _EVAL_METRICS,
    "batch_eval_metrics": _EVAL_METRICS,
    "mp_parameters": "no SageMaker model parallelism",
    "auto_find_batch_size": "the batch size is used as given",
    "full_determinism": "runs are already deterministic (seeded order, dropout and initialisation)",
    "torchdynamo": _COMPILE,
    "torch_compile": _COMPILE,
    "torch_compile_backend": _COMPILE,
    "torch_compile_mode": _COMPILE,
    "ray_scope": "no Ray hyperparameter search",
    "include_tokens_per_second": "tokens/s is always logged",
    "include_num_input_tokens_seen": "tokens seen are always counted (trainer_state.json)",
    "neftune_noise_alpha": "no NEFTune embedding noise",
    "optim_target_modules": "no GaLore/APOLLO optimizers",
    "eval_on_start": "evaluation runs at --eval_steps",
    "use_liger_kernel": "Liger kernels are Triton (CUDA) kernels",
    "liger_kernel_config": "Liger kernels are Triton (CUDA) kernels",
    "eval_use_gather_object": "no object gathering across ranks",
    "average_tokens_across_devices": "always on: the loss is normalised by the global number of supervised tokens",
}
_BOOL_FLAGS = {
    "do_train", "do_eval", "do_predict", "prediction_loss_only", "log_on_each_node", "logging_first_step",
    "logging_nan_inf_filter", "save_safetensors", "save_on_each_node", "save_only_model",
    "restore_callback_states_from_checkpoint", "use_mps_device", "jit_mode_eval", "bf16_full_eval", "fp16_full_eval",
    "tf32", "tpu_metrics_debug", "dataloader_drop_last", "dataloader_pin_memory", "dataloader_persistent_workers",
    "remove_unused_columns", "load_best_model_at_end", "greater_is_better", "ignore_data_skip", "adafactor",
    "data_group", "ddp_find_unused_parameters",
    "ddp_broadcast_buffers", "skip_memory_metrics", "use_legacy_prediction_loop", "push_to_hub", "hub_private_repo",
    "hub_always_push", "include_inputs_for_metrics", "eval_do_concat_batches", "auto_find_batch_size",
    "full_determinism", "torch_compile", "include_tokens_per_second", "batch_eval_metrics", "eval_on_start",
    "use_liger_kernel", "eval_use_gather_object", "average_tokens_across_devices",
}  # fmt: skip
_LIST_FLAGS = {"label_names", "include_for_metrics", "optim_target_modules", "fsdp"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_qwen.py",
        description="Fine-tune Qwen2-VL / Qwen2.5-VL / Qwen3-VL (MoE) with MindSpore. "
        "Launch with `python` on one device or `msrun --worker_num=N ...` for data parallel.",
    )
    for cls in (ModelArguments, DataArguments, TrainingArguments):
        add_dataclass_args(parser, cls)
    aliases = parser.add_argument_group("Older spellings, applied as the flag they name")
    for name, target in ALIASES.items():
        action = next(a for a in parser._actions if a.dest == target)
        extra = {"nargs": action.nargs, "const": action.const} if action.nargs == "?" else {}
        aliases.add_argument(f"--{name}", dest=target, type=action.type, choices=action.choices,
                             default=argparse.SUPPRESS, help=f"same as --{target}", **extra)  # fmt: skip
    ignored = parser.add_argument_group("Accepted for upstream scripts, not applicable here (a message says why)")
    known = {a.dest for a in parser._actions}
    for name, reason in NOT_APPLICABLE.items():
        if name in known:
            continue
        help_text = reason.replace("%", "%%")
        if name in _BOOL_FLAGS:
            ignored.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True, default=None, help=help_text)
        else:
            ignored.add_argument(f"--{name}", nargs="+" if name in _LIST_FLAGS else None, default=None, help=help_text)
    return parser


def _report_targets(value: str) -> tuple[str, list[str]]:
    """(`tensorboard` or `none`, the integrations asked for that are not applicable)."""
    asked = [t.strip() for t in value.replace(" ", ",").split(",") if t.strip()]
    others = [t for t in asked if t not in REPORT_TARGETS and t != "all"]
    return ("tensorboard" if {"tensorboard", "all"} & set(asked) else "none"), others


def ignored_flag_notes(namespace: argparse.Namespace) -> list[str]:
    """One line per flag set on the command line that is accepted but not applied, with the reason."""
    notes = [
        f"--{name} ignored: {reason}"
        for name, reason in NOT_APPLICABLE.items()
        if getattr(namespace, name, None) is not None
    ]
    _, others = _report_targets(namespace.report_to)
    notes.extend(f"--report_to {target} ignored: {_TRACKERS}" for target in others)
    return notes


def parse_args_with_notes(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, list[str]]:
    """The three argument groups plus the not-applicable notes to print once at start."""
    namespace = build_parser().parse_args(argv)
    notes = ignored_flag_notes(namespace)
    namespace.report_to = _report_targets(namespace.report_to)[0]
    return (
        dataclass_from_args(ModelArguments, namespace),
        dataclass_from_args(DataArguments, namespace),
        dataclass_from_args(TrainingArguments, namespace),
        notes,
    )


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    return parse_args_with_notes(argv)[:3]
