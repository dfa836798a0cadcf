"""tools/convert_imagefolder.py on small drawn image sets: split counts by hand, registry loads for training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from qwenvl.data import data_list, load_registry_file
from qwenvl.data.annotations import load_records, parse_record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import convert_imagefolder  # noqa: E402

CLASS_SIZES = {"daisy": 10, "pink_primrose": 5, "rose": 1}


def _draw(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (shade, 255 - shade, 128)).save(path)


@pytest.fixture()
def folder_root(tmp_path) -> Path:
    root = tmp_path / "flowers"
    for name, size in CLASS_SIZES.items():
        for i in range(size):
            _draw(root / name / f"{i:03d}.jpg", 20 * i)
    (root / "daisy" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    return root


def _run(*args: str) -> int:
    return convert_imagefolder.main([str(a) for a in args])


def test_split_counts_are_stratified_and_registry_trains(folder_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run("--root", folder_root, "--output_dir", out, "--split", "8,1,1", "--seed", "3") == 0
    # per class, largest remainder: 10 -> 8/1/1; 5 -> 4/0.5/0.5 -> 4/1/0 (tie to the earlier split); 1 -> 1/0/0
    splits = {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    per_class = {s: {c: 0 for c in ("daisy", "pink primrose", "rose")} for s in splits}
    for s, samples in splits.items():
        for sample in samples:
            per_class[s][sample["conversations"][1]["value"]] += 1
    assert per_class["train"] == {"daisy": 8, "pink primrose": 4, "rose": 1}
    assert per_class["val"] == {"daisy": 1, "pink primrose": 1, "rose": 0}
    assert per_class["test"] == {"daisy": 1, "pink primrose": 0, "rose": 0}
    all_images = sorted(s["image"] for samples in splits.values() for s in samples)
    assert all_images == sorted(f"{c}/{i:03d}.jpg" for c, n in CLASS_SIZES.items() for i in range(n))
    assert (out / "classes.txt").read_text().splitlines() == ["daisy", "pink primrose", "rose"]
    question = splits["train"][0]["conversations"][0]
    prompt = convert_imagefolder.DEFAULT_PROMPT.replace("{classes}", "daisy, pink primrose, rose")
    assert question == {"from": "human", "value": "<image>\n" + prompt}
    # the registry resolves through the training pipeline to existing images
    registry = load_registry_file(out / "registry.json")
    assert sorted(registry) == ["flowers_test", "flowers_train", "flowers_val"]
    records = load_records(data_list("flowers_train,flowers_val", registry), seed=0)
    samples = [s for r in records for s in parse_record(r)]
    assert len(samples) == 15
    assert all(Path(s.images[0]).is_file() for s in samples)
    assert "-> train 13, val 2, test 1" in capsys.readouterr().out


def test_seed_decides_the_split(folder_root, tmp_path):
    outputs = []
    for seed, folder in ((1, "a"), (1, "b"), (2, "c")):
        _run("--root", folder_root, "--output_dir", tmp_path / folder, "--seed", seed, "--split", "0.5,0.5")
        outputs.append((tmp_path / folder / "train.json").read_text())
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]
    assert not (tmp_path / "a" / "test.json").exists()


def test_prompt_template_and_underscores(folder_root, tmp_path):
    out = tmp_path / "out"
    template = ["--prompt_template", "Pick from [{classes}]"]
    _run("--root", folder_root, "--output_dir", out, "--keep_underscores", *template, "--split", "1", "--name", "fl")
    sample = json.loads((out / "train.json").read_text())[0]
    assert sample["conversations"][0]["value"] == "<image>\nPick from [daisy, pink_primrose, rose]"
    assert list(json.loads((out / "registry.json").read_text())) == ["fl_train"]


def test_csv_with_integer_labels_skips_bad_rows(tmp_path, capsys):
    for i in range(6):
        _draw(tmp_path / "jpg" / f"image_{i}.jpg", 30 * i)
    (tmp_path / "names.txt").write_text("pink primrose\nhard-leaved pocket orchid\ncanterbury bells\n")
    rows = ["file,label"] + [f"jpg/image_{i}.jpg,{1 + i % 3}" for i in range(6)]
    rows += ["jpg/missing.jpg,1", "jpg/image_0.jpg,7", "jpg/image_1.jpg,"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = _run(
        "--csv", tmp_path / "labels.csv", "--image_col", "file", "--label_col", "label",
        "--class_names", tmp_path / "names.txt", "--label_base", "1", "--output_dir", out, "--split", "1",
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "line 8: image not found" in err
    assert "line 9: label 7 is outside --class_names" in err
    assert "line 10: empty image or label" in err
    samples = json.loads((out / "train.json").read_text())
    labels = {s["image"]: s["conversations"][1]["value"] for s in samples}
    names = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    assert labels == {f"jpg/image_{i}.jpg": names[i % 3] for i in range(6)}
    registry = load_registry_file(out / "registry.json")
    assert Path(registry["labels_train"]["data_path"]).resolve() == tmp_path.resolve()


def test_numbered_folders_with_class_names(tmp_path, capsys):
    """Flowers-style folders 1..N: named through --class_names with --label_base 1, in numeric order."""
    root = tmp_path / "jpg"
    for folder in ("1", "2", "10", "200"):
        _draw(root / folder / "a.jpg", 50)
    names = [f"flower {i}" for i in range(1, 11)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "out"
    names_flags = ["--class_names", tmp_path / "names.txt", "--label_base", "1"]
    code = _run("--root", root, *names_flags, "--output_dir", out, "--split", "1")
    assert code == 1
    err = capsys.readouterr().err
    assert "folder 200 (1 images): label 200 is outside --class_names (10 names, --label_base 1)" in err
    assert (out / "classes.txt").read_text().splitlines() == ["flower 1", "flower 2", "flower 10"]
    labels = {s["image"]: s["conversations"][1]["value"] for s in json.loads((out / "train.json").read_text())}
    assert labels == {"1/a.jpg": "flower 1", "2/a.jpg": "flower 2", "10/a.jpg": "flower 10"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--root", "nowhere"], "not a folder"),
        (["--csv", "nowhere.csv"], "file not found"),
        (["--root", ".", "--split", "0,0"], "not all zero"),
        (["--root", ".", "--split", "a,b"], "comma-separated numbers"),
    ],
)
def test_bad_inputs_give_a_message_and_exit_2(tmp_path, capsys, args, message):
    assert _run(*args, "--output_dir", tmp_path / "out") == 2
    assert message in capsys.readouterr().err


def test_csv_without_the_column(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,x\n")
    assert _run("--csv", tmp_path / "labels.csv", "--output_dir", tmp_path / "out") == 2
    assert "no column image" in capsys.readouterr().err



def test_csv_with_byte_order_mark_and_bad_encoding(tmp_path, capsys):
    _draw(tmp_path / "a.jpg", 10)
    (tmp_path / "bom.csv").write_text("image,label\na.jpg,cat\n", encoding="utf-8-sig")
    assert _run("--csv", tmp_path / "bom.csv", "--output_dir", tmp_path / "out", "--split", "1") == 0
    (tmp_path / "latin.csv").write_bytes("image,label\na.jpg,caf\xe9\n".encode("latin-1"))
    assert _run("--csv", tmp_path / "latin.csv", "--output_dir", tmp_path / "out2") == 2
    assert "not a readable UTF-8 CSV file" in capsys.readouterr().err
