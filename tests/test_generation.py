"""Generation: greedy tokens equal transformers' `generate` (KV cache, its own positions) on the same
weights; the infer and evaluate CLIs on a tiny model, bad inputs reported without a traceback."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl.data.annotations import parse_sample
from qwenvl.data.arguments import DataArguments
from qwenvl.data.image_processing import VisionSettings
from qwenvl.data.processor_files import write_processor_files
from qwenvl.infer.generate import GenerationConfig, encode_prompt, load_generator, pick_token
from qwenvl.infer.grounding import Box, draw_boxes
from tests.hf_child import run_child

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
sys.path.insert(0, str(ROOT / "tools"))
import evaluate  # noqa: E402
import infer  # noqa: E402


def _item(image: str, answer: str = "") -> dict:
    return {"image": image, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                              {"from": "gpt", "value": answer}]}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen2.5vl")


def test_prompt_is_the_training_context_up_to_the_reply(tiny):
    generator = load_generator(str(tiny), DataArguments())
    sample = parse_sample(_item("images/red_circle_0.png", "A red circle."), str(DEMO))
    full = generator.encoder.encode(sample)
    prompt = encode_prompt(generator.encoder, sample)
    n = len(prompt.input_ids)
    np.testing.assert_array_equal(prompt.input_ids, full.input_ids[:n])
    np.testing.assert_array_equal(prompt.position_ids, full.position_ids[:, :n])
    assert full.labels[n - 1] == -100 and full.labels[n] != -100  # the reply starts right after the prompt
    header = generator.encoder.tokenizer.decode(prompt.input_ids)
    assert header.endswith("<|im_start|>assistant\n")


def test_greedy_tokens_equal_transformers_generate(tiny, tmp_path):
    generator = load_generator(str(tiny), DataArguments())
    prompt = encode_prompt(generator.encoder, parse_sample(_item("images/red_circle_0.png"), str(DEMO)))
    ours = generator.generate(prompt, GenerationConfig(max_new_tokens=6))
    special = generator.encoder.special
    inputs = {"input_ids": prompt.input_ids[None], "attention_mask": np.ones((1, len(prompt.input_ids)), np.int64),
              "pixel_values": prompt.pixel_values, "image_grid_thw": prompt.image_grid_thw}  # fmt: skip
    request = {"task": "generate", "base": str(tiny), "max_new_tokens": 6,
               "eos_token_ids": [special.im_end, special.pad], "pad_token_id": special.pad}  # fmt: skip
    ref = [int(t) for t in run_child(tmp_path, request, inputs)["tokens"] if t not in (special.im_end, special.pad)]
    assert len(ours) > 0 and ours == ref


def test_sampling_respects_top_k_and_seed():
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    rng = np.random.default_rng(0)
    picks = {pick_token(logits, GenerationConfig(do_sample=True, top_k=2), rng) for _ in range(200)}
    assert picks == {1, 2}
    same = [pick_token(logits, GenerationConfig(do_sample=True, seed=1), np.random.default_rng(1)) for _ in range(2)]
    assert same[0] == same[1]
    assert pick_token(logits, GenerationConfig(), rng) == 1


def test_infer_cli_answers_and_reports_missing_files(tiny, capsys):
    assert infer.main(["--model", str(tiny), "--image", str(DEMO / "images/red_circle_0.png"),
                       "--prompt", "What is it?", "--max_new_tokens", "3"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()
    assert infer.main(["--model", str(tiny), "--image", "nowhere.png", "--prompt", "x"]) == 2
    assert "file not found: nowhere.png" in capsys.readouterr().err


def test_draw_boxes_outlines_the_box(tmp_path):
    Image.new("RGB", (100, 80), (255, 255, 255)).save(tmp_path / "white.png")
    out = draw_boxes(tmp_path / "white.png", [Box(100, 100, 500, 500, "x")], tmp_path / "boxes.png", (0.1, 0.1))
    pixels = np.asarray(Image.open(out))
    assert (pixels[10, 10:50] != 255).any(axis=-1).all()  # top edge at y=10 from x=10 to 50
    assert (pixels[30, 20] == 255).all() and (pixels[70, 70] == 255).all()  # inside and outside untouched


def test_evaluate_cli_scores_and_counts_unreadable_samples(tiny, tmp_path, capsys):
    items = [_item(str(DEMO / "images/red_circle_0.png"), "A red circle."), _item("missing.png", "x"),
             _item(str(DEMO / "images/red_circle_1.png"), "A red circle.")]  # fmt: skip
    (tmp_path / "test.json").write_text(json.dumps(items), encoding="utf-8")
    out = tmp_path / "results.json"
    code = evaluate.main(["--model", str(tiny), "--dataset_use", str(tmp_path / "test.json"),
                          "--max_new_tokens", "3", "--output", str(out)])  # fmt: skip
    assert code == 0
    results = json.loads(out.read_text())
    assert results["task"] == "classification" and results["metrics"]["samples"] == 2
    assert results["metrics"]["unreadable_samples"] == 1
    assert results["problems"][0]["index"] == 1 and "missing.png" in results["problems"][0]["reason"]
    hits = [p["prediction"].strip().lower().rstrip(".") == "a red circle" for p in results["predictions"]]
    assert results["metrics"]["accuracy"] == pytest.approx(sum(hits) / 2)
    assert "missing.png" in capsys.readouterr().err


SMALL_PIXELS = VisionSettings.for_family("qwen2.5vl", max_pixels=3136, min_pixels=784)


@pytest.fixture(scope="module")
def small_pixels_model(tiny, tmp_path_factory) -> Path:
    """The tiny model as a run trained with --max_pixels 3136 --min_pixels 784 leaves it: processor files (and
    qwenvl_vision.json) recording those limits."""
    out = tmp_path_factory.mktemp("small_pixels")
    shutil.copytree(tiny, out, dirs_exist_ok=True)
    write_processor_files(out, SMALL_PIXELS, tokenizer_dir=tiny)
    return out


def _test_set(folder: Path, n: int = 1) -> Path:
    path = folder / "test.json"
    path.write_text(json.dumps([_item(str(DEMO / f"images/red_circle_{i}.png"), "A red circle.") for i in range(n)]))
    return path


@pytest.mark.slow
def test_evaluate_asks_with_the_limits_the_model_was_trained_with(small_pixels_model, tmp_path, capsys):
    """112x112 demo images: smart_resize(112, 112, factor 28, 784, 3136) -> 56x56 -> (56/14)^2 / 2^2 = 4 vision
    tokens; the training defaults (or --max_pixels 12544) keep 112x112 -> (112/14)^2 / 4 = 16."""
    test_set = _test_set(tmp_path)
    out = tmp_path / "results.json"
    assert evaluate.main(["--model", str(small_pixels_model), "--dataset_use", str(test_set), "--max_new_tokens", "1",
                          "--output", str(out)]) == 0  # fmt: skip
    results = json.loads(out.read_text())
    assert results["predictions"][0]["vision_tokens"] == 4
    assert results["settings"]["max_pixels"] == 3136 and results["settings"]["min_pixels"] == 784
    assert "min_pixels 784, max_pixels 3136" in capsys.readouterr().out
    assert evaluate.main(["--model", str(small_pixels_model), "--dataset_use", str(test_set), "--max_new_tokens", "1",
                          "--output", str(out), "--max_pixels", "12544"]) == 0  # a flag overrides  # fmt: skip
    assert json.loads(out.read_text())["predictions"][0]["vision_tokens"] == 16


def _scripted_tokens(monkeypatch, tokens: list[int]) -> None:
    """Generation picks these tokens in order, without running the model."""
    import qwenvl.infer.generate as generate

    script = iter(tokens)
    monkeypatch.setattr(generate, "pick_token", lambda logits, config, rng: next(script))
    monkeypatch.setattr(generate.Generator, "_logits", lambda self, batch: np.zeros((1, len(batch["input_ids"][0]), 1)))


def test_evaluate_counts_answers_that_hit_max_new_tokens(tiny, tmp_path, monkeypatch, capsys):
    from qwenvl.data.chat_format import SpecialTokens
    from qwenvl.data.processor_files import load_tokenizer

    im_end = SpecialTokens.from_tokenizer(load_tokenizer(tiny)).im_end
    # sample 0 ends after 2 tokens; sample 1 never ends within 4
    _scripted_tokens(monkeypatch, [40, 41, im_end, 40, 40, 40, 40])
    out = tmp_path / "results.json"
    assert evaluate.main(["--model", str(tiny), "--dataset_use", str(_test_set(tmp_path, 2)), "--max_new_tokens", "4",
                          "--output", str(out)]) == 0  # fmt: skip
    results = json.loads(out.read_text())
    assert [p["new_tokens"] for p in results["predictions"]] == [2, 4]
    assert [p["hit_max_new_tokens"] for p in results["predictions"]] == [False, True]
    assert results["metrics"]["hit_max_new_tokens"] == 1
    assert "warning: 1 of 2 answers reached --max_new_tokens 4 without ending" in capsys.readouterr().out


def test_infer_scales_qwen25_boxes_with_the_models_limits(small_pixels_model, tmp_path, monkeypatch, capsys):
    """The model saw the 112x112 image at 56x56 (its recorded max_pixels 3136): box (14, 0, 28, 56) on what it saw
    is (28, 0, 56, 112) in the original's pixels; the answer hit --max_new_tokens, which is said."""
    from qwenvl.data.processor_files import load_tokenizer

    answer = '[{"bbox_2d": [14, 0, 28, 56], "label": "circle"}]'
    _scripted_tokens(monkeypatch, load_tokenizer(small_pixels_model).encode(answer))
    n_tokens = len(load_tokenizer(small_pixels_model).encode(answer))
    assert infer.main(["--model", str(small_pixels_model), "--image", str(DEMO / "images/red_circle_0.png"),
                       "--prompt", "Locate the circle.", "--max_new_tokens", str(n_tokens)]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "[infer] box circle: (28, 0, 56, 112) px" in captured.out
    assert "warning: the answer reached --max_new_tokens" in captured.out + captured.err


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory) -> Path:
    """A LoRA run folder as training writes it: PEFT adapter naming its base, processor files, args.json."""
    from qwenvl.model import load_model
    from qwenvl.model.lora import LoraSettings, apply_lora, save_adapter

    out = tmp_path_factory.mktemp("lora_run")
    model = load_model(tiny)
    apply_lora(model, LoraSettings(4, 8.0, 0.0, ("q_proj", "v_proj"), False))
    save_adapter(model, out, str(tiny.resolve()))
    write_processor_files(out, SMALL_PIXELS, tokenizer_dir=tiny)
    return out


