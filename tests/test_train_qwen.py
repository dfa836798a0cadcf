"""train_qwen.py end to end on a tiny Qwen2.5-VL: training, HF-format checkpoints that transformers and a
fresh process load to equal logits, and resume equal to an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from qwenvl.data.annotations import parse_sample
from qwenvl.data.arguments import DataArguments
from qwenvl.data.collators import collate_padded
from qwenvl.data.pipeline import build_encoder
from qwenvl.model import load_model
from qwenvl.train.train_qwen import main
from tests.hf_child import run_child
from tests.msrun import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _flags(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset_use", "demo_images%25", "--output_dir", str(out),
            "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "True", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", "2", "--max_steps", "6", "--save_steps", "3", "--logging_steps", "3",
            "--model_max_length", "256", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_model_factory, tmp_path_factory) -> dict[str, Path]:
    tiny = tiny_model_factory("qwen2.5vl")
    root = tmp_path_factory.mktemp("train_qwen")
    assert main(_flags(tiny, root / "full")) == 0
    (root / "resumed").mkdir()
    shutil.copytree(root / "full" / "checkpoint-3", root / "resumed" / "checkpoint-3")
    assert main(_flags(tiny, root / "resumed")) == 0
    return {"tiny": tiny, "full": root / "full", "resumed": root / "resumed"}


def _batch(model_dir: Path) -> dict:
    encoder = build_encoder(model_dir, DataArguments())
    item = {"image": "images/blue_square_0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat do you see?"}, {"from": "gpt", "value": "A blue square."}]}  # fmt: skip
    return collate_padded([encoder.encode(parse_sample(item, str(ROOT / "demo")))], pad_token_id=encoder.special.pad)


def test_resumed_run_ends_with_the_uninterrupted_weights(runs):
    full, resumed = load_file(str(runs["full"] / "model.safetensors")), load_file(str(runs["resumed"] / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for name in full:
        np.testing.assert_allclose(resumed[name], full[name], rtol=1e-5, atol=1e-6, err_msg=name)
    base = load_file(str(runs["tiny"] / "model.safetensors"))
    assert any(not np.array_equal(base[n], full[n]) for n in full)  # it trained


def test_checkpoint_is_a_transformers_checkpoint_with_equal_logits(runs, tmp_path):
    checkpoint = runs["full"] / "checkpoint-6"
    batch = _batch(checkpoint)
    ours = load_model(checkpoint)
    ours.set_train(False)
    logits = ours.logits(**ours.prepare_inputs(batch)).asnumpy()
    ref = run_child(tmp_path / "hf", {"task": "logits", "base": str(checkpoint)}, batch)
    assert list(ref["problems"]) == []  # every HF tensor name and shape present, nothing extra
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-5)
    # and a fresh process of ours reloads it to the same logits
    np.savez(tmp_path / "batch.npz", **{k: v for k, v in batch.items() if v is not None})
    code = (
        "import sys, numpy as np\n"
        "from qwenvl.model import load_model\n"
        "m = load_model(sys.argv[1]); m.set_train(False)\n"
        "b = dict(np.load(sys.argv[2]))\n"
        "np.save(sys.argv[3], m.logits(**m.prepare_inputs(b)).asnumpy())\n"
    )
    subprocess.run([sys.executable, "-c", code, str(checkpoint), str(tmp_path / "batch.npz"), str(tmp_path / "l.npy")],
                   check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), logits, atol=1e-6)


def test_output_folder_has_processor_files_with_training_limits(runs):
    out = runs["full"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "train_summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "preprocessor_config.json").read_text())["max_pixels"] == DataArguments().max_pixels
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["last_loss"] < summary["first_loss"]
    assert json.loads((runs["resumed"] / "train_summary.json").read_text())["resumed_from"].endswith("checkpoint-3")


def test_layer_by_layer_run_ends_with_the_whole_graph_weights(runs, tmp_path, capsys):
    """`--layer_by_layer True` (one compiled graph per decoder layer kind, each layer recomputed in the backward
    pass), with the vision tower and embeddings training too: the same six steps as the whole-graph run."""
    assert main(_flags(runs["tiny"], tmp_path / "layers", "--layer_by_layer", "True")) == 0
    assert "[train] layer by layer: 2 decoder layers on 1 compiled layer graph\n" in capsys.readouterr().out
    full = load_file(str(runs["full"] / "model.safetensors"))
    layers = load_file(str(tmp_path / "layers" / "model.safetensors"))
    assert full.keys() == layers.keys()
    # atol 1% of the lr: gradients that are zero up to rounding (k_proj's bias: softmax ignores a shift of the
    # scores) get Adam steps of about the lr from float32 noise, which summation order changes
    for name in full:
        np.testing.assert_allclose(layers[name], full[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_two_msrun_workers_equal_one_process_with_accumulation(tiny_model_factory, tmp_path):
    """2 ranks x micro-batch 2 see the same global batch as 1 rank x 2 micro-batches of 2 (rank r takes every
    2nd index of one seeded permutation), and both use ZeRO-1 on 2 ranks vs plain AdamW: same final weights."""
    import os

    tiny = tiny_model_factory("qwen2.5vl")
    flags = ["--max_steps", "4", "--save_steps", "4", "--dataset_use", "demo_images%25"]
    assert main(_flags(tiny, tmp_path / "one", *flags, "--gradient_accumulation_steps", "2")) == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "GLOG_v": "3",
           "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), "LOG_DIR": str(tmp_path / "logs")}  # fmt: skip
    cmd = ["bash", str(ROOT / "scripts/launch_msrun.sh"), *_flags(tiny, tmp_path / "two", *flags, "--optim", "adamw_zero1_mindspore")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert proc.returncode == 0, (tmp_path / "logs" / "worker_0.log").read_text()[-3000:]
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    # atol 1% of the lr: Adam's first steps turn float-rounding noise in near-zero gradients into ~lr-sized moves
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert "x2;" in (tmp_path / "logs" / "worker_0.log").read_text()


@pytest.mark.parametrize("mode", ["zero3", "zero2_layer_by_layer"])
def test_zero_on_a_mix_of_image_and_text_only_samples_equals_one_process(mode, tiny_model_factory, tmp_path):
    """ZeRO on 2 msrun workers over a dataset alternating image and text-only samples, evaluated every 2 steps:
    whenever one rank's micro-batch has an image and the other's has none, the text-only rank runs its vision
    tower on an idle image (`zero3.align_vision`) so both issue the same collectives (ZeRO-3: weight gathers;
    layer by layer: the vision gradients' reduce-scatter); the run finishes and ends with the weights of one
    process taking both micro-batches by accumulation."""
    import os

    tiny = tiny_model_factory("qwen2.5vl")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images").symlink_to(ROOT / "demo" / "images")
    items = json.loads((ROOT / "demo" / "demo_images.json").read_text(encoding="utf-8"))[:8]
    for item in items[1::2]:  # every other sample without its image
        del item["image"]
        item["conversations"][0]["value"] = item["conversations"][0]["value"].replace("<image>\n", "")
    data = tmp_path / "data" / "mixed.json"
    data.write_text(json.dumps(items), encoding="utf-8")
    flags = ["--max_steps", "4", "--save_steps", "4", "--per_device_train_batch_size", "1", "--dataset_use", str(data),
             "--eval_dataset_use", str(data), "--eval_strategy", "steps", "--eval_steps", "2"]  # fmt: skip
    assert main(_flags(tiny, tmp_path / "one", *flags, "--gradient_accumulation_steps", "2")) == 0
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "GLOG_v": "3",
           "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), "LOG_DIR": str(tmp_path / "logs")}  # fmt: skip
    zero3 = tmp_path / "zero3.json"  # every weight sharded: the tiny model's are below the default threshold
    zero3.write_text('{"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}', encoding="utf-8")
    zero = ["--deepspeed", str(zero3)] if mode == "zero3" else ["--zero_stage", "2", "--layer_by_layer", "True"]
    cmd = ["bash", str(ROOT / "scripts/launch_msrun.sh"), *_flags(tiny, tmp_path / "two", *flags, *zero)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert proc.returncode == 0, (tmp_path / "logs" / "worker_0.log").read_text()[-3000:]
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-5, err_msg=name)


def _strict_json(path: Path):
    """json.loads that refuses the bare NaN/Infinity Python writes but JSON does not allow."""

    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_run_flags_are_saved_with_the_run_and_every_checkpoint(runs):
    for folder in (runs["full"], runs["full"] / "checkpoint-3", runs["full"] / "checkpoint-6"):
        saved = _strict_json(folder / "args.json")
        assert saved["learning_rate"] == 1e-3 and saved["max_steps"] == 6 and saved["world_size"] == 1
        assert saved["dataset_use"] == "demo_images%25" and saved["model_max_length"] == 256
    summary = _strict_json(runs["full"] / "train_summary.json")
    assert summary["steps"] == 6 and summary["last_checkpoint"].endswith("checkpoint-6")


def test_rerun_of_a_finished_run_has_nothing_to_do(runs, tmp_path, capsys):
    out = tmp_path / "full"
    shutil.copytree(runs["full"], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(_flags(runs["tiny"], out)) == 0
    printed = capsys.readouterr().out
    assert f"nothing to do: {out} already holds this run, finished at step 6 (checkpoint-6)" in printed
    assert "loss" not in printed.split("nothing to do")[1]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing rewritten, no NaN summary


def test_finishing_a_run_whose_final_save_was_lost_writes_valid_json(runs, tmp_path, capsys):
    """The last checkpoint holds every step but the final save never happened: the rerun resumes, trains no
    step, saves the model and a summary whose undefined losses are null (was bare NaN, invalid JSON)."""
    out = tmp_path / "full"
    shutil.copytree(runs["full"], out)
    for name in ("train_summary.json", "model.safetensors"):
        (out / name).unlink()
    assert main(_flags(runs["tiny"], out)) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoint-6'} at step 6" in printed and "loss n/a -> n/a" in printed
    summary = _strict_json(out / "train_summary.json")
    assert summary["first_loss"] is None and summary["last_loss"] is None and summary["steps"] == 6
    assert summary["resumed_from"] == str(out / "checkpoint-6")
    final, last = (load_file(str(folder / "model.safetensors")) for folder in (out, out / "checkpoint-6"))
    np.testing.assert_array_equal(final["lm_head.weight"], last["lm_head.weight"])


def test_rerun_with_other_order_or_schedule_flags_is_an_error_naming_them(runs, tmp_path, capsys):
    out = tmp_path / "full"
    shutil.copytree(runs["full"], out)
    assert main(_flags(runs["tiny"], out, "--learning_rate", "2e-3", "--max_steps", "8", "--seed", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"[train] error: {out / 'checkpoint-6'} was saved by a run")
    assert "--seed 42 -> 1" in err and "--max_steps 6 -> 8" in err and "--learning_rate 0.001 -> 0.002" in err
    assert "--overwrite_output_dir True" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_overwrite_output_dir_deletes_the_old_run_and_trains_afresh(runs, tmp_path, capsys):
    out = tmp_path / "full"
    shutil.copytree(runs["full"], out)
    flags = _flags(runs["tiny"], out, "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1")
    assert main([*flags, "--overwrite_output_dir", "True"]) == 0
    printed = capsys.readouterr().out
    assert "resumed" not in printed and "[train] done: 2 steps" in printed
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert _strict_json(out / "args.json")["max_steps"] == 2


def test_dry_run_saves_nothing_and_says_so(runs, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(_flags(runs["tiny"], out, "--max_steps", "2", "--dry_run")) == 0
    printed = capsys.readouterr().out
    assert "[dry_run] 2 steps, mean step" in printed and "nothing saved" in printed
    assert "model saved" not in printed
    assert not out.exists()


def test_log_and_summary_carry_model_flops_and_compiled_graphs(runs):
    records = [json.loads(line) for line in (runs["full"] / "train_log.jsonl").read_text().splitlines()]
    assert all(r["tflops"] > 0 and r["mfu"] is None for r in records)  # CPU without --peak_tflops: no MFU
    assert 1 <= records[-1]["graphs"] <= 6 and records[-1]["compile_s"] > 0
    summary = json.loads((runs["full"] / "train_summary.json").read_text())
    assert summary["graphs"] == records[-1]["graphs"] and summary["compile_seconds"] == records[-1]["compile_s"]
