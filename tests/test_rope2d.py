"""3-D mRoPE positions: hand-worked cases, and random layouts against transformers' own get_rope_index."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from qwenvl.data.rope2d import get_rope_index_2, get_rope_index_3, get_rope_index_25, rope_index_fn

IMAGE, VIDEO, START, END = 151655, 151656, 151652, 151653
ROOT = Path(__file__).resolve().parents[1]
IDS = {"image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": START}


def _block(pad: int, n: int) -> list[int]:
    return [START] + [pad] * n + [END]


def test_text_only_is_arange_and_padding_is_one():
    ids = np.array([[7, 8, 9, 10], [7, 8, 0, 0]])
    pos, deltas = get_rope_index_2(2, ids, **IDS)
    assert (pos == np.arange(4)).all() and (deltas == 0).all()
    pos, deltas = get_rope_index_25(2, ids, attention_mask=np.array([[1, 1, 1, 1], [1, 1, 0, 0]]), **IDS)
    assert pos[:, 1].tolist() == [[0, 1, 1, 1]] * 3
    assert deltas.ravel().tolist() == [0, -2]


def test_one_image_hand_worked():
    # text(2) + <vs> + image 1x4x6 grid (merged 2x3 = 6 tokens) + <ve> + text(1)
    ids = np.array([[1, 2] + _block(IMAGE, 6) + [3]])
    pos, deltas = get_rope_index_2(2, ids, np.array([[1, 4, 6]]), **IDS)
    t, h, w = pos[:, 0]
    # text 0,1,<vs>=2; vision starts at 3: t=3, h=3+[0,0,0,1,1,1], w=3+[0,1,2,0,1,2]
    assert t.tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7]
    assert h.tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7]
    assert w.tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]
    assert deltas.tolist() == [[8 - 11]]


def test_qwen25_video_temporal_positions_follow_seconds():
    # video grid 3x2x2 (1 token per frame group), 4 s per temporal patch -> t = 0, 8, 16
    ids = np.array([_block(VIDEO, 3)])
    pos, _ = get_rope_index_25(2, ids, None, np.array([[3, 2, 2]]), np.array([4.0]), **IDS)
    assert pos[0, 0, 1:4].tolist() == [1, 9, 17]
    assert pos[0, 0, 4] == 18  # <vision_end> continues from the max
    qwen2, _ = get_rope_index_2(2, ids, None, np.array([[3, 2, 2]]), **IDS)
    assert qwen2[0, 0, 1:4].tolist() == [1, 2, 3]


def test_qwen3_video_groups_are_separate_blocks():
    # two temporal groups of 1 token each with a timestamp token between them
    ids = np.array([_block(VIDEO, 1) + [50] + _block(VIDEO, 1)])
    pos, _ = get_rope_index_3(2, ids, None, np.array([[2, 2, 2]]), **IDS)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_rope_index_fn_by_family():
    assert rope_index_fn("qwen2.5vl") is get_rope_index_25
    with pytest.raises(ValueError, match="qwen2.5vl"):
        rope_index_fn("llava")


def _random_row(rng: np.random.Generator, family: str) -> tuple[list[int], list, list, list]:
    """A row of text, images and videos in random order, with the matching grids and seconds."""
    tokens: list[int] = list(rng.integers(10, 1000, rng.integers(0, 5)))
    images, videos, seconds = [], [], []
    for _ in range(rng.integers(1, 5)):
        h, w = 2 * rng.integers(1, 4), 2 * rng.integers(1, 4)
        if rng.random() < 0.5:
            images.append([1, h, w])
            tokens += _block(IMAGE, h * w // 4)
        else:
            t = int(rng.integers(1, 4))
            videos.append([t, h, w])
            seconds.append(float(rng.choice([0.5, 1.0, 1.3333334, 2.0, 3.7])))
            if family == "qwen3vl":
                for _ in range(t):
                    tokens += list(rng.integers(10, 1000, 3)) + _block(VIDEO, h * w // 4)
            else:
                tokens += _block(VIDEO, t * h * w // 4)
        tokens += list(rng.integers(10, 1000, rng.integers(0, 4)))
    return tokens, images, videos, seconds


def _hf_rope_child(work: Path) -> None:
    """Child process: transformers' get_rope_index under mindnlp (which must stay out of the pytest process:
    importing it patches mindspore.Tensor for everything after)."""
    import mindnlp  # noqa: F401
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    classes = {"qwen2vl": Qwen2VLModel, "qwen2.5vl": Qwen2_5_VLModel, "qwen3vl": Qwen3VLModel}
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2, tokens_per_second=2), **IDS))
    cases = json.loads((work / "cases.json").read_text())
    results = []
    for case in cases:
        kwargs = {key: None if case[key] is None else torch.tensor(case[key])
                  for key in ("input_ids", "image_grid_thw", "video_grid_thw", "attention_mask")}  # fmt: skip
        if case["family"] == "qwen2.5vl":
            seconds = case["second_per_grid_ts"]
            kwargs["second_per_grid_ts"] = None if seconds is None else torch.tensor(seconds, dtype=torch.float32)
        pos, deltas = classes[case["family"]].get_rope_index(fake, **kwargs)
        results.append([pos.numpy().tolist(), deltas.numpy().reshape(-1).tolist()])
    (work / "results.json").write_text(json.dumps(results))


def _listed(array: np.ndarray | None) -> list | None:
    return None if array is None else array.tolist()


def _hf_rope(cases: list[dict], work: Path) -> list:
    if importlib.util.find_spec("mindnlp") is None:  # never import it here: it patches mindspore.Tensor
        pytest.skip("mindnlp (transformers on MindSpore) is the reference and is not installed")
    (work / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, str(work)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "results.json").read_text())


FAMILIES = ("qwen2vl", "qwen2.5vl", "qwen3vl")


def _layouts(family: str) -> tuple[list[dict], list]:
    """25 random batches for a family: the request for transformers and our results."""
    rng = np.random.default_rng({"qwen2vl": 1, "qwen2.5vl": 2, "qwen3vl": 3}[family])
    cases, ours = [], []
    for _ in range(25):
        rows = [_random_row(rng, family) for _ in range(int(rng.integers(1, 4)))]
        length = max(len(r[0]) for r in rows) + int(rng.integers(0, 3))
        ids = np.zeros((len(rows), length), dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, (tokens, *_rest) in enumerate(rows):
            left = rng.random() < 0.3  # left padding, as in generation batches
            sl = slice(length - len(tokens), length) if left else slice(0, len(tokens))
            ids[b, sl], mask[b, sl] = tokens, 1
        images = np.array([g for r in rows for g in r[1]]) if any(r[1] for r in rows) else None
        videos = np.array([g for r in rows for g in r[2]]) if any(r[2] for r in rows) else None
        seconds = [s for r in rows for s in r[3]] or None
        kwargs = {"attention_mask": mask, **IDS}
        if family == "qwen2.5vl":
            kwargs["second_per_grid_ts"] = None if seconds is None else np.array(seconds, np.float32)
        ours.append(rope_index_fn(family)(2, ids, images, videos, **kwargs))
        cases.append({"family": family, "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                      "image_grid_thw": _listed(images), "video_grid_thw": _listed(videos),
                      "second_per_grid_ts": seconds})  # fmt: skip
    return cases, ours


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, tuple[list, list]]:
    """Ours and transformers' results per family; the reference runs once, in one child process."""
    built = {family: _layouts(family) for family in FAMILIES}
    refs = _hf_rope([c for family in FAMILIES for c in built[family][0]], tmp_path_factory.mktemp("rope"))
    out, at = {}, 0
    for family in FAMILIES:
        n = len(built[family][1])
        out[family] = (built[family][1], refs[at : at + n])
        at += n
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_random_layouts_equal_transformers(family, layouts):
    ours, refs = layouts[family]
    for (pos, deltas), (ref_pos, ref_deltas) in zip(ours, refs):
        np.testing.assert_array_equal(pos, np.asarray(ref_pos))
        np.testing.assert_array_equal(deltas.reshape(-1), np.asarray(ref_deltas))


if __name__ == "__main__":
    _hf_rope_child(Path(sys.argv[1]))
