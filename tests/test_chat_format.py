"""Tokenisation and label masking against the real Qwen tokenizer and upstream's algorithm."""

from __future__ import annotations

import numpy as np
import pytest

from qwenvl.constants import IGNORE_INDEX, QWEN_TOKEN_IDS
from qwenvl.data.chat_format import (
    SpecialTokens,
    VisualTokens,
    assistant_labels,
    encode_chat_template,
    encode_minimal,
)
from qwenvl.data.chat_templates import QWEN3_VL_CHAT_TEMPLATE

UPSTREAM_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" in the real Qwen vocabulary.
SYSTEM_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))


@pytest.fixture(scope="module")
def special(tokenizer):
    return SpecialTokens.from_tokenizer(tokenizer)


def upstream_preprocess(tokenizer, turns, image_tokens, video_tokens):
    """Upstream 2.5-era `preprocess_qwen_2_visual`, restated: per-turn chat template, first 3 tokens masked."""
    image_iter, video_iter = iter(image_tokens), iter(video_tokens)
    tok = lambda msgs: tokenizer.apply_chat_template(msgs, chat_template=UPSTREAM_TEMPLATE, tokenize=True)
    ids = tok([{"role": "system", "content": "You are a helpful assistant."}])
    labels = [IGNORE_INDEX] * len(ids)
    for role, content in turns:
        if role == "user":
            while "<image>" in content:
                pads = "<|vision_start|>" + "<|image_pad|>" * next(image_iter) + "<|vision_end|>"
                content = content.replace("<image>", pads, 1)
            while "<video>" in content:
                pads = "<|vision_start|>" + "<|video_pad|>" * next(video_iter) + "<|vision_end|>"
                content = content.replace("<video>", pads, 1)
        enc = tok([{"role": role, "content": content}])
        ids += enc
        labels += [IGNORE_INDEX] * len(enc) if role == "user" else [IGNORE_INDEX] * 3 + enc[3:]
    return np.array(ids), np.array(labels)


def test_special_ids_are_the_qwen_ids(special):
    assert special.pad == QWEN_TOKEN_IDS["<|endoftext|>"] == 151643
    assert (special.im_start, special.im_end) == (151644, 151645)
    assert (special.vision_start, special.vision_end, special.image_pad, special.video_pad) == (
        151652,
        151653,
        151655,
        151656,
    )
    assert special.assistant_header == (77091, 198)


def test_minimal_hand_checked_ids_and_labels(tokenizer, special):
    ids, labels = encode_minimal(tokenizer, special, [("user", "<image>Hi"), ("assistant", "Yes")], [
        VisualTokens("image", (3,))
    ])
    user = [151644, 872, 198, 151652, 151655, 151655, 151655, 151653] + tokenizer.encode("Hi") + [151645, 198]
    answer = tokenizer.encode("Yes")
    assistant = [151644, 77091, 198] + answer + [151645, 198]
    assert ids.tolist() == SYSTEM_IDS + user + assistant
    n_ignored = len(SYSTEM_IDS) + len(user) + 3
    assert labels.tolist() == [IGNORE_INDEX] * n_ignored + answer + [151645, 198]


@pytest.mark.parametrize(
    "turns, images, videos",
    [
        ([("user", "<image>\nWhat is shown in this chart?"), ("assistant", "A bar chart of sales.")], [12], []),
        (
            [
                ("user", "Compare <image> and <image>."),
                ("assistant", "The first is larger."),
                ("user", "And this one? <image>"),
                ("assistant", "Smallest.\nDone."),
            ],
            [4, 9, 1],
            [],
        ),
        ([("user", "<video>\nDescribe."), ("assistant", "A man runs.")], [], [24]),
        ([("user", "<image> then <video>"), ("assistant", "both")], [6], [8]),
        ([("user", "Plain text question, no media."), ("assistant", "Plain answer.")], [], []),
        ([("user", "Box the cat <image>"), ("assistant", '{"bbox_2d": [10, 20, 300, 400]}')], [16], []),
    ],
)
def test_minimal_equals_upstream(tokenizer, special, turns, images, videos):
    visuals = [VisualTokens("image", (n,)) for n in images] + [VisualTokens("video", (n,)) for n in videos]
    ids, labels = encode_minimal(tokenizer, special, turns, visuals)
    want_ids, want_labels = upstream_preprocess(tokenizer, turns, images, videos)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(labels, want_labels)


def test_minimal_data_system_turn_replaces_default(tokenizer, special):
    ids, labels = encode_minimal(tokenizer, special, [("system", "Be brief."), ("user", "Q"), ("assistant", "A")], [])
    expected = tokenizer.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n")
    assert ids.tolist()[: len(expected)] == expected
    assert (labels[: len(expected)] == IGNORE_INDEX).all()


def test_mismatched_visual_count_is_an_error(tokenizer, special):
    with pytest.raises(ValueError, match="image block"):
        encode_minimal(tokenizer, special, [("user", "<image><image>"), ("assistant", "x")], [VisualTokens("image", (2,))])


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    tok.chat_template = QWEN3_VL_CHAT_TEMPLATE
    return tok


def test_chat_template_mode_image_text_stripped(qwen3_tokenizer, special):
    ids, labels = encode_chat_template(
        qwen3_tokenizer, special, [("user", "<image>\nWhat is it?"), ("assistant", "A cat.")], [
            VisualTokens("image", (4,))
        ]
    )
    text = (
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>What is it?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
    )
    expected = qwen3_tokenizer.encode(text)
    assert ids.tolist() == expected
    answer = qwen3_tokenizer.encode("A cat.") + [151645, 198]
    assert labels.tolist() == [IGNORE_INDEX] * (len(expected) - len(answer)) + answer


def test_chat_template_mode_video_timestamps_per_group(qwen3_tokenizer, special):
    video = VisualTokens("video", (2, 2, 2), timestamps=(0.5, 2.5, 4.25))
    ids, _ = encode_chat_template(qwen3_tokenizer, special, [("user", "<video>Describe"), ("assistant", "ok")], [video])
    block = "<|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
    text = (
        f"<|im_start|>user\n<0.5 seconds>{block}<2.5 seconds>{block}<4.2 seconds>{block}Describe<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n"
    )
    assert ids.tolist() == qwen3_tokenizer.encode(text)


def test_assistant_word_in_prompt_does_not_open_a_label_span(qwen3_tokenizer, special):
    ids, labels = encode_chat_template(
        qwen3_tokenizer, special, [("user", "assistant\nare you?"), ("assistant", "yes")], []
    )
    assert 77091 in ids[:-6].tolist()  # the word is in the prompt (upstream's scan would start there)
    supervised = ids[labels != IGNORE_INDEX].tolist()
    assert supervised == qwen3_tokenizer.encode("yes") + [151645, 198]


def test_assistant_labels_multi_turn_hand_built(special):
    s, e, nl = special.im_start, special.im_end, 198
    ids = np.array([s, 872, nl, 5, e, nl, s, 77091, nl, 7, 8, e, nl, s, 872, nl, 9, e, nl, s, 77091, nl, 10, e, nl])
    labels = assistant_labels(ids, special)
    want = np.full(len(ids), IGNORE_INDEX)
    want[9:13] = [7, 8, e, nl]
    want[22:25] = [10, e, nl]
    np.testing.assert_array_equal(labels, want)
