"""A real photo dataset (mixed sizes, 120 px to 2400 x 1800, plus the real videos) through train_qwen.py:
the compiled graphs are exactly the shapes the data needs under the shape buckets, and memory stays flat."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import real_data  # noqa: E402


@pytest.mark.slow
def test_mixed_size_photos_and_videos_train_60_steps_with_bounded_graphs(tmp_path, media_dir):
    # sft.sh's pixel limit keeps the CI run near a minute; bench/real_data.py runs the default limit
    report = real_data.run(tmp_path, 60, ["--max_pixels", "50176"], media=media_dir)
    assert report.steps == 60
    assert 1 <= report.graphs == report.needed  # counted by the trainer vs. from the epoch plans here
    assert report.graphs <= 18  # the bound of the default buckets (3 x 6 token sizes)
    assert report.warm_step < 30 and abs(report.rss_growth) <= 0.05
