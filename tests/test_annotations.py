"""Annotation parsing: both key spellings, roles, tag/media checks, clear errors naming file and index."""

from __future__ import annotations

import json

import pytest

from qwenvl.data.annotations import AnnotationRecord, parse_record, parse_sample, read_annotation_file, read_dataset
from qwenvl.data.errors import DatasetError, SampleError


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


def test_media_tags_in_answers_are_rejected_naming_the_turn():
    """Upstream trains a literal <image> in an answer as text; in data records it is a bad sample
    (docs/upstream.md). A prompt for inference (parse_sample alone) may end with an empty answer."""
    item = {"image": "a.png", "conversations": convo("<image>Q", "the <image> tag")}
    with pytest.raises(SampleError, match=r"turn 1 \(assistant\) contains <image>: media tags belong") as info:
        parse_record(AnnotationRecord(item, "", "t.json", 4, 5))
    assert (info.value.kind, info.value.file, info.value.index, info.value.line) == ("tag_in_answer", "t.json", 4, 5)
    with pytest.raises(SampleError, match=r"turn 1 \(assistant\) is empty"):
        parse_record(AnnotationRecord({"conversations": convo("Q", " ")}, "", "t.json", 0))
    assert parse_sample({"conversations": convo("Q", "")}).messages[-1] == ("assistant", "")


def test_jsonl_malformed_line_names_line_and_index(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n{broken\n')
    with pytest.raises(SampleError) as info:
        read_annotation_file(path)
    assert (info.value.index, info.value.line) == (2, 4)
    assert str(info.value).startswith(f"file {path}, sample 2, line 4:")


def test_bad_jsonl_lines_are_kept_as_bad_records_when_skipping(tmp_path):
    """With --skip_bad_samples a bad line (malformed, or not UTF-8) is a record that fails like a bad sample;
    the lines around it load, and a U+2028 inside a JSON string does not split its line."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{broken\n\n{"b": "x\xe2\x80\xa8y"}\n{"c": "\xff"}\n')
    records = read_dataset({"annotation_path": str(path), "data_path": str(tmp_path)}, skip_bad=True)
    assert [(r.index, r.line, r.item) for r in records] == [
        (0, 1, {"a": 1}), (1, 2, None), (2, 4, {"b": "x\u2028y"}), (3, 5, None)]  # fmt: skip
    reasons = [r.error.reason for r in records if r.error is not None]
    assert reasons == ["malformed JSON: Expecting property name enclosed in double quotes at column 2",
                       "not UTF-8 text at column 8 (byte 0xff)"]  # fmt: skip
    with pytest.raises(SampleError, match=r"sample 3, line 5: not UTF-8"):
        parse_record(records[3])
    with pytest.raises(SampleError, match=r"sample 1, line 2: malformed JSON"):
        read_dataset({"annotation_path": str(path)})


def test_byte_order_mark_is_accepted_and_other_encodings_are_named(tmp_path):
    items = [{"conversations": convo("q")}]
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(items).encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(items[0]).encode())
    assert read_annotation_file(tmp_path / "bom.json") == read_annotation_file(tmp_path / "bom.jsonl") == items
    latin1 = json.dumps(items, ensure_ascii=False).replace("q", "\u00e9").encode("latin-1")
    (tmp_path / "latin1.json").write_bytes(latin1)
    with pytest.raises(DatasetError, match=r"not UTF-8 text: byte 0xe9 on line 1 \(save the file as UTF-8\)"):
        read_annotation_file(tmp_path / "latin1.json")


def test_json_list_and_jsonl_load_equal(tmp_path):
    items = [{"conversations": convo(f"q{i}")} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(items))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    assert read_annotation_file(tmp_path / "a.json") == read_annotation_file(tmp_path / "a.jsonl") == items


def test_json_must_be_a_list(tmp_path):
    (tmp_path / "o.json").write_text('{"not": "a list"}')
    with pytest.raises(DatasetError, match="must hold a list"):
        read_annotation_file(tmp_path / "o.json")


def test_packed_record_yields_each_sub_sample():
    record = AnnotationRecord([{"conversations": convo("a")}, {"conversations": convo("b")}], "/d", "p.json", 3)
    samples = parse_record(record)
    assert [s.messages[0][1] for s in samples] == ["a", "b"]
    assert all(s.index == 3 and s.file == "p.json" for s in samples)
