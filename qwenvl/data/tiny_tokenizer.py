"""A small byte-level BPE tokenizer with the Qwen special tokens, trained in a second.

The CPU demo and fast tests need a Qwen-shaped tokenizer without the 151k-token vocabulary (whose
embedding would dominate a tiny model) and without any download. It uses Qwen2's pre-tokenizer
pattern and the same special-token strings; their ids differ, and the pipeline looks ids up by string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
)  # fmt: skip
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BASE_CORPUS = (
    "system user assistant You are a helpful assistant.\n",
    "What is shown in the image? Describe the picture. What do you see? Answer briefly.\n",
    "The chart shows values over years; the highest bar is blue and the lowest is red.\n",
    'Detect the object and give its box as JSON: {"bbox_2d": [12, 40, 300, 255], "label": "cat"}\n',
    "A video of a person running in a park, then a dog jumps. 0.5 seconds 1.0 seconds 2.5 seconds\n",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 yes no true false left right top bottom red green blue yellow\n",
)


def build_tiny_tokenizer(out_dir: str | Path, corpus: Iterable[str] = (), vocab_size: int = 512) -> Path:
    """Train on `corpus` plus a small built-in text and write `tokenizer.json` + `tokenizer_config.json`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(BASE_CORPUS) + list(corpus), trainer=trainer)
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2TokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "split_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out
