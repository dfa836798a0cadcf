"""Every flag of Hugging Face's TrainingArguments (the installed transformers 4.57, read from its source) and the
flags of public scripts derived from upstream's sft.sh are accepted: applied, or reported with a reason."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest

from qwenvl.train.argument import ALIASES, NOT_APPLICABLE, TrainingArguments, parse_args_with_notes
from qwenvl.train.train_qwen import main


def hf_training_arguments() -> dict[str, tuple[str, object]]:
    """name -> (annotation text, literal default or None) of transformers.TrainingArguments, without importing
    it (it needs torch): the class body of training_args.py parsed with `ast`."""
    source = Path(importlib.util.find_spec("transformers").origin).parent / "training_args.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments")
    fields = {}
    for statement in cls.body:
        if isinstance(statement, ast.AnnAssign) and not statement.target.id.startswith("_"):
            default = None
            for keyword in getattr(statement.value, "keywords", []):
                if keyword.arg == "default" and isinstance(keyword.value, ast.Constant):
                    default = keyword.value.value
            fields[statement.target.id] = (ast.unparse(statement.annotation), default)
    return fields


def _value(annotation: str, default: object) -> list[str]:
    if "bool" in annotation and "str" not in annotation:
        return ["True"]
    if isinstance(default, str) and default:
        return [default]
    return ["1"]


def test_every_hf_training_argument_is_applied_or_reported():
    fields = hf_training_arguments()
    assert len(fields) > 120 and "tf32" in fields and "torch_compile" in fields  # the real list was read
    applied = {f for f in TrainingArguments.__dataclass_fields__}
    for name, (annotation, default) in fields.items():
        argv = [f"--{name}", *_value(annotation, default)]
        if name in ("optim", "report_to"):
            argv = {"optim": ["--optim", "adamw_torch"], "report_to": ["--report_to", "none"]}[name]
        _, _, training, notes = parse_args_with_notes(argv)
        if name in NOT_APPLICABLE:
            assert len(notes) == 1 and notes[0].startswith(f"--{name} ignored: "), (name, notes)
        else:
            assert name in applied or ALIASES.get(name) in applied, name
            assert notes == [], (name, notes)


def test_flags_of_public_sft_scripts_parse_apply_or_say_why():
    argv = ["--tf32", "True", "--ddp_find_unused_parameters", "False", "--save_only_model", "True",
            "--evaluation_strategy", "steps", "--logging_dir", "./logs", "--torch_compile", "False",
            "--dataloader_pin_memory", "True", "--dataloader_drop_last", "True", "--group_by_modality_length", "True",
            "--data_group", "True", "--lr_scheduler_type", "cosine_with_min_lr",
            "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}', "--report_to", "wandb",
            "--per_gpu_train_batch_size", "3"]  # fmt: skip
    _, _, training, notes = parse_args_with_notes(argv)
    assert training.eval_strategy == "steps" and training.per_device_train_batch_size == 3
    assert training.lr_scheduler_type == "cosine_with_min_lr"
    assert json.loads(training.lr_scheduler_kwargs) == {"min_lr_rate": 0.1}
    assert training.report_to == "none" and training.group_by_modality_length
    ignored = {note.split()[0] for note in notes}
    assert ignored == {"--tf32", "--ddp_find_unused_parameters", "--save_only_model", "--logging_dir",
                       "--torch_compile", "--dataloader_pin_memory", "--dataloader_drop_last",
                       "--data_group", "--report_to"}  # fmt: skip
    assert "--group_by_modality_length" in next(n for n in notes if n.startswith("--data_group"))
    assert any(n.startswith("--report_to wandb ignored: ") for n in notes)
    assert parse_args_with_notes(["--report_to", "wandb,tensorboard"])[2].report_to == "tensorboard"


@pytest.mark.slow
def test_not_applicable_flags_are_reported_once_at_start(tmp_path, tiny_model_factory, capsys):
    """The notes come before anything else, once (the dry run stops before saving anything)."""
    tiny = tiny_model_factory("qwen2.5vl")
    code = main(["--model_name_or_path", str(tiny), "--dataset_use", "demo_images%10",
                 "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--dry_run", "--tf32", "True",
                 "--report_to", "wandb", "--disable_tqdm", "True", "--per_device_train_batch_size", "1",
                 "--tune_mm_mlp", "True"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("[train] --tf32 ignored: ")
    assert lines[1].startswith("[train] --report_to wandb ignored: ")
    assert out.count("--tf32 ignored") == 1


def test_model_name_or_path_is_required_and_must_be_a_local_model_folder(tmp_path, capsys):
    assert main(["--dataset_use", "demo_images"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("[train] error: --model_name_or_path is required: a local model folder "
                   "(config.json, safetensors, tokenizer)")
    assert main(["--model_name_or_path", "Qwen/Qwen2.5-VL-3B-Instruct", "--dataset_use", "demo_images"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no such folder (models load from local folders only" in err


def test_bf16_on_cpu_names_the_command_line_fix(tiny_model_factory, capsys):
    folder = tiny_model_factory("qwen2.5vl")
    assert main(["--model_name_or_path", str(folder), "--bf16", "--dataset_use", "demo_images",
                 "--tune_mm_mlp", "True"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fp16 True" in err and "no dtype flag" in err and "dtype=" not in err


@pytest.mark.parametrize("kwargs, message", [("{}", "needs one of min_lr or min_lr_rate"),
                                             ('{"min_lr": 1e-5, "min_lr_rate": 0.1}', "needs one of"),
                                             ('{"power": 2}', "power not used by")])  # fmt: skip
def test_bad_scheduler_options_are_one_line_errors(tiny_model_factory, capsys, kwargs, message):
    argv = ["--model_name_or_path", str(tiny_model_factory("qwen2.5vl")), "--lr_scheduler_type", "cosine_with_min_lr",
            "--lr_scheduler_kwargs", kwargs, "--dataset_use", "demo_images", "--tune_mm_mlp", "True"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
