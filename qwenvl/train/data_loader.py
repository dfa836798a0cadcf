"""Per-rank optimizer steps of collated micro-batches: epoch plans, background decoding, bad samples.

The order of an epoch is a pure function of (seed, epoch, rank, world size): `shard_indices` shuffles
once for all ranks and gives each a disjoint shard (padded by wrapping, as torch's DistributedSampler);
the shard is cut into micro-batches of `per_device_train_batch_size` (the last one may be smaller,
HF's `dataloader_drop_last=False`) and those into steps of `gradient_accumulation_steps` (the last step
of an epoch may have fewer). Resuming therefore only needs (epoch, step in epoch): the order is
rebuilt and the finished steps are skipped without decoding anything.

Decoding runs ahead of training: with `dataloader_num_workers=0` in one background thread, otherwise in
that many spawned worker processes (images, videos and tokenisation are CPU work that threads would
serialise on the GIL). Errors are delivered with the step they belong to, never earlier, so everything
before a bad sample is trained (and checkpointed) first.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import signal
import threading
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from qwenvl.constants import IGNORE_INDEX
from qwenvl.data.dataset import EncodedSample
from qwenvl.data.errors import SampleError

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


def epoch_plan(
    n: int, rank: int, world: int, seed: int, epoch: int, micro_batch: int, accumulation: int
) -> list[list[np.ndarray]]:
    """Dataset indices of this rank for one epoch: steps -> micro-batches -> indices."""
    from qwenvl.train.distributed import shard_indices

    indices = shard_indices(n, rank, world, seed, epoch)
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


_WORKER_DATASET = None


def _init_worker(dataset) -> None:
    """Hold the dataset; leave SIGINT/SIGTERM to the trainer, which stops at a step boundary (a Ctrl-C reaches
    the whole process group), while a worker still ends with its parent (its task queue closes)."""
    global _WORKER_DATASET
    _WORKER_DATASET = dataset
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _load(dataset, index: int) -> tuple:
    """("ok", sample) or ("bad", reason, file, index): a SampleError's location survives pickling."""
    try:
        return ("ok", dataset[index])
    except SampleError as exc:
        return ("bad", exc.reason, exc.file, exc.index if exc.index is not None else index)


def _load_in_worker(index: int) -> tuple:
    return _load(_WORKER_DATASET, index)


def _run_now(fn: Callable, *args) -> Future:
    """Run in this thread, holding the result or the exception like a pool's future (order kept)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


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
    ) -> None:
        self.dataset = dataset
        self.collate = collate
        self.rank, self.world, self.seed = rank, world, seed
        self.micro_batch, self.accumulation = micro_batch, accumulation
        self.num_workers = num_workers
        self.prefetch_steps = max(1, prefetch_steps)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.dataset), self.world, self.micro_batch, self.accumulation)

    def _positions(self, epoch: int, step_in_epoch: int) -> Iterator[tuple[int, int, list[np.ndarray]]]:
        while True:
            plan = epoch_plan(len(self.dataset), self.rank, self.world, self.seed, epoch, self.micro_batch, self.accumulation)
            for step in range(step_in_epoch, len(plan)):
                yield epoch, step, plan[step]
            epoch, step_in_epoch = epoch + 1, 0

    def _assemble(self, epoch: int, step: int, futures: list[list[Future]]) -> LoadedStep:
        micro_batches, bad, n_samples, n_tokens = [], [], 0, 0
        for micro in futures:
            good = []
            for future in micro:
                result = future.result()
                if result[0] == "ok":
                    good.append(result[1])
                else:
                    bad.append(SampleError(*result[1:]))
            n_samples += len(good)
            n_tokens += sum(sample.num_tokens for sample in good)
            micro_batches.append(self.collate(good or [null_sample()]))
        return LoadedStep(epoch, step, micro_batches, n_samples, n_tokens, bad)

    def _produce(self, out: queue.Queue, stop: threading.Event, epoch: int, step_in_epoch: int) -> None:
        executor: Executor | None = None
        try:
            if self.num_workers > 0:
                context = multiprocessing.get_context("spawn")
                executor = ProcessPoolExecutor(self.num_workers, context, _init_worker, (self.dataset,))
                submit = lambda i: executor.submit(_load_in_worker, int(i))  # noqa: E731
            else:
                submit = lambda i: _run_now(_load, self.dataset, int(i))  # noqa: E731
            pending: list[tuple[int, int, list[list[Future]]]] = []
            for e, s, micro in self._positions(epoch, step_in_epoch):
                pending.append((e, s, [[submit(i) for i in indices] for indices in micro]))
                if len(pending) < self.prefetch_steps:
                    continue
                if not self._put(out, stop, self._assemble(*pending.pop(0))):
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
