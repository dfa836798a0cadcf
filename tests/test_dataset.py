"""Sample -> tokens, pixels, positions on the real Qwen tokenizer, and the upstream bugs fixed on the way."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from qwenvl.constants import QWEN_TOKEN_IDS
from qwenvl.data.annotations import AnnotationRecord, parse_sample
from qwenvl.data.arguments import DataArguments
from qwenvl.data.collators import collate_flattened
from qwenvl.data.dataset import SampleTooLong, SupervisedDataset
from qwenvl.data.errors import SampleError
from qwenvl.data.pipeline import build_dataset, build_encoder

IMAGE_PAD = QWEN_TOKEN_IDS["<|image_pad|>"]
VIDEO_PAD = QWEN_TOKEN_IDS["<|video_pad|>"]
VISION_START = QWEN_TOKEN_IDS["<|vision_start|>"]
VISION_END = QWEN_TOKEN_IDS["<|vision_end|>"]


def _sample(conversations, **media):
    return parse_sample({"conversations": conversations, **media}, "", "data.json", 0)


def _qa(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def encoder25(processor_dir_factory):
    return build_encoder(processor_dir_factory("qwen2.5vl"), DataArguments())


@pytest.fixture()
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(path)
    return path


def test_text_only_sample(encoder25):
    encoded = encoder25.encode(_sample(_qa("What is 2+2?", "4")))
    n = encoded.num_tokens
    np.testing.assert_array_equal(encoded.position_ids, np.tile(np.arange(n), (3, 1)))
    assert encoded.pixel_values is None and encoded.image_grid_thw is None
    supervised = encoder25.tokenizer.decode(encoded.input_ids[encoded.labels != -100])
    assert supervised == "4<|im_end|>\n"


def test_image_sample_block_size_and_positions(encoder25, image_path):
    encoded = encoder25.encode(_sample(_qa("<image>\nWhat is this?", "Noise."), image=str(image_path)))
    # 100x150 -> smart_resize(28, 16*28*28 .. 576*28*28) -> 112x140 -> grid (1, 8, 10) -> 20 tokens
    assert encoded.image_grid_thw.tolist() == [[1, 8, 10]]
    assert encoded.pixel_values.shape == (80, 1176)
    ids = encoded.input_ids
    assert int((ids == IMAGE_PAD).sum()) == 20
    start = int(np.flatnonzero(ids == VISION_START)[0])
    block = encoded.position_ids[:, start + 1 : start + 21]
    # the block starts at text position start+1; height and width indices over the merged 4x5 grid
    np.testing.assert_array_equal(block[0], np.full(20, start + 1))
    np.testing.assert_array_equal(block[1], start + 1 + np.repeat(np.arange(4), 5))
    np.testing.assert_array_equal(block[2], start + 1 + np.tile(np.arange(5), 4))
    # <|vision_end|> continues from the largest block position (start + 1 + 4) + 1
    np.testing.assert_array_equal(encoded.position_ids[:, start + 21], [start + 6] * 3)
    assert np.all(encoded.labels[: start + 22] == -100)


def test_image_and_video_sample_keeps_both(encoder25, image_path, media_dir):
    sample = _sample(
        _qa("<image>\n<video>\nCompare.", "Same."), image=str(image_path), video=str(media_dir / "v_rBMQFpHspmo.mp4")
    )
    encoded = encoder25.encode(sample)
    assert encoded.pixel_values is not None and encoded.pixel_values_videos is not None
    assert int((encoded.input_ids == IMAGE_PAD).sum()) == encoded.image_grid_thw.prod() // 4
    assert int((encoded.input_ids == VIDEO_PAD).sum()) == encoded.video_grid_thw.prod() // 4
    assert encoded.pixel_values_videos.shape[0] == encoded.video_grid_thw.prod()


def test_two_videos_one_second_per_grid_each(encoder25, media_dir):
    videos = [str(media_dir / "v_rBMQFpHspmo.mp4"), str(media_dir / "v_TpB_zMG3XBA.mp4")]
    encoded = encoder25.encode(_sample(_qa("<video>\n<video>\nSame sport?", "Yes."), video=videos))
    # 8 frames sampled from 434 and 491 frames at 3 fps: 2 s-patches span 2 * duration / 8 seconds
    expected = [2 * (434 / 3) / 8, 2 * (491 / 3) / 8]
    np.testing.assert_allclose(encoded.second_per_grid_ts, expected, rtol=1e-6)
    ids, positions = encoded.input_ids, encoded.position_ids
    starts = np.flatnonzero(ids == VISION_START)
    for video, start in enumerate(starts):
        t, h, w = encoded.video_grid_thw[video]
        block = positions[0, start + 1 : start + 1 + t * h * w // 4]
        temporal = np.unique(block - block[0])
        np.testing.assert_array_equal(temporal, (np.arange(t) * expected[video] * 2).astype(np.int64))


def test_qwen3_video_has_a_timestamp_per_group(processor_dir_factory, media_dir):
    encoder = build_encoder(processor_dir_factory("qwen3vl"), DataArguments())
    encoded = encoder.encode(_sample(_qa("<video>\nWhat happens?", "Sport."), video=str(media_dir / "v_rBMQFpHspmo.mp4")))
    text = encoder.tokenizer.decode(encoded.input_ids)
    # frames [0, 62, 124, 186, 247, 309, 371, 433] at 3 fps, two per group
    for stamp in ("<10.3 seconds>", "<51.7 seconds>", "<92.7 seconds>", "<134.0 seconds>"):
        assert stamp + "<|vision_start|>" in text
    assert int((encoded.input_ids == VISION_START).sum()) == 4
    # 8 frames of 224x398 within 802816 px per clip at factor 32 -> 224x384 -> grid (4, 14, 24)
    assert encoded.video_grid_thw.tolist() == [[4, 14, 24]]


def test_count_tokens_equals_encoded_length(processor_dir_factory, image_path, media_dir):
    video = str(media_dir / "v_TpB_zMG3XBA.mp4")
    for family in ("qwen2.5vl", "qwen3vl"):
        encoder = build_encoder(processor_dir_factory(family), DataArguments())
        for sample in (
            _sample(_qa("hi", "hello")),
            _sample(_qa("<image><image>\nWhat?", "Noise."), image=[str(image_path), str(image_path)]),
            _sample(_qa("<image><video>\nBoth?", "Yes."), image=str(image_path), video=video),
        ):
            assert encoder.count_tokens(sample) == encoder.encode(sample).num_tokens


def test_missing_image_error_names_file_and_index(tmp_path, processor_dir_factory, image_path):
    shutil.copy(image_path, tmp_path / "ok.png")
    items = [
        {"image": "ok.png", "conversations": _qa("<image>\nA?", "B.")},
        {"image": "gone.png", "conversations": _qa("<image>\nA?", "B.")},
    ]
    annotation = tmp_path / "train.json"
    annotation.write_text(json.dumps(items), encoding="utf-8")
    data_args = DataArguments(dataset_use=str(annotation))
    dataset = build_dataset(build_encoder(processor_dir_factory("qwen2.5vl"), data_args), data_args, seed=0)
    assert dataset[0].num_tokens > 0
    with pytest.raises(SampleError) as info:
        dataset[1]
    message = str(info.value)
    assert "train.json" in message and "1" in message and "gone.png" in message
    assert info.value.index == 1


def test_truncation_never_cuts_a_vision_block(processor_dir_factory, image_path):
    model_dir = processor_dir_factory("qwen2.5vl")
    long_answer = " ".join(["word"] * 60)
    sample = _sample(_qa("<image>\nDescribe.", long_answer), image=str(image_path))
    full = build_encoder(model_dir, DataArguments()).encode(sample)
    vision_end = int(np.flatnonzero(full.input_ids == VISION_END)[0])
    # a limit inside the vision block: refused, never cut
    with pytest.raises(SampleTooLong, match="vision block"):
        build_encoder(model_dir, DataArguments(), model_max_length=vision_end).encode(sample)
    # a limit inside the answer: the text tail is cut, the vision block and some labels stay
    limit = full.num_tokens - 10
    cut = build_encoder(model_dir, DataArguments(), model_max_length=limit).encode(sample)
    assert cut.num_tokens == limit
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:limit])
    np.testing.assert_array_equal(cut.position_ids, full.position_ids[:, :limit])
    assert int((cut.input_ids == IMAGE_PAD).sum()) == 20 and np.any(cut.labels != -100)
    # the flattened layout carries the truncated sample as is
    batch = collate_flattened([cut, full], pad_token_id=0)
    assert batch["cu_seqlens"].tolist() == [0, limit, limit + full.num_tokens]


def test_packed_record_keeps_each_sub_sample(encoder25):
    items = [{"conversations": _qa("one?", "1")}, {"conversations": _qa("two two?", "2")}]
    dataset = SupervisedDataset([AnnotationRecord(items, "", "packs.json", 0)], encoder25)
    packed = dataset[0]
    first, second = (encoder25.encode(_sample(item["conversations"])) for item in items)
    assert packed.seq_lens == [first.num_tokens, second.num_tokens]
    np.testing.assert_array_equal(packed.position_ids[:, first.num_tokens :], second.position_ids)
    np.testing.assert_array_equal(packed.input_ids, np.concatenate([first.input_ids, second.input_ids]))
