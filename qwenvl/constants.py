"""Token strings and ids shared by Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

The ids are those of the real Qwen tokenizer; code that works with other tokenizers (the tiny demo
tokenizer) looks ids up by their strings through `qwenvl.data.tokens.SpecialTokens` instead.
"""

IGNORE_INDEX = -100

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

QWEN_TOKEN_IDS = {
    ENDOFTEXT: 151643,
    IM_START: 151644,
    IM_END: 151645,
    VISION_START: 151652,
    VISION_END: 151653,
    IMAGE_PAD: 151655,
    VIDEO_PAD: 151656,
}

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
