"""Bad inputs of every kind: training and tools/check_data.py reach the same verdict with the same message.

Training's verdict is taken the way training takes it: flags parsed by train_qwen's parser (defaults
included, e.g. --model_max_length 512), the encoder and dataset built as `_train` builds them, and one
epoch of the step loader, which reports each bad sample with its step. check_data's verdict is its
problems file and exit code from `check_data.main` with the same flags. Each case also states the
expected verdict independently (kind and the words of the reason, or accepted).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl.data.errors import PROBLEM_KINDS, DatasetError, SampleError
from qwenvl.data.buckets import ShapeBuckets
from qwenvl.data.pipeline import build_collator, build_dataset, build_encoder
from qwenvl.train.argument import parse_args
from qwenvl.train.data_loader import StepLoader, epoch_plan
from tests.avi_writer import write_mjpeg_avi
from tests.bad_media import mode_images, write_bilevel_png, write_truncated_jpeg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import check_data  # noqa: E402


def _qa(question: str, answer: str = "A shape.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _image(name: str, question: str = "<image>\nWhat is it?", answer: str = "A shape.") -> dict:
    return {"image": name, "conversations": _qa(question, answer)}


def _video(name: str) -> dict:
    return {"video": name, "conversations": _qa("<video>\nWhere does it move?")}


@dataclass(frozen=True)
class Case:
    name: str
    line: object  # a sample (dumped as JSON) or raw bytes for the JSONL line
    kind: str | None  # None: training uses the sample
    reason: str = ""  # words the reason must contain


LONG_TEXT = "please describe every detail of this picture " * 80  # ~560 tokens: longer than the default 512
CASES = [
    Case("rgb_image", _image("good.png"), None),
    Case("text_only", {"conversations": _qa("Text only?", "Yes.")}, None),
    Case("role_content_and_system", {"image": "good.png", "conversations": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nShape?"},
        {"role": "assistant", "content": "A disc."}]}, None),  # fmt: skip
    Case("two_images", {"images": ["good.png", "good.png"], "conversations": _qa("<image><image>\nSame?")}, None),
    Case("absolute_path", _image("ABSOLUTE"), None),
    Case("path_outside_the_folder", _image("../outside.png"), None),
    Case("packed_item", [_image("good.png"), {"conversations": _qa("Q?")}], None),
    Case("answer_long_enough_to_cut", {"conversations": _qa("Short question?", LONG_TEXT)}, None),
    Case("png_16_bit", _image("mode_I_16.png"), None),
    Case("cmyk", _image("mode_CMYK.tif"), None),
    Case("palette_with_transparency", _image("mode_P_transparency.png"), None),
    Case("grey_with_alpha", _image("mode_LA.png"), None),
    Case("rgba", _image("mode_RGBA.png"), None),
    Case("one_bit", _image("mode_1.png"), None),
    Case("video", _video("clip.avi"), None),
    Case("missing_image", _image("absent.png"), "missing_media", "absent.png: file not found"),
    Case("zero_byte_image", _image("empty.png"), "corrupt_media", "cannot read image"),
    Case("not_an_image", _image("text.png"), "corrupt_media", "cannot identify image file"),
    Case("truncated_jpeg", _image("cut.jpg"), "corrupt_media", "cannot decode image"),
    Case("decompression_bomb", _image("bomb.png"), "too_large", "over the decoding limit of 89478485 pixels"),
    Case("huge_image", _image("huge.png"), "too_large", "(11000x11000 = 121000000 pixels)"),
    Case("float_image", _image("float.tif"), "unsupported_media", "pixel mode F"),
    Case("extreme_aspect_ratio", _image("strip.png"), "unsupported_media", "aspect ratio 250.0"),
    Case("more_tags_than_images", _image("good.png", "<image><image>\nTwo?"), "tag_count", "2 <image> tag(s)"),
    Case("image_without_tag", _image("good.png", "What is it?"), "tag_count", "0 <image> tag(s) in the prompt but 1"),
    Case("tag_without_image", {"conversations": _qa("<image>\nWhat?")}, "tag_count", "1 <image> tag(s) in the prompt"),
    Case("image_tag_in_answer", _image("good.png", answer="<image>"), "tag_in_answer", "(assistant) contains <image>"),
    Case("video_tag_in_answer", {"conversations": _qa("Q?", "<video> shows it")}, "tag_in_answer", "contains <video>"),
    Case("image_and_images_keys", {"image": "good.png", "images": ["good.png"], "conversations": _qa("<image>\nQ?")},
         "structure", "both 'image' and 'images' are set"),  # fmt: skip
    Case("image_path_not_a_string", {"image": 7, "conversations": _qa("<image>\nQ?")}, "structure", "must be a path"),
    Case("missing_conversations", {"image": "good.png", "text": "no turns"}, "structure", "empty 'conversations'"),
    Case("empty_conversations", {"conversations": []}, "structure", "missing or empty 'conversations'"),
    Case("wrong_role", {"conversations": [{"from": "bot", "value": "Hi"}]}, "structure", "turn 0 has role 'bot'"),
    Case("turn_text_not_a_string", {"conversations": [{"from": "human", "value": ["Q"]}]}, "structure", "has no text"),
    Case("no_answer_turn", {"conversations": [{"from": "human", "value": "Q?"}]}, "structure", "no assistant"),
    Case("empty_answer", {"conversations": _qa("Q?", "  ")}, "structure", "turn 1 (assistant) is empty"),
    Case("sample_not_an_object", "just a string", "structure", "a sample must be an object, got str"),
    Case("empty_pack", [], "structure", "empty pack"),
    Case("prompt_too_long_text_only", {"conversations": _qa(LONG_TEXT)}, "too_long", "no answer token is left"),
    Case("prompt_too_long_with_image", _image("large.png"), "too_long", "would split a vision block"),
    Case("missing_video", _video("absent.avi"), "missing_media", "video not found"),
    Case("truncated_video", _video("cut.avi"), "corrupt_media", "cannot decode video"),
    Case("video_without_frames", _video("zero.avi"), "corrupt_media", "cannot open video"),
    Case("malformed_json_line", b'{"image": "good.png", "conversations": [', "malformed_json", "malformed JSON"),
    Case("line_not_utf8", b'{"conversations": "\xff\xfe"}', "malformed_json", "not UTF-8 text at column 20 (byte 0xff"),
]


def _write_media(folder: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (56, 70, 3), dtype=np.uint8)).save(folder / "good.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder.parent / "outside.png")
    Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(folder / "large.png")
    Image.new("RGB", (500, 2)).save(folder / "strip.png")
    Image.fromarray(np.ones((8, 8), np.float32)).save(folder / "float.tif")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not a picture")
    write_truncated_jpeg(folder / "cut.jpg")
    write_bilevel_png(folder / "bomb.png", 20000, 20000)
    write_bilevel_png(folder / "huge.png", 11000, 11000)
    for mode, (image, suffix, _) in mode_images().items():
        image.save(folder / f"mode_{mode.replace(';', '_').replace('+', '_')}{suffix}")
    frames = np.zeros((12, 48, 64, 3), dtype=np.uint8)
    for i in range(12):
        frames[i, 10:30, 4 * i : 4 * i + 12] = (255, 200, 0)
    write_mjpeg_avi(folder / "clip.avi", frames, fps=6)
    (folder / "cut.avi").write_bytes((folder / "clip.avi").read_bytes()[:1500])
    write_mjpeg_avi(folder / "zero.avi", frames[:0], fps=6)


def _jsonl(path: Path, lines: list[object], folder: Path) -> Path:
    raw = []
    for line in lines:
        if isinstance(line, bytes):
            raw.append(line)
        else:
            text = json.dumps(line).replace('"ABSOLUTE"', json.dumps(str(folder / "good.png")))
            raw.append(text.encode())
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def training_setup(model_dir: Path, *flags: str):
    """The flags, encoder and dataset exactly as `train_qwen._train` builds them."""
    model_args, data_args, training_args = parse_args(["--model_name_or_path", str(model_dir), *flags])
    encoder = build_encoder(model_dir, data_args, training_args.model_max_length)
    dataset = build_dataset(encoder, data_args, training_args.seed, skip_bad=training_args.skip_bad_samples)
    return training_args, data_args, encoder, dataset


def training_epoch(model_dir: Path, *flags: str) -> dict[int, SampleError | None]:
    """Training's verdict per dataset index over one epoch of the step loader (one sample per step)."""
    training_args, data_args, encoder, dataset = training_setup(model_dir, *flags)
    loader = StepLoader(dataset, build_collator(encoder, data_args, ShapeBuckets((64, 128, 256, 512, 1024))), seed=training_args.seed)
    plan = epoch_plan(len(dataset), 0, 1, training_args.seed, 0, 1, 1)
    verdicts: dict[int, SampleError | None] = {}
    steps = loader.iterate()
    try:
        for step, indices in zip(steps, plan):
            (index,) = indices[0].tolist()
            verdicts[index] = step.bad[0] if step.bad else None
    finally:
        steps.close()
    return verdicts


