"""Model FLOPs per step (qwenvl.train.flops) against hand-computed values on the toy model's architecture."""

from __future__ import annotations

import numpy as np
from mindspore import Tensor

from qwenvl.train.flops import (
    PartCost,
    batch_workload,
    model_costs,
    peak_flops,
    segment_square_sum,
    step_flops,
)
from tests.toy_model import ToyVLForConditionalGeneration

# Parameters of the toy (hidden 32, 2 layers, intermediate 64, vocab 48; vision width 16, 2 blocks, MLP 32,
# patch 12 values, merge 2), counted from its architecture:
# LLM layer: 2 RMSNorms 2*32, q/k/v 3*(32*32+32), o 32*32, gate/up 2*64*32, down 32*64 -> 10400; x2 + final norm 32
LLM = 2 * (2 * 32 + 3 * (32 * 32 + 32) + 32 * 32 + 2 * 64 * 32 + 64 * 32) + 32  # 20832, embedding excluded
LM_HEAD = 48 * 32
# vision: patch embed 16*12; block: 2 LayerNorms 2*2*16, qkv 16*48+48, proj 16*16+16, fc1 16*32+32, fc2 32*16+16
VISION = 16 * 12 + 2 * (4 * 16 + 16 * 48 + 48 + 16 * 16 + 16 + 16 * 32 + 32 + 32 * 16 + 16)  # 4640
IDS = {"image_token_id": 60, "video_token_id": 61, "vision_start_token_id": 62, "vision_end_token_id": 63,
       "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "vocab_size": 64}  # token ids of a tiny config
MERGER = 2 * 16 + (64 * 64 + 64) + (64 * 32 + 32)  # LayerNorm, 4 patches x 16 -> 64 -> 32: 6272


def _toy(trainable: dict[str, bool] | None = None, **overrides) -> ToyVLForConditionalGeneration:
    from qwenvl.train.freezing import model_part

    model = ToyVLForConditionalGeneration(**overrides)
    for name, param in model.parameters_and_names():
        param.requires_grad = (trainable or {}).get(model_part(name), True)
    return model


def test_parameters_per_part_of_the_toy_model():
    assert (LLM, VISION, MERGER) == (20832, 4640, 6272)
    costs = model_costs(_toy())
    assert {part: (c.trainable, c.frozen) for part, c in costs.items()} == {
        "vision": (VISION, 0), "merger": (MERGER, 0), "llm": (LLM, 0), "lm_head": (LM_HEAD, 0)}  # fmt: skip
    assert costs["llm"].attention == [(32, "text_segments")] * 2
    assert costs["vision"].attention == [(16, "vision_full_segments")] * 2


def test_tied_lm_head_is_counted_once_as_the_head_and_not_as_the_lookup():
    costs = model_costs(_toy(tie_word_embeddings=True))
    assert (costs["llm"].trainable, costs["lm_head"].trainable) == (LLM, LM_HEAD)


def test_text_step_is_6n_plus_torchtitan_attention():
    model = _toy()
    batch = {"input_ids": np.ones((2, 16), np.int64), "labels": np.ones((2, 16), np.int64)}
    tokens, sums = batch_workload(model, model.prepare_inputs(batch))
    assert tokens == {"llm": 32, "lm_head": 32} and sums == {"text_segments": 2 * 16**2}
    # 6 N per token over 32 tokens, plus 12 * layers * width * seq_len per token (torchtitan)
    expected = 6 * (LLM + LM_HEAD) * 32 + 32 * 12 * 2 * 32 * 16
    assert step_flops(model_costs(model), tokens, sums) == expected


def test_frozen_parts_count_4n_when_backpropagated_and_2n_before_the_first_trained_part():
    # upstream's vision-adapter recipe shape: tower frozen, merger trained, LLM and head frozen
    model = _toy({"vision": False, "merger": True, "llm": False, "lm_head": False})
    costs = model_costs(model)
    tokens = {"vision": 64, "merger": 16, "llm": 40, "lm_head": 40}
    sums = {"vision_full_segments": 2 * 32**2, "vision_window_segments": 0, "text_segments": 40**2}
    vision = 2 * VISION * 64 + 2 * (1 * 4 * 16 * 2 * 32**2)  # forward only: matmuls and attention once
    merger = 6 * MERGER * 16
    llm = 4 * LLM * 40 + 2 * (3 * 4 * 32 * 40**2)  # the backward goes through the frozen LLM to the merger
    head = 4 * LM_HEAD * 40
    assert step_flops(costs, tokens, sums) == vision + merger + llm + head


def test_image_batch_workload_counts_patches_and_merged_tokens():
    model = _toy()
    grid = np.asarray([[1, 4, 4]])  # 16 patches -> 4 merged tokens
    ids = np.full((1, 8), 7, np.int64)
    ids[0, 2:6] = model.config.image_token_id
    batch = {"input_ids": ids, "labels": ids, "pixel_values": np.zeros((16, 12), np.float32), "image_grid_thw": grid}
    tokens, sums = batch_workload(model, model.prepare_inputs(batch))
    assert tokens == {"llm": 8, "lm_head": 8, "vision": 16, "merger": 4}
    assert sums["vision_full_segments"] == 16**2 and sums["text_segments"] == 8**2


def test_segment_square_sum_counts_runs_per_row():
    assert segment_square_sum(np.asarray([[0, 0, 0, 1, 1, -2]])) == 9 + 4 + 1
    assert segment_square_sum(np.asarray([[0, 0], [0, 0]])) == 4 + 4  # a row boundary ends a segment
    assert segment_square_sum(np.asarray([[0, 0, 1, 1, 1, 0]])) == 4 + 9 + 1


def test_moe_counts_only_the_active_experts():
    from qwenvl.model import build_empty
    from tools.make_tiny_model import tiny_config

    model = build_empty(tiny_config("qwen3vl_moe", IDS))
    hidden = model.config["text_config"]["hidden_size"]
    layers = model.config["text_config"]["num_hidden_layers"]
    experts = 4 * hidden * 2 * 32 + 4 * 32 * hidden  # gate_up (E, h, 2i) + down (E, i, h), E=4, i=32
    everything = sum(p.size for n, p in model.parameters_and_names()
                     if n.startswith("model.language_model.") and "embed_tokens" not in n)  # fmt: skip
    assert model_costs(model)["llm"].trainable == everything - layers * experts + layers * experts * 2 / 4


def test_qwen25_window_layers_use_window_segments_and_zero3_shards_count_whole():
    from qwenvl.model import build_empty
    from qwenvl.parallel.zero3 import shard_weights
    from tools.make_tiny_model import tiny_config

    costs = model_costs(build_empty(tiny_config("qwen2.5vl", IDS)))  # fullatt_block_indexes [1]
    assert costs["vision"].attention == [(32, "vision_window_segments"), (32, "vision_full_segments")]
    sharded = build_empty(tiny_config("qwen2.5vl", IDS))
    shard_weights(sharded, world=2, rank=0, threshold=0, from_values=False)
    assert model_costs(sharded) == costs


def test_peak_flops_override_table_and_cpu():
    assert peak_flops(100.0, "CPU") == 100e12
    assert peak_flops(None, "CPU") is None
    assert peak_flops(None, "Ascend", "Ascend910B3") == 313e12
    assert peak_flops(None, "Ascend", "SomeFutureChip") is None


def test_a_part_without_tokens_adds_nothing():
    costs = {"vision": PartCost(trainable=10.0), "llm": PartCost(frozen=5.0)}
    # text-only batch: the trained tower is not run, so the frozen LLM is forward-only
    assert step_flops(costs, {"llm": 3, "lm_head": 3}, {}) == 2 * 5 * 3


def test_text_segments_input_is_used():
    model = _toy()
    segments = np.asarray([[0, 0, 1, -2]], np.int32)  # two packed samples and a padding position
    inputs = {"input_ids": Tensor(np.ones((1, 4), np.int32)), "text_segments": Tensor(segments)}
    assert batch_workload(model, inputs)[1]["text_segments"] == 4 + 1 + 1
