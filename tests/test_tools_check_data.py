"""tools/check_data.py on a generated dataset with one sample per kind of problem, with the real tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qwenvl.data.annotations import parse_sample
from qwenvl.data.arguments import DataArguments
from qwenvl.data.dataset import SampleTooLong
from qwenvl.data.pipeline import build_encoder
from tests.avi_writer import write_mjpeg_avi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import check_data  # noqa: E402


def _qa(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _draw(path: Path, size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (240, 240, 230))
    ImageDraw.Draw(image).ellipse((5, 5, size[0] - 5, size[1] - 5), fill=(200, 30, 30))
    image.save(path)


@pytest.fixture()
def dataset(tmp_path) -> tuple[Path, list[str]]:
    """A JSONL file: valid samples at 0, 1, 8, 10; one problem of each kind elsewhere."""
    _draw(tmp_path / "good.png", (80, 60))
    _draw(tmp_path / "other.jpg", (300, 200))
    (tmp_path / "corrupt.jpg").write_bytes((tmp_path / "other.jpg").read_bytes()[:300])
    frames = np.zeros((12, 48, 64, 3), dtype=np.uint8)
    for i in range(12):
        frames[i, 10:30, 4 * i : 4 * i + 12] = (255, 200, 0)  # a square moving right
    write_mjpeg_avi(tmp_path / "clip.avi", frames, fps=6)
    (tmp_path / "truncated.avi").write_bytes((tmp_path / "clip.avi").read_bytes()[:1500])
    samples = [
        {"image": "good.png", "conversations": _qa("<image>\nWhat is it?", "A red disc.")},
        {"conversations": _qa("Text only?", "Yes, text only.")},
        '{"image": "good.png", "conversations": [',
        "",
        {"image": "absent.png", "conversations": _qa("<image>\nAnd this?", "Nothing.")},
        {"image": "corrupt.jpg", "conversations": _qa("<image>\nAnd this?", "Broken.")},
        {"image": "good.png", "conversations": _qa("<image><image>\nTwo?", "One.")},
        {"image": "good.png", "conversations": _qa("<image>\nEcho", "Here: <image>")},
        {"image": "good.png", "text": "no conversations"},
        {"video": "clip.avi", "conversations": _qa("<video>\nWhere does it move?", "To the right.")},
        {"video": "truncated.avi", "conversations": _qa("<video>\nAnd now?", "Cut.")},
        {
            "images": ["other.jpg"],
            "conversations": [
                {"role": "user", "content": "<image>\nDescribe."},
                {"role": "assistant", "content": "A red ellipse on a light background."},
            ],
        },
    ]
    lines = [s if isinstance(s, str) else json.dumps(s) for s in samples]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def _problems(folder: Path, stem: str) -> list[dict]:
    return json.loads((folder / f"{stem}_problems.json").read_text())


def test_every_problem_is_found_and_located(dataset, capsys):
    path, lines = dataset
    assert check_data.main([str(path)]) == 2  # training would stop at the first bad sample
    problems = _problems(path.parent, "train")
    found = [(p["index"], p["line"], p["kind"]) for p in problems]
    assert found == [
        (2, 3, "malformed_json"),
        (3, 5, "missing_media"),
        (4, 6, "corrupt_media"),
        (5, 7, "tag_count"),
        (6, 8, "tag_in_answer"),
        (7, 9, "structure"),
        (9, 11, "corrupt_media"),
    ]
    reasons = {p["index"]: p["reason"] for p in problems}
    assert "absent.png" in reasons[3] and "corrupt.jpg" in reasons[4] and "truncated.avi" in reasons[9]
    assert reasons[5] == "2 <image> tag(s) in the prompt but 1 image file(s)"
    assert "conversations" in reasons[7]
    valid = json.loads((path.parent / "train_valid.json").read_text())
    assert valid == [json.loads(lines[i]) for i in (0, 1, 9, 11)]
    out, err = capsys.readouterr()
    kinds = "malformed_json 1, structure 1, tag_count 1, tag_in_answer 1, missing_media 1, corrupt_media 2"
    assert f"problems: {kinds}" in out
    assert "videos: 1 uses, frames 12..12, fps 6.00..6.00" in out
    assert "sample 2 (line 3): [malformed_json]" in out
    assert "(token lengths and --model_max_length need --model_path" in out
    assert "[check_data] training would stop at the first of 7 bad samples" in err


def test_with_skip_bad_samples_the_verdict_is_to_train_on(dataset, capsys):
    path, _ = dataset
    assert check_data.main([str(path), "--skip_bad_samples"]) == 0
    assert "[check_data] training would skip 7 bad samples (--skip_bad_samples) and train on the others" in (
        capsys.readouterr().out
    )


def test_token_lengths_and_too_long_samples_as_training_sees_them(dataset, processor_dir_factory, tmp_path, capsys):
    """--model_max_length 60: the 300x200 image's vision block crosses token 60, so training refuses that sample
    (SampleTooLong) and check_data reports it with the same reason; the other lengths are the encoder's."""
    path, lines = dataset
    model_dir = processor_dir_factory("qwen2.5vl")
    out_dir = tmp_path / "report"
    limits = ["--model_max_length", "60", "--pack_length", "40"]
    code = check_data.main([str(path), "--model_path", str(model_dir), *limits, "--output_dir", str(out_dir)])
    assert code == 2
    uncut = build_encoder(model_dir, DataArguments())
    lengths = sorted(uncut.encode(parse_sample(json.loads(lines[i]), str(path.parent))).num_tokens for i in (0, 1, 9))
    with pytest.raises(SampleTooLong) as too_long:
        build_encoder(model_dir, DataArguments(), 60).encode(parse_sample(json.loads(lines[11]), str(path.parent)))
    problem = next(p for p in _problems(out_dir, "train") if p["index"] == 10)
    assert problem == {"index": 10, "line": 12, "kind": "too_long", "reason": too_long.value.reason}
    a, b, c = lengths
    p95 = b + 0.9 * (c - b)  # p95 of 3 values: position 0.95 * 2 = 1.9
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if line.startswith("dataset"))
    row = table[table.index(header) + 2].split()
    assert header.split()[-2:] == [">60", ">40"]
    over = [str(sum(n > limit for n in lengths)) for limit in (60, 40)]
    assert row[1:] == ["11", "3", "8", str(a), str(b), f"{p95:.0f}", str(c), *over]
    assert (out_dir / "train_valid.json").is_file() and (out_dir / "train_problems.json").is_file()
    assert not (path.parent / "train_valid.json").exists()


