"""Dataset registry: names, %N rates, file paths, registry files, seeded rank-identical sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwenvl.data import data_dict, data_list, load_registry_file, parse_sampling_rate
from qwenvl.data.annotations import load_records, sample_indices


def test_parse_sampling_rate_integer_percent():
    assert parse_sampling_rate("cambrian_737k%50") == 0.5
    assert parse_sampling_rate("cambrian_737k") == 1.0
    assert parse_sampling_rate("x%250") == 2.5


def test_data_list_resolves_names_and_rates():
    configs = data_list("cambrian_737k%30,mp_doc")
    assert [c["name"] for c in configs] == ["cambrian_737k", "mp_doc"]
    assert configs[0]["annotation_path"] == data_dict["cambrian_737k"]["annotation_path"]
    assert [c["sampling_rate"] for c in configs] == [0.3, 1.0]


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        data_list(["no_such_set"])
    message = str(info.value)
    assert "no_such_set" in message
    for name in data_dict:
        assert name in message


def test_annotation_file_path_as_dataset(tmp_path):
    ann = tmp_path / "mine.jsonl"
    ann.write_text("{}\n")
    (config,) = data_list([f"{ann}%20"])
    assert config["annotation_path"] == str(ann)
    assert config["data_path"] == str(tmp_path)
    assert config["sampling_rate"] == 0.2


def test_registry_file_json_and_yaml(tmp_path):
    (tmp_path / "reg.json").write_text(json.dumps({"flowers": {"annotation_path": "f.json", "data_path": "img"}}))
    (tmp_path / "reg.yaml").write_text("med:\n  annotation_path: m.jsonl\n")
    reg = {**load_registry_file(tmp_path / "reg.json"), **load_registry_file(tmp_path / "reg.yaml")}
    assert reg["flowers"] == {"annotation_path": str(tmp_path / "f.json"), "data_path": str(tmp_path / "img")}
    assert reg["med"]["annotation_path"] == str(tmp_path / "m.jsonl")
    configs = data_list("flowers%10,med", registry=reg)
    assert [c["annotation_path"] for c in configs] == [str(tmp_path / "f.json"), str(tmp_path / "m.jsonl")]


def test_registry_file_rejects_entries_without_annotation(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"x": {"data_path": "d"}}))
    with pytest.raises(ValueError, match="annotation_path"):
        load_registry_file(tmp_path / "bad.json")


def test_subsample_count_seeded_and_without_replacement():
    a = sample_indices(1000, 0.37, seed=42, name="d")
    b = sample_indices(1000, 0.37, seed=42, name="d")
    assert len(a) == int(1000 * 0.37)
    assert len(set(a.tolist())) == len(a)
    np.testing.assert_array_equal(a, b)  # every rank computes the same subset
    assert not np.array_equal(a, sample_indices(1000, 0.37, seed=43, name="d"))
    assert not np.array_equal(a, sample_indices(1000, 0.37, seed=42, name="other"))


def test_upsampling_above_100_percent():
    idx = sample_indices(10, 2.5, seed=0, name="d")
    counts = np.bincount(idx, minlength=10)
    assert len(idx) == 25
    assert sorted(counts.tolist()) == [2] * 5 + [3] * 5


def test_load_records_applies_rate_per_dataset(tmp_path):
    for name, n in (("a", 40), ("b", 10)):
        (tmp_path / f"{name}.json").write_text(json.dumps([{"id": f"{name}{i}"} for i in range(n)]))
    records = load_records(data_list([f"{tmp_path}/a.json%25", f"{tmp_path}/b.json"]), seed=7)
    ids = [r.item["id"] for r in records]
    assert len(ids) == 10 + 10
    assert all(i.startswith("a") for i in ids[:10]) and ids[10:] == [f"b{i}" for i in range(10)]
    assert records[10].file == str(tmp_path / "b.json") and records[10].index == 0
