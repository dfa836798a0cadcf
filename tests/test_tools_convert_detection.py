"""tools/convert_detection.py: grounding coordinates per family against hand-computed values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from qwenvl.data.annotations import parse_sample

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import convert_detection  # noqa: E402

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]


@pytest.fixture()
def coco(tmp_path) -> Path:
    Image.new("RGB", (50, 40), (10, 200, 30)).save(tmp_path / "small.png")
    data = {
        "images": [
            {"id": 1, "file_name": "big.jpg", "width": 640.0, "height": 480},  # a float size is accepted
            {"id": 2, "file_name": "empty.jpg", "width": 100, "height": 100},
            {"id": 4, "file_name": "small.png"},  # size from the file header
            {"id": 5, "file_name": "missing.jpg"},  # no size and no file: reported
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [100, 50, 200, 150]},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [600, 400, 100, 200]},  # clipped to 640x480
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [10, 10, 0, 5]},  # empty
            {"id": 13, "image_id": 1, "category_id": 1, "bbox": [0, 0, 640, 480], "iscrowd": 1},
            {"id": 14, "image_id": 4, "category_id": 3, "bbox": [0, 0, 25, 20]},
            {"id": 15, "image_id": 5, "category_id": 3, "bbox": [0, 0, 5, 5]},  # its image is unusable
            {"id": 16, "image_id": 4, "category_id": 7, "bbox": [0, 0, 5, 5]},
            {"id": 17, "image_id": 4, "category_id": 1, "bbox": [0, 0, 5]},
            {"id": 18, "image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5]},
        ],
        "categories": CATEGORIES,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _convert(coco: Path, family: str, *extra: str) -> tuple[int, dict[str, dict]]:
    out = coco.parent / f"out_{family}.json"
    code = convert_detection.main(["--annotations", str(coco), "--family", family, "--output", str(out), *extra])
    samples = json.loads(out.read_text()) if out.exists() else []
    return code, {s["image"]: s for s in samples}


def _boxes(sample: dict) -> list[dict]:
    answer = sample["conversations"][1]["value"]
    assert answer.startswith("```json\n") and answer.endswith("\n```")
    return json.loads(answer[len("```json\n") : -len("\n```")])


# 640x480, factor 28, default pixel bounds: round(480/28)=17 -> 476, round(640/28)=23 -> 644 (within bounds).
# cat (100,50)-(300,200): 100*644/640=100.6->101, 50*476/480=49.6->50, 300*644/640=301.9->302, 200*476/480=198.3->198
# dog (600,400)-(640,480) after clipping: 603.75->604, 396.7->397, 644, 476
QWEN25_BIG = [{"bbox_2d": [101, 50, 302, 198], "label": "cat"}, {"bbox_2d": [604, 397, 644, 476], "label": "dog"}]
# relative: 100/640*1000=156.25->156, 50/480*1000=104.2->104, 468.75->469, 416.7->417;
#           937.5->938, 833.3->833, 1000, 1000
RELATIVE_BIG = [{"bbox_2d": [156, 104, 469, 417], "label": "cat"}, {"bbox_2d": [938, 833, 1000, 1000], "label": "dog"}]


@pytest.mark.parametrize(
    "family, expected", [("qwen2.5vl", QWEN25_BIG), ("qwen2vl", RELATIVE_BIG), ("qwen3vl", RELATIVE_BIG)]
)
def test_coordinates_per_family(coco, family, expected):
    code, samples = _convert(coco, family)
    assert code == 1  # the bad annotations and the unreadable image are reported
    assert sorted(samples) == ["big.jpg", "small.png"]
    assert _boxes(samples["big.jpg"]) == expected
    question = samples["big.jpg"]["conversations"][0]["value"]
    assert question == "<image>\nLocate every cat, dog in the image and output bbox coordinates in JSON format."


def test_qwen25_uses_the_training_pixel_bounds(coco):
    """max_pixels 100*28*28=78400 < 476*644: beta=sqrt(307200/78400)=1.9795,
    h=floor(480/beta/28=8.66)*28=224, w=floor(640/beta/28=11.55)*28=308.
    cat: 100*308/640=48.1->48, 50*224/480=23.3->23, 300*308/640=144.4->144, 200*224/480=93.3->93."""
    _, samples = _convert(coco, "qwen2.5vl", "--max_pixels", "100*28*28")
    assert _boxes(samples["big.jpg"])[0] == {"bbox_2d": [48, 23, 144, 93], "label": "cat"}


def test_size_from_header_and_answer_layout(coco):
    """small.png is 50x40 and has no size in the JSON: (0,0)-(25,20) is half of it -> 500 relative."""
    _, samples = _convert(coco, "qwen3vl")
    answer = samples["small.png"]["conversations"][1]["value"]
    assert answer == '```json\n[\n\t{"bbox_2d": [0, 0, 500, 500], "label": "dog"}\n]\n```'
    assert samples["small.png"]["conversations"][0]["value"].startswith("<image>\nLocate every dog in")


def test_keep_empty_asks_about_every_category(coco):
    _, samples = _convert(coco, "qwen2vl", "--keep_empty", "--prompt", "Find {categories}.")
    empty = samples["empty.jpg"]["conversations"]
    assert empty[0] == {"from": "human", "value": "<image>\nFind cat, dog."}
    assert empty[1] == {"from": "gpt", "value": "```json\n[]\n```"}


def test_keep_crowd_and_ask_all(coco):
    _, samples = _convert(coco, "qwen2vl", "--keep_crowd", "--ask", "all")
    assert _boxes(samples["big.jpg"])[-1] == {"bbox_2d": [0, 0, 1000, 1000], "label": "cat"}
    assert "every cat, dog in" in samples["small.png"]["conversations"][0]["value"]


def test_problems_are_listed_and_samples_parse(coco, capsys):
    _convert(coco, "qwen2.5vl")
    captured = capsys.readouterr()
    assert "image 5: no width/height in the JSON and cannot read image" in captured.err
    assert "annotations[6]: unknown category_id 7" in captured.err
    assert "annotations[7]: bbox must be [x, y, w, h]" in captured.err
    assert "annotations[8]: unknown image_id 99" in captured.err
    assert "annotations[5]" not in captured.err  # its image was already reported
    assert "boxes 3, crowd dropped 1, empty after clipping 1, images without boxes 1" in captured.out
    samples = json.loads((coco.parent / "out_qwen2.5vl.json").read_text())
    for index, item in enumerate(samples):
        assert parse_sample(item, str(coco.parent), index=index).images


@pytest.mark.parametrize(
    "content, message",
    [(None, "file not found"), ("{not json", "malformed JSON at line 1"), ('{"images": []}', "'categories' lists")],
)
def test_bad_annotation_files_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "instances.json"
    if content is not None:
        path.write_text(content)
    assert convert_detection.main(["--annotations", str(path), "--family", "qwen2vl"]) == 2
    assert message in capsys.readouterr().err



def test_registry_written_beside_the_output_and_merged(coco, tmp_path, capsys):
    """Like convert_imagefolder: a registry entry named after the output, data_path relative to the registry,
    so `--dataset_registry <dir>/registry.json --dataset_use <name>` finds every image; a second conversion into
    the same folder adds its entry."""
    from qwenvl.data import data_list, load_registry_file
    from qwenvl.data.annotations import load_records, parse_record

    out_dir = tmp_path / "converted"
    for name in ("det_train", "det_val"):
        assert convert_detection.main(["--annotations", str(coco), "--family", "qwen3vl",
                                       "--output", str(out_dir / f"{name}.json")]) == 1  # fmt: skip
    registry = json.loads((out_dir / "registry.json").read_text())
    names = ("det_train", "det_val")
    assert registry == {name: {"annotation_path": f"{name}.json", "data_path": ".."} for name in names}
    records = load_records(data_list("det_val", load_registry_file(out_dir / "registry.json")), 0)
    images = [image for record in records for sample in parse_record(record) for image in sample.images]
    assert len(images) == 2 and all(Path(image).is_file() for image in images if "big" not in image)
    assert f"registry {out_dir / 'registry.json'}: det_val" in capsys.readouterr().out
