"""Training's verdict on one dataset item, shared by the step loader and tools/check_data.py.

`load_item` is the only place a bad sample is told apart from a good one: the step loader calls it for
every item it trains on, and check_data calls it for every item it checks, so check_data's verdict and
message are, by construction, what training will do with the same flags.
"""

from __future__ import annotations

import signal

from dataclasses import dataclass, field

from qwenvl.data.dataset import EncodedSample, SupervisedDataset
from qwenvl.data.errors import SampleError
from qwenvl.data.video_processing import read_video_meta


def load_item(dataset, index: int) -> EncodedSample | SampleError:
    """Item `index` encoded as training uses it, or the SampleError that makes it a bad sample."""
    try:
        return dataset[index]
    except SampleError as exc:
        return exc.located(None, index)


@dataclass
class ItemCheck:
    """check_data's result for one item: the error, or the token length before truncation and video facts."""

    error: SampleError | None = None
    tokens: int | None = None
    videos: list[tuple[int, float]] = field(default_factory=list)


def check_item(dataset: SupervisedDataset, index: int) -> ItemCheck:
    """`load_item`'s verdict plus what the report shows; without a tokenizer only structure and media are
    checked (`SupervisedDataset.check_media`), since token lengths need the model's tokenizer."""
    encoder = dataset.encoder
    if encoder.tokenizer is None:
        try:
            dataset.check_media(index)
        except SampleError as exc:
            return ItemCheck(exc.located(None, index))
        tokens = None
    else:
        item = load_item(dataset, index)
        if isinstance(item, SampleError):
            return ItemCheck(item)
        tokens = sum(encoder.count_tokens(sample) for sample in dataset.samples(index))
    limit = encoder.settings.decode_max_pixels
    metas = [read_video_meta(path, limit) for sample in dataset.samples(index) for path in sample.videos]
    return ItemCheck(tokens=tokens, videos=[(meta.total_frames, meta.fps) for meta in metas])


_WORKER_DATASET: SupervisedDataset | None = None


def init_worker(dataset: SupervisedDataset) -> None:
    """Process-pool initializer: the dataset travels once per worker, not once per item. SIGINT/SIGTERM are
    left to the parent, which stops at a step boundary (a Ctrl-C reaches the whole process group); a worker
    still ends with its parent (its task queue closes)."""
    global _WORKER_DATASET
    _WORKER_DATASET = dataset
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def load_item_in_worker(index: int) -> EncodedSample | SampleError:
    return load_item(_WORKER_DATASET, index)


def check_item_in_worker(index: int) -> ItemCheck:
    return check_item(_WORKER_DATASET, index)
