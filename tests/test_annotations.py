"""Annotation parsing: both key spellings, roles, tag/media checks, clear errors naming file and index."""

from __future__ import annotations

import json

import pytest

from qwenvl.data.annotations import AnnotationRecord, parse_record, parse_sample, read_annotation_file
from qwenvl.data.errors import SampleError


def convo(prompt: str, answer: str = "ok") -> list[dict]:
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def test_images_key_and_image_list_are_equivalent():
    a = parse_sample({"image": ["x.png", "y.png"], "conversations": convo("<image><image>Q")}, "/data")
    b = parse_sample({"images": ["x.png", "y.png"], "conversations": convo("<image><image>Q")}, "/data")
    assert a.images == b.images == ["/data/x.png", "/data/y.png"]


def test_single_path_absolute_wins_and_videos_key():
    s = parse_sample({"image": "/abs/i.jpg", "videos": ["v.mp4"], "conversations": convo("<image><video>")}, "/d")
    assert s.images == ["/abs/i.jpg"] and s.videos == ["/d/v.mp4"]


def test_role_content_format_and_system_turn():
    s = parse_sample(
        {
            "conversations": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ]
        }
    )
    assert s.messages == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")]


def test_text_only_sample_is_valid():
    s = parse_sample({"conversations": convo("What is 2+2?", "4")})
    assert s.images == [] and s.videos == []


@pytest.mark.parametrize(
    "item, reason",
    [
        ({"image": "a.png", "conversations": convo("no tag")}, "0 <image> tag(s) in the prompt but 1 image"),
        ({"conversations": convo("<image> two <image>")}, "2 <image> tag(s) in the prompt but 0 image"),
        ({"video": ["a.mp4", "b.mp4"], "conversations": convo("<video>")}, "1 <video> tag(s) in the prompt but 2"),
        ({"conversations": []}, "missing or empty 'conversations'"),
        ({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}, "role 'robot'"),
        ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant"),
        ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]}, "no text"),
        ({"image": 3, "conversations": convo("<image>")}, "'image' must be a path"),
        ({"image": "a", "images": ["b"], "conversations": convo("<image>")}, "both 'image' and 'images'"),
    ],
)
def test_bad_samples_name_file_index_and_reason(item, reason):
    with pytest.raises(SampleError) as info:
        parse_sample(item, "", file="train.json", index=17)
    assert info.value.file == "train.json" and info.value.index == 17
    assert reason in str(info.value) and "train.json" in str(info.value) and "sample 17" in str(info.value)


def test_tags_in_answers_are_not_counted_as_media():
    s = parse_sample({"image": "a.png", "conversations": convo("<image>Q", "the <image> tag")})
    assert s.images == ["a.png"]


def test_jsonl_malformed_line_names_line_and_index(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n{broken\n')
    with pytest.raises(SampleError) as info:
        read_annotation_file(path)
    assert info.value.index == 2 and "line 4" in str(info.value) and str(path) in str(info.value)


def test_json_list_and_jsonl_load_equal(tmp_path):
    items = [{"conversations": convo(f"q{i}")} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(items))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    assert read_annotation_file(tmp_path / "a.json") == read_annotation_file(tmp_path / "a.jsonl") == items


def test_json_must_be_a_list(tmp_path):
    (tmp_path / "o.json").write_text('{"not": "a list"}')
    with pytest.raises(SampleError, match="must hold a list"):
        read_annotation_file(tmp_path / "o.json")


def test_packed_record_yields_each_sub_sample():
    record = AnnotationRecord([{"conversations": convo("a")}, {"conversations": convo("b")}], "/d", "p.json", 3)
    samples = parse_record(record)
    assert [s.messages[0][1] for s in samples] == ["a", "b"]
    assert all(s.index == 3 and s.file == "p.json" for s in samples)
