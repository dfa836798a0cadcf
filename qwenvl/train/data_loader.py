"""Per-rank optimizer steps of collated micro-batches: epoch plans, background decoding, bad samples.

The order of an epoch is a pure function of (seed, epoch, rank, world size): `shard_indices` shuffles
once for all ranks and gives each a disjoint shard (padded by wrapping, as torch's DistributedSampler);
the shard is cut into micro-batches of `per_device_train_batch_size` (the last one may be smaller,
HF's `dataloader_drop_last=False`) and those into steps of `gradient_accumulation_steps` (the last step
of an epoch may have fewer). Resuming therefore only needs (epoch, step in epoch): the order is
rebuilt and the finished steps are skipped without decoding anything. With `sizes` (tokens and patches of
every item: `--group_by_modality_length`) the shared permutation is `grouping.grouped_order` in groups of
micro-batch x world, so each rank's micro-batch holds items of one modality and similar length.

Decoding runs ahead of training: with `dataloader_num_workers=0` in one background thread, otherwise in
that many spawned worker processes (images, videos and tokenisation are CPU work that threads would
serialise on the GIL). Errors are delivered with the step they belong to, never earlier, so everything
before a bad sample is trained (and checkpointed) first. An empty dataset is refused at once, and an
epoch in which every sample was bad stops with an error instead of training on placeholders forever.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import threading
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from qwenvl.constants import IGNORE_INDEX
from qwenvl.data.dataset import EncodedSample
from qwenvl.data.errors import DatasetError, SampleError, nothing_to_train
from qwenvl.data.grouping import grouped_order
from qwenvl.data.validation import init_worker, load_item, load_item_in_worker

Batch = dict[str, "np.ndarray | None"]


def steps_per_epoch(n: int, world: int, micro_batch: int, accumulation: int) -> int:
    """Optimizer steps in one epoch of `n` items on each of `world` ranks."""
    per_rank = math.ceil(n / world)
    return math.ceil(math.ceil(per_rank / micro_batch) / accumulation)


def total_steps(num_train_epochs: float, max_steps: int, epoch_steps: int) -> int:
    """`max_steps` when positive (HF), else ceil(epochs * steps per epoch): fractional epochs stop mid-epoch."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(num_train_epochs * epoch_steps))


def shard_indices(
    n: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool = True, order: np.ndarray | None = None
) -> np.ndarray:
    """This rank's sample indices for one epoch, like torch's DistributedSampler (drop_last=False).

    One permutation seeded by `seed + epoch` is shared by all ranks; it is padded by wrapping around to
    a multiple of `world` (so a few samples appear twice per epoch when n % world != 0), and rank r takes
    every world-th index from r: shards are disjoint and together cover every sample. `order` replaces
    the permutation (length grouping).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    if n <= 0:
        return np.zeros(0, np.int64)
    if order is None:
        order = np.random.default_rng(seed + epoch).permutation(n) if shuffle else np.arange(n)
    total = -(-n // world) * world
    padded = np.resize(order, total)
    return padded[rank:total:world].astype(np.int64)


def epoch_plan(
    n: int, rank: int, world: int, seed: int, epoch: int, micro_batch: int, accumulation: int,
    sizes: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[list[np.ndarray]]:
    """Dataset indices of this rank for one epoch: steps -> micro-batches -> indices."""
    order = None
    if sizes is not None:
        tokens, patches = sizes
        order = grouped_order(tokens, np.asarray(patches) > 0, micro_batch * world, seed, epoch)
    indices = shard_indices(n, rank, world, seed, epoch, order=order)
    micro = [indices[i : i + micro_batch] for i in range(0, len(indices), micro_batch)]
    return [micro[i : i + accumulation] for i in range(0, len(micro), accumulation)]


@dataclass
class LoadedStep:
    """One optimizer step's collated micro-batches and the bad samples met while loading them."""

    epoch: int
    step_in_epoch: int
    micro_batches: list[Batch]
    n_samples: int
    n_input_tokens: int
    bad: list[SampleError] = field(default_factory=list)


def null_sample() -> EncodedSample:
    """A one-token item with no label: stands in for a micro-batch whose every sample was bad.

    Ranks must run the same number of micro-batches (the collectives pair up), and this one adds
    nothing to the loss, the token count or the gradients.
    """
    return EncodedSample(
        input_ids=np.zeros(1, np.int64),
        labels=np.full(1, IGNORE_INDEX, np.int64),
        position_ids=np.zeros((3, 1), np.int64),
        seq_lens=[1],
    )


