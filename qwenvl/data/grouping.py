"""Length-grouped sample order (upstream's `--group_by_modality_length`, HF's LengthGroupedSampler idea).

Samples with and without vision are grouped apart; within each, a seeded shuffle is cut into mega-batches
of `MEGA` groups, each sorted by length, cut into groups of `group` samples, and the groups of both
modalities are shuffled together. A group then holds samples of similar length and one modality, so its
padded shape (`qwenvl.data.buckets`) is tight and a dataset meets few distinct shapes; the order is still
a pure function of (seed, epoch), so resume rebuilds it. `group` is the global batch of one micro-step
(per-rank micro-batch x world size): rank r takes every world-th sample of each group.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MEGA = 50  # groups per sorted mega-batch, as HF's LengthGroupedSampler


def grouped_order(lengths: np.ndarray, has_vision: np.ndarray, group: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(len(lengths)) whose consecutive `group`-sized chunks are length-grouped."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    groups, leftovers = [], []
    for modality in (True, False):
        members = order[np.asarray(has_vision, bool)[order] == modality]
        span = group * MEGA
        for start in range(0, len(members), span):
            mega = members[start : start + span]
            mega = mega[np.argsort(-lengths[mega], kind="stable")]
            whole = len(mega) - len(mega) % group
            groups.extend(mega[i : i + group] for i in range(0, whole, group))
            leftovers.extend(mega[whole:])
    shuffled = [groups[i] for i in rng.permutation(len(groups))]
    return np.concatenate(shuffled + [np.asarray(leftovers, np.int64)]).astype(np.int64) if shuffled or leftovers \
        else np.zeros(0, np.int64)  # fmt: skip


def dataset_sizes(dataset: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, vision patches) of every item, from headers only (`SupervisedDataset.sizes`)."""
    sizes = np.array([dataset.sizes(i) for i in range(len(dataset))], np.int64).reshape(-1, 2)
    return sizes[:, 0], sizes[:, 1]
