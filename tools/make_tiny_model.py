"""Build a tiny randomly initialised Qwen-VL model folder, loadable like a real checkpoint.

    python tools/make_tiny_model.py --out models/tiny-qwen2.5-vl [--family qwen2.5vl] [--seed 0]

The folder holds a small BPE tokenizer trained here (Qwen special tokens, no download), our processor
files, a Hugging Face `config.json` whose token ids match that tokenizer, and safetensors weights with
Hugging Face names. The CPU demo, tests and benchmarks train it; `transformers` loads it too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl.data.image_processing import VisionSettings  # noqa: E402
from qwenvl.data.processor_files import write_processor_files  # noqa: E402
from qwenvl.data.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

MODEL_TYPES = {"qwen2vl": "qwen2_vl", "qwen2.5vl": "qwen2_5_vl", "qwen3vl": "qwen3_vl", "qwen3vl_moe": "qwen3_vl_moe"}
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_cache": True,
    "tie_word_embeddings": False,
}


def _token_ids(tokenizer_dir: Path) -> dict[str, int]:
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vocab_size": -(-(max(ids.values()) + 1) // 64) * 64,
    }


def tiny_config(family: str, token_ids: dict[str, int]) -> dict:
    """A Hugging Face config dict for a ~1M-parameter model of the family."""
    ids = dict(token_ids)
    vocab_size = ids.pop("vocab_size")
    text = {**TEXT, "vocab_size": vocab_size, "head_dim": 16}
    if family in ("qwen2vl", "qwen2.5vl"):
        text["rope_scaling"] = {"type": "mrope", "rope_type": "default", "mrope_section": [2, 3, 3]}
        vision = {"depth": 2, "num_heads": 2, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "initializer_range": 0.02}  # fmt: skip
        if family == "qwen2vl":
            vision.update(embed_dim=32, mlp_ratio=2, hidden_size=64, hidden_act="quick_gelu")
        else:
            vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, hidden_act="silu",
                          window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)  # fmt: skip
        return {"model_type": MODEL_TYPES[family], "architectures": [_architecture(family)], **text, **ids,
                "vision_config": vision, "torch_dtype": "float32"}  # fmt: skip
    # [4, 2, 2]: mindnlp's interleaved-mRoPE slice assignment is mis-sized for [2, 3, 3] (the reference must run)
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    if family == "qwen3vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                    norm_topk_prob=True, mlp_only_layers=[])  # fmt: skip
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "in_channels": 3,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 64,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0], "hidden_act": "gelu_pytorch_tanh",
              "initializer_range": 0.02}  # fmt: skip
    return {"model_type": MODEL_TYPES[family], "architectures": [_architecture(family)],
            "text_config": {**text, **{k: v for k, v in ids.items() if k.endswith("token_id")}},
            "vision_config": vision, **ids, "tie_word_embeddings": False}  # fmt: skip


def _architecture(family: str) -> str:
    return {
        "qwen2vl": "Qwen2VLForConditionalGeneration",
        "qwen2.5vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3vl": "Qwen3VLForConditionalGeneration",
        "qwen3vl_moe": "Qwen3VLMoeForConditionalGeneration",
    }[family]


def make_tiny_model(out_dir: str | Path, family: str = "qwen2.5vl", seed: int = 0, corpus: list[str] = ()) -> Path:
    """Tokenizer + processor files + config + random weights in `out_dir`."""
    from qwenvl.model import build_model, save_model

    out = Path(out_dir)
    build_tiny_tokenizer(out, corpus)
    data_family = "qwen3vl" if family.startswith("qwen3vl") else family
    write_processor_files(out, VisionSettings.for_family(data_family), out)
    config = tiny_config(family, _token_ids(out))
    save_model(build_model(config, seed=seed), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--family", default="qwen2.5vl", choices=sorted(MODEL_TYPES), help="model family")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--corpus", default=None, help="annotation JSON whose text the tokenizer also learns")
    args = parser.parse_args(argv)
    corpus = []
    if args.corpus:
        items = json.loads(Path(args.corpus).read_text(encoding="utf-8"))
        corpus = [turn.get("value", turn.get("content", "")) for item in items for turn in item["conversations"]]
    out = make_tiny_model(args.out, args.family, args.seed, corpus)
    print(f"[make_tiny_model] {args.family} model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