def _run_now(fn: Callable, *args) -> Future:
    """Run in this thread, holding the result or the exception like a pool's future (order kept)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


class _EpochTally:
    """Counts good and bad samples of each epoch seen from its first step; all bad is an error."""

    def __init__(self, first_step: int) -> None:
        self.whole = first_step == 0
        self.good = self.bad = 0

    def add(self, step: LoadedStep, steps_per_epoch: int) -> None:
        self.good += step.n_samples
        self.bad += len(step.bad)
        if step.step_in_epoch + 1 < steps_per_epoch:
            return
        if self.whole and self.good == 0:
            raise nothing_to_train(self.bad)
        self.whole, self.good, self.bad = True, 0, 0


class StepLoader:
    """Iterates `LoadedStep`s from a data position onward, epoch after epoch (the caller stops)."""

    def __init__(
        self,
        dataset: Sequence[EncodedSample],
        collate: Callable[[list[EncodedSample]], Batch],
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        micro_batch: int = 1,
        accumulation: int = 1,
        num_workers: int = 0,
        prefetch_steps: int = 2,
        sizes: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.dataset = dataset
        self.collate = collate
        self.rank, self.world, self.seed = rank, world, seed
        self.micro_batch, self.accumulation = micro_batch, accumulation
        self.num_workers = num_workers
        self.prefetch_steps = max(1, prefetch_steps)
        self.sizes = sizes
        if len(dataset) == 0:
            raise DatasetError("the training dataset has no samples", kind="empty_dataset")

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.dataset), self.world, self.micro_batch, self.accumulation)

    def _positions(self, epoch: int, step_in_epoch: int) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        while True:
            plan = epoch_plan(len(self.dataset), self.rank, self.world, self.seed, epoch, self.micro_batch,
                              self.accumulation, self.sizes)  # fmt: skip
            for step in range(step_in_epoch, len(plan)):
                yield epoch, step, plan[step]
            epoch, step_in_epoch = epoch + 1, 0

    def _assemble(self, epoch: int, step: int, futures: list[list[Future]]) -> LoadedStep:
        micro_batches, bad, n_samples, n_tokens = [], [], 0, 0
        for micro in futures:
            good = []
            for future in micro:
                item = future.result()
                (bad if isinstance(item, SampleError) else good).append(item)
            n_samples += len(good)
            n_tokens += sum(sample.num_tokens for sample in good)
            micro_batches.append(self.collate(good or [null_sample()]))
        return LoadedStep(epoch, step, micro_batches, n_samples, n_tokens, bad)

    def _produce(self, out: queue.Queue, stop: threading.Event, epoch: int, step_in_epoch: int) -> None:
        executor: Executor | None = None
        try:
            if self.num_workers > 0:
                context = multiprocessing.get_context("spawn")
                executor = ProcessPoolExecutor(self.num_workers, context, init_worker, (self.dataset,))
                submit = lambda i: executor.submit(load_item_in_worker, int(i))  # noqa: E731
            else:
                submit = lambda i: _run_now(load_item, self.dataset, int(i))  # noqa: E731
            pending: list[tuple[int, int, list[list[Future]]]] = []
            tally = _EpochTally(step_in_epoch)
            for e, s, micro in self._positions(epoch, step_in_epoch):
                pending.append((e, s, [[submit(i) for i in indices] for indices in micro]))
                if len(pending) < self.prefetch_steps:
                    continue
                loaded = self._assemble(*pending.pop(0))
                tally.add(loaded, self.steps_per_epoch)
                if not self._put(out, stop, loaded):
                    return
        except BaseException as exc:  # delivered to the consumer, raised there
            self._put(out, stop, exc)
        finally:
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _put(out: queue.Queue, stop: threading.Event, item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def iterate(self, epoch: int = 0, step_in_epoch: int = 0) -> Iterator[LoadedStep]:
        """Steps from (epoch, step_in_epoch) on; closing the iterator stops the background work."""
        out: queue.Queue = queue.Queue(maxsize=self.prefetch_steps)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(out, stop, epoch, step_in_epoch), daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=30)