@pytest.fixture(scope="module")
def model_dir(processor_dir_factory) -> Path:
    return processor_dir_factory("qwen2.5vl")


@pytest.fixture(scope="module")
def suite(model_dir, tmp_path_factory):
    """One JSONL with every sample-level case, judged by training and by check_data (--skip_bad_samples)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    folder = root / "set"
    folder.mkdir()
    _write_media(folder)
    path = _jsonl(folder / "samples.jsonl", [case.line for case in CASES], folder)
    train = training_epoch(model_dir, "--dataset_use", str(path), "--skip_bad_samples", "True")
    out = root / "report"
    code = check_data.main([str(path), "--model_path", str(model_dir), "--skip_bad_samples", "--output_dir", str(out)])
    problems = {p["index"]: p for p in json.loads((out / "samples_problems.json").read_text())}
    valid = json.loads((out / "samples_valid.json").read_text())
    return {"path": path, "train": train, "code": code, "problems": problems, "valid": valid, "folder": folder}


def test_the_suite_covers_every_problem_kind():
    assert len({case.name for case in CASES + FILE_CASES}) == len(CASES) + len(FILE_CASES) >= 30
    covered = {case.kind for case in CASES + FILE_CASES}
    assert covered == {None, *PROBLEM_KINDS} - {"encoding"}  # encoding: a tokenizer refusing text, no input causes it


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_training_and_check_data_agree(suite, case):
    index = CASES.index(case)
    trained = suite["train"][index]
    problem = suite["problems"].get(index)
    if case.kind is None:
        assert trained is None and problem is None
        return
    assert trained is not None and trained.kind == case.kind and case.reason in trained.reason
    assert (trained.file, trained.index, trained.line) == (str(suite["path"]), index, index + 1)
    assert str(trained).startswith(f"file {suite['path']}, sample {index}, line {index + 1}: ")
    assert problem == {"index": index, "line": index + 1, "kind": trained.kind, "reason": trained.reason}


def test_check_data_keeps_exactly_the_samples_training_uses(suite, capsys):
    used = [i for i, verdict in sorted(suite["train"].items()) if verdict is None]
    assert len(suite["train"]) == len(CASES)
    lines = suite["path"].read_bytes().split(b"\n")
    assert suite["valid"] == [json.loads(lines[i]) for i in used]
    assert suite["code"] == 0  # training with --skip_bad_samples goes on


def test_without_skip_both_stop_on_a_bad_sample(model_dir, tmp_path, capsys):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (40, 40)).save(folder / "good.png")
    path = _jsonl(folder / "two.jsonl", [_image("good.png"), _image("absent.png")], folder)
    verdicts = training_epoch(model_dir, "--dataset_use", str(path))
    assert verdicts[0] is None and verdicts[1].kind == "missing_media"  # the trainer raises it (test_trainer.py)
    assert check_data.main([str(path), "--model_path", str(model_dir), "--output_dir", str(tmp_path)]) == 2
    assert "training would stop at the first of 1 bad samples" in capsys.readouterr().err
    (bad_line,) = [c.line for c in CASES if c.name == "malformed_json_line"]
    path = _jsonl(folder / "broken.jsonl", [_image("good.png"), bad_line], folder)
    with pytest.raises(SampleError) as info:  # a malformed line stops training while it loads
        training_setup(model_dir, "--dataset_use", str(path))
    assert check_data.main([str(path), "--model_path", str(model_dir), "--output_dir", str(tmp_path)]) == 2
    problems = json.loads((tmp_path / "broken_problems.json").read_text())
    assert problems == [{"index": 1, "line": 2, "kind": "malformed_json", "reason": info.value.reason}]


@dataclass(frozen=True)
class FileCase:
    name: str
    content: bytes | None  # None: no file
    suffix: str
    kind: str | None  # None: accepted
    reason: str = ""
    rate: str = ""


FILE_CASES = [
    FileCase("missing_file", None, ".json", "annotation_file", "annotation file not found"),
    FileCase("malformed_json_file", b'[{"conversations": []},', ".json", "malformed_json", "malformed JSON at line 1"),
    FileCase("json_lines_in_a_json_file", b"{}\n{}\n", ".json", "malformed_json", "name the file .jsonl"),
    FileCase("json_not_a_list", b'{"a": 1}', ".json", "annotation_file", "must hold a list"),
    FileCase("json_not_utf8", b'[\n{"conversations": "\xe9t\xe9"}]', ".json", "annotation_file",
             "not UTF-8 text: byte 0xe9 on line 2"),  # fmt: skip
    FileCase("empty_list", b"[]", ".json", "empty_dataset", "selects no samples: the file holds no samples"),
    FileCase("empty_jsonl", b"\n\n", ".jsonl", "empty_dataset", "holds no samples"),
    FileCase("percent_zero", None, "", "empty_dataset", "dataset demo_images selects no samples", "demo_images%0"),
    FileCase("percent_rounding_to_zero", b"[GOOD]", ".json", "empty_dataset", "1 samples and %50 keeps none", "%50"),
    FileCase("bom_json", b"\xef\xbb\xbf[GOOD]", ".json", None),
    FileCase("bom_jsonl", b"\xef\xbb\xbfGOOD\nGOOD", ".jsonl", None),
    FileCase("only_bad_samples_with_skip", b'{"image": "absent.png", "conversations": []}\n{x\n', ".jsonl",
             "empty_dataset", "all 2 samples of an epoch are bad"),  # fmt: skip
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[case.name for case in FILE_CASES])
def test_file_level_verdicts_agree(model_dir, tmp_path, case, capsys):
    good = json.dumps({"conversations": _qa("Q?", "A.")}).encode()
    path = tmp_path / f"data{case.suffix}"
    if case.content is not None:
        path.write_bytes(case.content.replace(b"GOOD", good))
    entry = case.rate if case.rate.startswith("demo") else f"{path}{case.rate}"
    flags = ["--dataset_use", entry, "--skip_bad_samples", "True"]
    try:
        training_epoch(model_dir, *flags)
        trained = None
    except DatasetError as exc:
        trained = exc
    code = check_data.main(["--model_path", str(model_dir), *flags, "--output_dir", str(tmp_path / "report")])
    err = capsys.readouterr().err
    if case.kind is None:
        assert trained is None and code == 0
        return
    assert trained is not None and trained.kind == case.kind and case.reason in trained.reason
    assert code == 2
    assert f"[check_data] training would stop: {trained.one_line()}" in err


# ----- end to end: train_qwen.py and check_data.py on the tiny model ------------------------------------------


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_cli_empty_dataset_and_bad_flag_exit_2_with_one_line(tiny_model_factory, tmp_path):
    """The issue's repro: `--dataset_use demo_images%0` hung at 100% CPU; now both tools stop at once, same words."""
    import subprocess

    tiny = tiny_model_factory("qwen2.5vl")
    train = [sys.executable, str(ROOT / "qwenvl/train/train_qwen.py"), "--model_name_or_path", str(tiny),
             "--output_dir", str(tmp_path / "out")]  # fmt: skip
    env = {"GLOG_v": "3", "PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)  # noqa: E731
    empty = run(*train, "--dataset_use", "demo_images%0", "--tune_mm_mlp", "True")
    check = run(sys.executable, str(ROOT / "tools/check_data.py"), "--dataset_use", "demo_images%0", "--model_path",
                str(tiny), "--output_dir", str(tmp_path / "report"))  # fmt: skip
    message = "dataset demo_images selects no samples: the file holds 48 samples and %0 keeps none"
    assert empty.returncode == 2 and check.returncode == 2
    line = _last_line(empty.stderr)
    assert line.startswith("[train] error: file ") and message in line and "Traceback" not in empty.stderr
    assert _last_line(check.stderr) == line.replace("[train] error:", "[check_data] training would stop:")
    flag = run(*train, "--dataset_use", "demo_images", "--tune_mm_mlp", "True", "--learning_rate=-1e-3")
    assert flag.returncode == 2
    assert flag.stderr.strip() == (
        "[train] error: --learning_rate -0.001: must be a finite number >= 0 (a negative rate climbs the loss)"
    )
    (tmp_path / "registry.yaml").write_text("a: [unclosed\n")
    registry = run(*train, "--dataset_use", "a", "--tune_mm_mlp", "True", "--dataset_registry",
                   str(tmp_path / "registry.yaml"))  # fmt: skip
    assert registry.returncode == 2 and "Traceback" not in registry.stderr
    assert _last_line(registry.stderr).startswith(f"[train] error: --dataset_registry {tmp_path / 'registry.yaml'}: ")


def _mixed_dataset(folder: Path, n_good: int, bad_at: dict[int, object]) -> Path:
    """Demo samples (absolute image paths) with bad lines at the given JSONL positions."""
    demo = json.loads((ROOT / "demo" / "demo_images.json").read_text())
    good = iter({**item, "image": str(ROOT / "demo" / item["image"])} for item in demo)
    lines = [bad_at[i] if i in bad_at else next(good) for i in range(n_good + len(bad_at))]
    return _jsonl(folder / "mixed.jsonl", lines, folder)


@pytest.mark.slow
def test_a_bad_sample_without_skip_stops_training_with_one_line(tiny_model_factory, tmp_path, capsys):
    from qwenvl.train.train_qwen import main

    first = int(epoch_plan(3, 0, 1, 42, 0, 1, 1)[0][0][0])  # the first sample training meets (seed 42)
    path = _mixed_dataset(tmp_path, 2, {first: _image("absent.png")})
    flags = ["--model_name_or_path", str(tiny_model_factory("qwen2.5vl")), "--dataset_use", str(path),
             "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "1", "--max_steps", "3",
             "--tune_mm_mlp", "True"]  # fmt: skip
    assert main(flags) == 2
    reason = f"cannot read image {tmp_path / 'absent.png'}: file not found"
    assert _last_line(capsys.readouterr().err) == (
        f"[train] error: file {path}, sample {first}, line {first + 1}: {reason} "
        "(fix or remove the sample, or pass --skip_bad_samples to skip and count bad samples)"
    )


@pytest.mark.slow
def test_five_percent_bad_samples_train_to_the_end_and_are_listed(tiny_model_factory, tmp_path, capsys):
    """40 good demo samples and 2 bad ones (a missing image, a malformed line), batch 1 so each bad sample is
    a whole micro-batch: one epoch trains to the end, and the summary lists both with file, index and line;
    check_data with the same flags says training would skip exactly these two, with the same reasons."""
    from qwenvl.train.train_qwen import main

    tiny = tiny_model_factory("qwen2.5vl")
    path = _mixed_dataset(tmp_path, 40, {7: _image("absent.png"), 30: b'{"image": "x.png", "conversations": ['})
    out = tmp_path / "out"
    flags = ["--model_name_or_path", str(tiny), "--dataset_use", str(path), "--skip_bad_samples", "True"]
    assert main([*flags, "--output_dir", str(out), "--per_device_train_batch_size", "1", "--num_train_epochs", "1",
                 "--save_strategy", "no", "--logging_steps", "7", "--tune_mm_llm", "True"]) == 0  # fmt: skip
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 42 and summary["skipped_steps"] == 2
    assert sorted(summary["bad_samples"]) == [
        f"file {path}, sample 30, line 31: malformed JSON: Expecting value at column 38",
        f"file {path}, sample 7, line 8: cannot read image {tmp_path / 'absent.png'}: file not found",
    ]
    assert summary["last_loss"] < summary["first_loss"]
    capsys.readouterr()
    assert check_data.main(["--dataset_use", str(path), "--model_path", str(tiny), "--skip_bad_samples",
                            "--output_dir", str(tmp_path / "report")]) == 0  # fmt: skip
    assert "[check_data] training would skip 2 bad samples" in capsys.readouterr().out
    problems = json.loads((tmp_path / "report" / "mixed_problems.json").read_text())
    listed = sorted(f"file {path}, sample {p['index']}, line {p['line']}: {p['reason']}" for p in problems)
    assert listed == sorted(summary["bad_samples"])