def test_histogram_bins_and_bars():
    lines = check_data.histogram([10, 10, 10, 20, 110])
    assert len(lines) == 10
    assert lines[0].split() == ["10", "-", "19", "|", "#" * 40, "3"]  # 10, 10, 10 below the first edge 20
    assert lines[1].split() == ["20", "-", "29", "|", "#" * 13, "1"]  # 40 * 1/3 rounded
    assert lines[-1].split() == ["100", "-", "110", "|", "#" * 13, "1"]  # the last bin is closed
    # a narrow range: one bin per integer, never an empty label
    narrow = [line.split()[:3] for line in check_data.histogram([5, 7, 7])]
    assert narrow == [["5", "-", "5"], ["6", "-", "6"], ["7", "-", "7"]]
    assert check_data.histogram([42])[0].split() == ["42", "-", "42", "|", "#" * 40, "1"]


def test_model_max_length_defaults_to_training(dataset, processor_dir_factory, tmp_path, capsys):
    path, _ = dataset
    check_data.main([str(path), "--model_path", str(processor_dir_factory("qwen2.5vl")), "--output_dir", str(tmp_path)])
    assert ">512" in capsys.readouterr().out.split()


def test_registry_input_clean_file_exits_0(tmp_path, capsys):
    (tmp_path / "media").mkdir()
    _draw(tmp_path / "media" / "a.png", (40, 40))
    items = [{"image": "a.png", "conversations": _qa("<image>\nShape?", "Disc.")}] * 3
    (tmp_path / "clean.json").write_text(json.dumps(items))
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"clean_set": {"annotation_path": "clean.json", "data_path": "media"}}))
    code = check_data.main(["--dataset_use", "clean_set%50", "--dataset_registry", str(registry)])
    assert code == 0
    out = capsys.readouterr().out
    assert "== clean_set" in out and "training rate 0.5" in out
    assert json.loads((tmp_path / "clean_valid.json").read_text()) == items
    assert _problems(tmp_path, "clean") == []


def test_file_level_problems(tmp_path, capsys):
    (tmp_path / "broken.json").write_text('{"image": "a.png"}\n{"image": "b.png"}\n')
    (tmp_path / "object.json").write_text('{"image": "a.png"}')
    code = check_data.main([str(tmp_path / name) for name in ("broken.json", "object.json", "absent.json")])
    assert code == 2
    broken = _problems(tmp_path, "broken")
    reason = "malformed JSON at line 2 column 1: Extra data (one sample per line? name the file .jsonl)"
    assert broken == [{"index": None, "kind": "malformed_json", "reason": reason}]
    assert _problems(tmp_path, "object")[0]["reason"] == "a JSON annotation file must hold a list of samples"
    assert _problems(tmp_path, "absent")[0]["kind"] == "annotation_file"


def test_setup_errors_exit_2(tmp_path, capsys):
    assert check_data.main(["--dataset_use", "no_such_set"]) == 2
    assert "do not find dataset 'no_such_set'" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("[]")
    assert check_data.main([str(tmp_path / "x.json"), "--model_path", str(tmp_path / "no_model")]) == 2
    assert "--model_name_or_path " + str(tmp_path / "no_model") + ": no such folder" in capsys.readouterr().err
    assert check_data.main([str(tmp_path / "x.json"), "--min_pixels", "9000", "--max_pixels", "100"]) == 2
    assert "[check_data] error: --min_pixels 9000: must not exceed --max_pixels 100" in capsys.readouterr().err



def test_parallel_media_checks_give_the_same_report(dataset, tmp_path):
    """Same valid file and problem list; reasons aside, since decord words the truncated video's failure
    differently depending on which of its threads meets the broken packet first."""
    path, _ = dataset
    outputs = []
    for workers in ("1", "2"):
        out_dir = tmp_path / f"workers{workers}"
        assert check_data.main([str(path), "--num_workers", workers, "--output_dir", str(out_dir)]) == 2
        problems = [(p["index"], p["line"], p["kind"]) for p in _problems(out_dir, "train")]
        outputs.append(((out_dir / "train_valid.json").read_text(), problems))
    assert outputs[0] == outputs[1]


def test_unreadable_registry_and_unwritable_output(tmp_path, capsys):
    (tmp_path / "registry.yaml").write_text("a: [unclosed\n")
    assert check_data.main(["--dataset_use", "a", "--dataset_registry", str(tmp_path / "registry.yaml")]) == 2
    assert "[check_data] error:" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("[]")
    (tmp_path / "file").write_text("")
    assert check_data.main([str(tmp_path / "x.json"), "--output_dir", str(tmp_path / "file" / "sub")]) == 2
    assert "cannot write the reports" in capsys.readouterr().err