@pytest.mark.slow
def test_evaluate_an_adapter_writes_into_the_adapter_folder(tiny, lora_run, tmp_path):
    assert evaluate.main(["--model", str(tiny), "--adapter", str(lora_run), "--dataset_use", str(_test_set(tmp_path)),
                          "--max_new_tokens", "1"]) == 0  # fmt: skip
    results = json.loads((lora_run / "eval_results.json").read_text())
    assert not (tiny / "eval_results.json").exists()
    assert results["settings"]["adapter"] == str(lora_run) and results["predictions"][0]["vision_tokens"] == 4


@pytest.mark.slow
def test_a_lora_run_folder_as_model_reads_its_base(tiny, lora_run, tmp_path, capsys):
    (lora_run / "eval_results.json").unlink(missing_ok=True)
    test_set = _test_set(tmp_path)
    assert evaluate.main(["--model", str(lora_run), "--dataset_use", str(test_set), "--max_new_tokens", "1"]) == 0
    results = json.loads((lora_run / "eval_results.json").read_text())
    assert results["settings"]["model"] == str(tiny.resolve()) and results["settings"]["adapter"] == str(lora_run)
    assert infer.main(["--model", str(lora_run), "--image", str(DEMO / "images/red_circle_0.png"),
                       "--prompt", "What is it?", "--max_new_tokens", "2"]) == 0  # fmt: skip
    capsys.readouterr()


def test_a_lora_folder_whose_base_is_not_here_asks_for_base(lora_run, tmp_path, capsys):
    moved = tmp_path / "adapter"
    shutil.copytree(lora_run, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "Qwen/Qwen2.5-VL-3B-Instruct"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert evaluate.main(["--model", str(moved), "--dataset_use", str(_test_set(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --base BASE_MODEL_DIR" in err and "Qwen/Qwen2.5-VL-3B-Instruct" in err
    assert infer.main(["--model", str(moved), "--image", str(DEMO / "images/red_circle_0.png"), "--prompt", "x"]) == 2
    assert "pass --base" in capsys.readouterr().err
