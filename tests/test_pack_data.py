"""tools/pack_data.py end to end on small generated data with the real tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl.data.annotations import load_records, parse_sample
from qwenvl.data.arguments import DataArguments
from qwenvl.data.dataset import SupervisedDataset
from qwenvl.data.pipeline import build_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import pack_data  # noqa: E402


def _qa(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture()
def annotation(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    items = []
    for i, (h, w) in enumerate([(60, 80), (200, 300), (120, 120), (400, 250)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        items.append({"image": f"im{i}.png", "conversations": _qa("<image>\nWhat is it?", "Noise " * (i + 1))})
    items.append({"conversations": _qa("Text only?", "Yes.")})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def _run(annotation: Path, model_dir: Path, *extra: str) -> int:
    return pack_data.main(["--annotation_path", str(annotation), "--model_path", str(model_dir), *extra])


def test_packs_hold_every_sample_once_within_the_length(annotation, processor_dir_factory, capsys):
    model_dir = processor_dir_factory("qwen2.5vl")
    assert _run(annotation, model_dir, "--pack_length", "256") == 0
    items = json.loads(annotation.read_text())
    packs = json.loads((annotation.parent / "train_pack.json").read_text())
    flat = [sample for pack in packs for sample in pack]
    assert sorted(json.dumps(s, sort_keys=True) for s in flat) == sorted(json.dumps(s, sort_keys=True) for s in items)
    # counts are those of the real training encoding (pixels decoded), not an estimate
    encoder = build_encoder(model_dir, DataArguments())
    length = {
        json.dumps(s, sort_keys=True): encoder.encode(parse_sample(s, str(annotation.parent))).num_tokens for s in items
    }
    assert all(sum(length[json.dumps(s, sort_keys=True)] for s in pack) <= 256 for pack in packs)
    assert "fill ratio" in capsys.readouterr().out
    # the output trains as a packed dataset: one item per pack, one segment per sample
    records = load_records(
        [{"annotation_path": str(annotation.parent / "train_pack.json"), "data_path": str(annotation.parent)}], 0
    )
    dataset = SupervisedDataset(records, encoder)
    assert len(dataset) == len(packs)
    assert dataset[0].seq_lens == [length[json.dumps(s, sort_keys=True)] for s in packs[0]]


def test_count_cache_reused_and_invalidated_by_settings(annotation, processor_dir_factory, capsys):
    model_dir = processor_dir_factory("qwen2.5vl")
    _run(annotation, model_dir)
    cache = annotation.parent / "train_count.json"
    first = json.loads(cache.read_text())["num_tokens"]
    capsys.readouterr()
    _run(annotation, model_dir)
    assert "reusing token counts" in capsys.readouterr().out
    _run(annotation, model_dir, "--max_pixels", "4*28*28", "--min_pixels", "4*28*28")
    out = capsys.readouterr().out
    assert "reusing" not in out
    second = json.loads(cache.read_text())["num_tokens"]
    assert second[-1] == first[-1]  # the text-only sample does not depend on pixels
    assert all(b < a for a, b in zip(first[:4], second[:4]))  # 4 image tokens or fewer than before


def test_jsonl_cache_name_is_stem_count(tmp_path, annotation, processor_dir_factory):
    jsonl = tmp_path / "train2.jsonl"
    jsonl.write_text("\n".join(json.dumps(s) for s in json.loads(annotation.read_text())), encoding="utf-8")
    assert _run(jsonl, processor_dir_factory("qwen2.5vl")) == 0
    assert (tmp_path / "train2_count.json").is_file() and (tmp_path / "train2_pack.json").is_file()


def test_bad_sample_error_or_skip(annotation, processor_dir_factory, capsys):
    items = json.loads(annotation.read_text())
    items[2]["image"] = "missing.png"
    annotation.write_text(json.dumps(items), encoding="utf-8")
    model_dir = processor_dir_factory("qwen2.5vl")
    assert _run(annotation, model_dir) == 2
    err = capsys.readouterr().err
    assert "train.json" in err and "missing.png" in err and "2" in err
    assert _run(annotation, model_dir, "--bad_samples", "skip") == 0
    packs = json.loads((annotation.parent / "train_pack.json").read_text())
    assert sum(len(p) for p in packs) == len(items) - 1
    assert "skipped" in capsys.readouterr().err


def test_oversize_policies(annotation, processor_dir_factory, capsys):
    model_dir = processor_dir_factory("qwen2.5vl")
    assert _run(annotation, model_dir, "--pack_length", "40", "--oversize", "drop") == 0
    assert "dropped" in capsys.readouterr().out
    assert _run(annotation, model_dir, "--pack_length", "40", "--oversize", "error") == 2


def test_pack_file_elsewhere_finds_the_media(annotation, processor_dir_factory, tmp_path):
    """Annotation and images in one folder, the pack written to another: the pack file alone, given to
    --dataset_use as a path (media relative to its own folder), encodes every sample."""
    model_dir = processor_dir_factory("qwen2.5vl")
    moved = tmp_path / "elsewhere" / "train.json"
    moved.parent.mkdir()
    moved.write_text(annotation.read_text(), encoding="utf-8")  # media stay in annotation.parent
    out = tmp_path / "packs" / "train_pack.json"
    out.parent.mkdir()
    assert _run(moved, model_dir, "--data_path", str(annotation.parent), "--output", str(out)) == 0
    images = [s["image"] for pack in json.loads(out.read_text()) for s in pack if "image" in s]
    assert sorted(images) == [f"../im{i}.png" for i in range(4)]
    from qwenvl.data import data_list

    dataset = SupervisedDataset(load_records(data_list(str(out)), 0), build_encoder(model_dir, DataArguments()))
    assert sum(len(dataset[i].seq_lens) for i in range(len(dataset))) == 5


@pytest.mark.slow
def test_a_pack_file_trains_with_data_packing(tiny_model_factory, tmp_path):
    """The tool chain: pack the demo images into a folder of its own, then train on the pack file as a path."""
    from qwenvl.train.train_qwen import main

    tiny = tiny_model_factory("qwen2.5vl")
    demo = Path(__file__).resolve().parents[1] / "demo"
    annotation = tmp_path / "demo_images.json"  # a copy: the count cache goes beside it, not into the checkout
    annotation.write_text((demo / "demo_images.json").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "packs" / "demo_pack.json"
    out.parent.mkdir()
    assert pack_data.main(["--annotation_path", str(annotation), "--data_path", str(demo), "--model_path", str(tiny),
                           "--pack_length", "256", "--output", str(out)]) == 0  # fmt: skip
    assert main(["--model_name_or_path", str(tiny), "--dataset_use", str(out), "--data_packing", "True",
                 "--tune_mm_mlp", "True", "--max_steps", "2", "--per_device_train_batch_size", "1",
                 "--output_dir", str(tmp_path / "run"), "--save_strategy", "no",
                 "--disable_tqdm", "True"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens"] > 0
