"""Flags checked before anything loads: every impossible value is a one-line error naming the flag, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenvl.train.argument import parse_args
from qwenvl.errors import FlagError
from qwenvl.train.validation import validate_flags


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    """What validation looks for in a model folder (a config naming the family, tokenizer, weights); no real content."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _validate(model_dir: Path, *flags: str) -> None:
    argv = ["--model_name_or_path", str(model_dir), "--dataset_use", "demo_images", "--output_dir",
            str(model_dir.parent / "out"), "--tune_mm_mlp", "True", *flags]  # fmt: skip
    validate_flags(*parse_args(argv))


BAD_FLAGS = [
    (("--learning_rate=-1e-3",), "--learning_rate -0.001: must be a finite number >= 0"),
    (("--learning_rate", "nan"), "--learning_rate nan"),
    (("--mm_projector_lr", "-1"), "--mm_projector_lr -1.0"),
    (("--vision_tower_lr", "-1"), "--vision_tower_lr -1.0"),
    (("--weight_decay", "-0.1"), "--weight_decay -0.1"),
    (("--max_grad_norm", "-1"), "--max_grad_norm -1.0"),
    (("--adam_beta1", "1"), "--adam_beta1 1.0: must be in [0, 1)"),
    (("--adam_beta2", "-0.5"), "--adam_beta2 -0.5"),
    (("--adam_epsilon", "0"), "--adam_epsilon 0.0: must be > 0"),
    (("--save_steps", "0"), "--save_steps 0.0: must be a positive whole number of steps"),
    (("--save_steps", "-5"), "--save_steps -5.0"),
    (("--save_steps", "2.5"), "--save_steps 2.5"),
    (("--logging_steps", "0"), "--logging_steps 0.0"),
    (("--eval_strategy", "steps", "--eval_dataset_use", "demo_images", "--eval_steps", "0"), "--eval_steps 0.0"),
    (("--max_steps", "0", "--num_train_epochs", "0"), "--num_train_epochs 0.0: must be > 0 unless --max_steps"),
    (("--num_train_epochs", "-1", "--max_steps", "5"), "--num_train_epochs -1.0: must be at least 0"),
    (("--per_device_train_batch_size", "0"), "--per_device_train_batch_size 0: must be at least 1"),
    (("--per_device_eval_batch_size", "0"), "--per_device_eval_batch_size 0"),
    (("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps 0"),
    (("--warmup_ratio", "1.5"), "--warmup_ratio 1.5: must be in [0, 1]"),
    (("--warmup_ratio", "-0.1"), "--warmup_ratio -0.1"),
    (("--eval_strategy", "steps"), "--eval_strategy steps needs --eval_dataset_use"),
    (("--eval_dataset_use", "demo_images"), "--eval_dataset_use is set but --eval_strategy is 'no'"),
    (("--min_pixels", "1000", "--max_pixels", "500"), "--min_pixels 1000: must not exceed --max_pixels 500"),
    (("--min_pixels", "0"), "--min_pixels 0: must be at least 1"),
    (("--video_min_frames", "9"), "--video_min_frames 9: must not exceed --video_max_frames 8"),
    (("--video_min_frame_pixels", "100000"), "--video_min_frame_pixels 100000"),
    (("--video_min_pixels", "1000000"), "--video_min_pixels 1000000"),
    (("--video_fps", "0"), "--video_fps 0.0"),
    (("--base_interval", "0"), "--base_interval 0"),
    (("--decode_max_pixels", "0"), "--decode_max_pixels 0"),
    (("--decode_max_pixels", "400000000"), "--decode_max_pixels 400000000: PIL refuses"),
    (("--model_max_length", "0"), "--model_max_length 0"),
    (("--seed", "4294967296"), "--seed 4294967296: must be in [0, 2**32)"),
    (("--save_total_limit", "0"), "--save_total_limit 0: must be at least 1"),
    (("--bf16", "True", "--fp16", "True"), "--bf16 and --fp16 are exclusive"),
    (("--lora_r", "0"), "--lora_r 0: must be at least 1"),
    (("--lora_alpha", "0"), "--lora_alpha 0"),
    (("--lora_dropout", "1"), "--lora_dropout 1.0: must be in [0, 1)"),
    (("--lora_dropout", "-0.1"), "--lora_dropout -0.1"),
    (("--lora_enable", "True", "--lora_target_modules", ","), "--lora_target_modules ',': names no module"),
    (("--dataset_use", " "), "--dataset_use ' ': names no dataset"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_each_impossible_flag_is_named(model_dir, flags, message):
    with pytest.raises(FlagError) as info:
        _validate(model_dir, *flags)
    assert str(info.value).startswith(message)
    assert "\n" not in info.value.one_line()


@pytest.mark.parametrize("flag", ["--lora_r", "--seed", "--warmup_steps", "--dataloader_num_workers", "--max_pixels"])
def test_negative_integers_stop_in_the_parser(model_dir, flag, capsys):
    """Integer flags take digits (or products of them), so argparse itself refuses `-4` in one line, exit 2."""
    with pytest.raises(SystemExit) as info:
        _validate(model_dir, f"{flag}=-4")
    assert info.value.code == 2
    assert f"argument {flag}: expected an integer" in capsys.readouterr().err


def test_defaults_and_upstream_values_pass(model_dir):
    _validate(model_dir)
    _validate(model_dir, "--max_steps", "0", "--num_train_epochs", "1", "--save_steps", "0.25", "--logging_steps", "1")
    _validate(model_dir, "--warmup_ratio", "1", "--learning_rate", "0", "--eval_strategy", "epoch", "--eval_dataset_use", "x")


def test_a_run_that_trains_nothing_is_refused(model_dir):
    with pytest.raises(FlagError, match="nothing would train: set --tune_mm_llm"):
        _validate(model_dir, "--tune_mm_mlp", "False")
    _validate(model_dir, "--tune_mm_mlp", "False", "--lora_enable", "True")


def test_model_folder_problems_are_named(model_dir, tmp_path):
    with pytest.raises(FlagError, match="no such folder"):
        _validate(tmp_path / "absent")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FlagError, match=r"no \*\.safetensors weights"):
        _validate(model_dir)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(FlagError, match="no tokenizer"):
        _validate(model_dir)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FlagError, match="model_type 'llama' is not one of"):
        _validate(model_dir)
    (model_dir / "config.json").unlink()
    with pytest.raises(FlagError, match="config.json not found"):
        _validate(model_dir)


def test_output_dir_that_is_a_file(model_dir):
    (model_dir.parent / "out").write_text("")
    with pytest.raises(FlagError, match="--output_dir .*out: exists and is not a folder"):
        _validate(model_dir)
