"""LR schedules against hand-computed values of Hugging Face's formulas."""

from __future__ import annotations

import math

import pytest

from qwenvl.train.schedule import lr_factor, schedule_options, warmup_steps


def test_warmup_steps_rule():
    assert warmup_steps(100, 0.03) == 3
    assert warmup_steps(101, 0.03) == 4  # ceil(3.03)
    assert warmup_steps(100, 0.5, warmup_steps=7) == 7


def test_linear_with_warmup_hand_values():
    # total 10, warmup 2: 0, .5, then (10-s)/8
    got = [lr_factor("linear", s, 10, 2) for s in range(11)]
    assert got == pytest.approx([0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0])


def test_cosine_hand_values():
    assert lr_factor("cosine", 0, 10, 2) == 0
    assert lr_factor("cosine", 1, 10, 2) == 0.5
    assert lr_factor("cosine", 2, 10, 2) == pytest.approx(1.0)
    assert lr_factor("cosine", 6, 10, 2) == pytest.approx(0.5)  # half way: cos(pi/2) = 0
    assert lr_factor("cosine", 4, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor("cosine", 10, 10, 2) == pytest.approx(0.0)


def test_constant_kinds():
    assert [lr_factor("constant", s, 5, 2) for s in range(5)] == [1.0] * 5
    assert [lr_factor("constant_with_warmup", s, 5, 2) for s in range(5)] == [0.0, 0.5, 1.0, 1.0, 1.0]


def test_unknown_kind():
    with pytest.raises(ValueError, match="cosine"):
        lr_factor("polynomial", 0, 5, 0)


def test_cosine_with_min_lr_hand_values():
    """HF's cosine_with_min_lr: cosine between 1 and min_lr_rate after warmup (total 10, warmup 2, rate 0.1)."""
    options = schedule_options("cosine_with_min_lr", '{"min_lr_rate": 0.1}', 1e-3)
    assert options == {"min_lr_rate": 0.1}
    assert lr_factor("cosine_with_min_lr", 1, 10, 2, **options) == 0.5  # warmup as usual
    assert lr_factor("cosine_with_min_lr", 2, 10, 2, **options) == pytest.approx(1.0)
    assert lr_factor("cosine_with_min_lr", 6, 10, 2, **options) == pytest.approx(0.5 * 0.9 + 0.1)
    assert lr_factor("cosine_with_min_lr", 10, 10, 2, **options) == pytest.approx(0.1)
    # min_lr is absolute: divided by the base learning rate
    assert schedule_options("cosine_with_min_lr", {"min_lr": 1e-4}, 1e-3)["min_lr_rate"] == pytest.approx(0.1)


def test_cosine_num_cycles():
    # num_cycles 1: a full cosine wave, back to 1 at the end (HF's formula)
    assert lr_factor("cosine", 10, 10, 0, **schedule_options("cosine", '{"num_cycles": 1}', 1.0)) == pytest.approx(1.0)
    assert lr_factor("cosine", 5, 10, 0, **schedule_options("cosine", '{"num_cycles": 1}', 1.0)) == pytest.approx(0.0)
