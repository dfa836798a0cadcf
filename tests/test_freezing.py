"""Tuning flags against the toy model's own cell structure, for every flag combination."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from qwenvl.train.freezing import apply_tuning_flags, model_part
from tests.toy_model import ToyVLForConditionalGeneration


def _parts(model) -> dict[str, set[int]]:
    """Parameter ids per part, taken from the cells (not from names)."""
    visual = model.model.visual
    merger = set(map(id, visual.merger.get_parameters()))
    if visual.deepstack_merger_list is not None:
        merger |= set(map(id, visual.deepstack_merger_list.get_parameters()))
    llm = set(map(id, model.model.language_model.get_parameters()))
    return {
        "vision": set(map(id, visual.get_parameters())) - merger,
        "merger": merger,
        "llm": llm,
        "lm_head": set(map(id, model.lm_head.get_parameters())) - llm,
    }


FLAGS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("deepstack", [False, True])
@pytest.mark.parametrize("vision,mlp,llm", FLAGS)
def test_every_flag_combination(vision, mlp, llm, deepstack):
    model = ToyVLForConditionalGeneration(deepstack=deepstack)
    parts = _parts(model)
    if deepstack:
        assert len(parts["merger"]) > len(set(map(id, model.model.visual.merger.get_parameters())))
    # upstream order: the tower flag, then the merger flag over it, then the LLM flag (lm_head with it)
    wanted = {"vision": vision, "merger": mlp, "llm": llm, "lm_head": llm}
    counts = apply_tuning_flags(model, SimpleNamespace(tune_mm_vision=vision, tune_mm_mlp=mlp, tune_mm_llm=llm))
    by_id = {id(p): p for p in model.get_parameters()}
    assert set(by_id) == set().union(*parts.values())
    for part, ids in parts.items():
        assert ids, part
        assert {by_id[i].requires_grad for i in ids} == {wanted[part]}, part
        assert counts[part] == (sum(int(by_id[i].size) for i in ids) if wanted[part] else 0), part


@pytest.mark.parametrize("llm", [False, True])
def test_tied_lm_head_counts_once_with_the_language_model(llm):
    model = ToyVLForConditionalGeneration(tie_word_embeddings=True)
    embed = model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight is embed
    counts = apply_tuning_flags(model, SimpleNamespace(tune_mm_vision=True, tune_mm_mlp=True, tune_mm_llm=llm))
    assert embed.requires_grad is llm
    assert counts["lm_head"] == 0
    llm_size = sum(int(p.size) for p in model.model.language_model.get_parameters())
    assert counts["llm"] == (llm_size if llm else 0)


def test_model_part_names():
    assert model_part("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert model_part("model.visual.merger.mlp.0.weight") == "merger"
    assert model_part("model.visual.deepstack_merger_list.1.norm.weight") == "merger"
    assert model_part("model.language_model.layers.0.mlp.gate_proj.weight") == "llm"
    assert model_part("lm_head.weight") == "lm_head"
    with pytest.raises(ValueError, match="no known part"):
        model_part("visual.blocks.0.attn.qkv.weight")
