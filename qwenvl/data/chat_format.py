"""Conversation -> token ids and labels, in the two template modes of upstream.

- `minimal` (Qwen2-VL, Qwen2.5-VL; upstream's 2.5-era code): every turn renders as
  `<|im_start|>{role}\\n{content}<|im_end|>\\n`, a fixed system prompt first; each `<image>` tag becomes
  `<|vision_start|>` + `<|image_pad|>` x N + `<|vision_end|>` in place, text around it untouched.
- `chat_template` (Qwen3-VL; upstream's 3-era code): the model's own chat template renders the
  messages, text segments around media tags are stripped (as HF's message format does), and each
  video expands into one `<t seconds>` + vision block per temporal group.

In both modes only assistant replies are supervised: their content, `<|im_end|>` and the `\\n` after
it; everything else is IGNORE_INDEX.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from qwenvl.constants import (
    ENDOFTEXT,
    IGNORE_INDEX,
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_TAG,
    VIDEO_PAD,
    VIDEO_TAG,
    VISION_END,
    VISION_START,
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
TEMPLATE_MODES = {"qwen2vl": "minimal", "qwen2.5vl": "minimal", "qwen3vl": "chat_template"}
_TAGS = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the control tokens, looked up by string so any tokenizer with them works."""

    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    assistant_header: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        ids = {}
        for token in (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {token} token; it is not a Qwen-VL tokenizer")
            ids[token] = int(token_id)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[ENDOFTEXT]
        header = tuple(tokenizer.encode("assistant\n", add_special_tokens=False))
        return cls(
            pad=int(pad),
            im_start=ids[IM_START],
            im_end=ids[IM_END],
            vision_start=ids[VISION_START],
            vision_end=ids[VISION_END],
            image_pad=ids[IMAGE_PAD],
            video_pad=ids[VIDEO_PAD],
            assistant_header=header,
        )


@dataclass(frozen=True)
class VisualTokens:
    """The vision blocks one image or video becomes: pad-token count per block.

    An image, and a Qwen2/2.5 video, is one block. A Qwen3 video is one block per temporal group,
    each preceded by its time in seconds (`timestamps`) rendered as text.
    """

    kind: str
    blocks: tuple[int, ...]
    timestamps: tuple[float, ...] = ()

    @property
    def total(self) -> int:
        return int(sum(self.blocks))


def _placeholder(kind: str) -> str:
    return f"{VISION_START}{IMAGE_PAD if kind == 'image' else VIDEO_PAD}{VISION_END}"


def _expand_video_placeholders(text: str, videos: list[VisualTokens]) -> str:
    """Qwen3: each single-pad video block becomes `<t seconds>` + block, once per temporal group."""
    video_block = _placeholder("video")
    parts = text.split(video_block)
    if len(parts) - 1 != len(videos):
        raise ValueError(f"rendered text has {len(parts) - 1} video blocks for {len(videos)} videos")
    out = [parts[0]]
    for video, rest in zip(videos, parts[1:]):
        out.extend(f"<{t:.1f} seconds>{video_block}" for t in video.timestamps)
        out.append(rest)
    return "".join(out)


def _repeat_counts(ids: np.ndarray, special: SpecialTokens, visuals: list[VisualTokens]) -> np.ndarray:
    """How many tokens each id becomes: 1 for text, the block size for each single pad token."""
    counts = np.ones(len(ids), dtype=np.int64)
    for kind, pad_id in (("image", special.image_pad), ("video", special.video_pad)):
        blocks = [n for v in visuals if v.kind == kind for n in v.blocks]
        where = np.flatnonzero(ids == pad_id)
        if len(where) != len(blocks):
            raise ValueError(f"{len(where)} {kind} block(s) in the text for {len(blocks)} {kind} block size(s)")
        counts[where] = blocks
    return counts


def _expand(ids: list[int], labels: list[int] | None, special: SpecialTokens, visuals: list[VisualTokens]):
    """Expand each pad to its block size; pads carry IGNORE_INDEX labels, so labels repeat alike."""
    id_arr = np.asarray(ids, dtype=np.int64)
    counts = _repeat_counts(id_arr, special, visuals)
    expanded = np.repeat(id_arr, counts)
    if labels is None:
        return expanded, None
    return expanded, np.repeat(np.asarray(labels, dtype=np.int64), counts)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def encode_minimal(
    tokenizer,
    special: SpecialTokens,
    messages: list[tuple[str, str]],
    visuals: list[VisualTokens],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> tuple[np.ndarray, np.ndarray]:
    """Upstream 2.5-era tokenisation: each turn tokenised on its own, labels per turn.

    A leading system turn in the data replaces the default system prompt (upstream always prepends
    its fixed prompt and cannot be configured).
    """
    if not messages or messages[0][0] != "system":
        messages = [("system", system_prompt)] + messages
    header_len = 1 + len(special.assistant_header)
    ids: list[int] = []
    labels: list[int] = []
    for role, content in messages:
        if role != "assistant":
            content = content.replace(IMAGE_TAG, _placeholder("image")).replace(VIDEO_TAG, _placeholder("video"))
        turn = _encode(tokenizer, f"{IM_START}{role}\n{content}{IM_END}\n")
        ids.extend(turn)
        if role == "assistant":
            labels.extend([IGNORE_INDEX] * header_len + turn[header_len:])
        else:
            labels.extend([IGNORE_INDEX] * len(turn))
    return _expand(ids, labels, special, visuals)


def _chat_messages(messages: list[tuple[str, str]]) -> list[dict]:
    """HF message dicts: prompt text split at media tags, segments stripped and empty ones dropped."""
    out = []
    for role, text in messages:
        if role == "assistant":
            out.append({"role": role, "content": [{"type": "text", "text": text}]})
            continue
        content = []
        for piece in _TAGS.split(text):
            if piece == IMAGE_TAG:
                content.append({"type": "image"})
            elif piece == VIDEO_TAG:
                content.append({"type": "video"})
            elif piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        out.append({"role": role, "content": content})
    return out


def assistant_labels(input_ids: np.ndarray, special: SpecialTokens) -> np.ndarray:
    """Supervise every `<|im_start|>assistant\\n ... <|im_end|>\\n` span, nothing else.

    The span starts after the full header (`<|im_start|>` then "assistant\\n"), not at any "assistant"
    token as upstream's scan does, so the word "assistant" in a prompt cannot open a span.
    """
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    header = np.asarray((special.im_start,) + special.assistant_header)
    starts = np.flatnonzero(input_ids == special.im_start)
    ends = np.flatnonzero(input_ids == special.im_end)
    for start in starts:
        if not np.array_equal(input_ids[start : start + len(header)], header):
            continue
        body = start + len(header)
        later = ends[ends >= body]
        stop = int(later[0]) + 2 if len(later) else len(input_ids)
        labels[body:stop] = input_ids[body:stop]
    return labels


def encode_chat_template(
    tokenizer, special: SpecialTokens, messages: list[tuple[str, str]], visuals: list[VisualTokens]
) -> tuple[np.ndarray, np.ndarray]:
    """Upstream 3-era tokenisation through the model's own chat template (a failing template is a ValueError,
    which the encoder turns into a SampleError naming the sample)."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(_chat_messages(messages), tokenize=False, add_generation_prompt=False)
    except TemplateError as exc:
        raise ValueError(f"the model's chat template failed on this sample ({type(exc).__name__}: {exc}); a vision "
                         "model needs a template that renders image and video items (chat_template.jinja or "
                         "chat_template.json of the model folder)") from exc  # fmt: skip
    videos = [v for v in visuals if v.kind == "video"]
    if videos:
        text = _expand_video_placeholders(text, videos)
    input_ids, _ = _expand(_encode(tokenizer, text), None, special, visuals)
    return input_ids, assistant_labels(input_ids, special)
