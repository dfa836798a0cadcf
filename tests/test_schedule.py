"""LR schedules against hand-computed values of Hugging Face's formulas."""

from __future__ import annotations

import math

import pytest

from qwenvl.train.schedule import lr_factor, warmup_steps


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
