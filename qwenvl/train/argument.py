"""Training flags: upstream's ModelArguments, DataArguments and TrainingArguments, names and defaults kept.

A user's `sft.sh` runs after swapping `torchrun` for `msrun`: every flag upstream's scripts pass is
accepted here with the same meaning. Flags that only steer DeepSpeed or wandb are accepted and
reported as not applicable rather than rejected.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from qwenvl.cli_args import add_dataclass_args, dataclass_from_args
from qwenvl.data.arguments import DataArguments

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw_mindspore", "adamw_zero1_mindspore", "adamw_torch")


def _flag(default, help_text: str, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class ModelArguments:
    model_name_or_path: str = _flag("Qwen/Qwen2.5-VL-3B-Instruct", "local model folder (config.json, safetensors)")
    tune_mm_llm: bool = _flag(False, "train the language model (embeddings, decoder layers, norm, lm_head)")
    tune_mm_mlp: bool = _flag(False, "train the vision-language merger (and Qwen3 deepstack mergers)")
    tune_mm_vision: bool = _flag(False, "train the vision tower (set before the merger flag, as upstream)")


@dataclass
class TrainingArguments:
    output_dir: str = _flag("output", "where checkpoints, logs and the final model go")
    cache_dir: str | None = _flag(None, "unused: models load from local folders only")
    optim: str = _flag("adamw_mindspore", "optimizer; adamw_torch is an alias of adamw_mindspore", choices=OPTIMIZERS)
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
    dataloader_num_workers: int = _flag(0, "loader worker processes")
    seed: int = _flag(42, "seed for initialisation, sampling, shuffling and dropout")
    report_to: str = _flag("none", "tensorboard writes TensorBoard events; wandb/none write only the JSONL log")
    run_name: str | None = _flag(None, "a name for the run in logs")
    resume_from_checkpoint: str | None = _flag(None, "checkpoint folder to resume from (default: latest in output_dir)")
    deepspeed: str | None = _flag(None, "accepted for upstream scripts; ZeRO-1 is --optim adamw_zero1_mindspore")
    lora_enable: bool = _flag(False, "train LoRA adapters instead of full weights")
    lora_r: int = _flag(64, "LoRA rank")
    lora_alpha: int = _flag(128, "LoRA alpha (scaling alpha / r)")
    lora_dropout: float = _flag(0.0, "LoRA dropout, used as given (upstream turns 0 into 0.05)")
    lora_target_modules: str = _flag("q_proj,k_proj,v_proj,o_proj", "comma list of LLM module names to adapt")
    lora_vision: bool = _flag(False, "also adapt the vision attention (qkv, proj)")
    skip_bad_samples: bool = _flag(False, "log and skip samples that fail to load instead of stopping")
    dry_run: bool = _flag(False, "run, print memory and step time, write no checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_qwen.py",
        description="Fine-tune Qwen2-VL / Qwen2.5-VL / Qwen3-VL (MoE) with MindSpore. "
        "Launch with `python` on one device or `msrun --worker_num=N ...` for data parallel.",
    )
    for cls in (ModelArguments, DataArguments, TrainingArguments):
        add_dataclass_args(parser, cls)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    namespace = build_parser().parse_args(argv)
    return (
        dataclass_from_args(ModelArguments, namespace),
        dataclass_from_args(DataArguments, namespace),
        dataclass_from_args(TrainingArguments, namespace),
    )
