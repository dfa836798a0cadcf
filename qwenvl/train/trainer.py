"""The MindSpore training loop: steps, schedule, logging, bad samples, checkpoints, resume, final save.

Not the Hugging Face Trainer: one optimizer step is `TrainStep.run` (compiled forward/backward per
micro-batch, token-weighted accumulation, data-parallel reduction, clipping, AdamW); this module
decides what runs when. The data order is a pure function of (seed, epoch, rank, world), and a
checkpoint stores weights, optimizer moments, RNG states and the data position, so a resumed run
continues exactly where an uninterrupted one would be. Resume verifies checkpoints against their
manifests and falls back past damaged ones; a SIGTERM/SIGINT (`graceful_stop`) ends the run at the
next step boundary with a checkpoint, every rank at the same step.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from mindspore import nn

from qwenvl.data.errors import SampleError
from qwenvl.data.grouping import dataset_sizes
from qwenvl.train.checkpoint import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    DataPosition,
    TrainerState,
    checkpoint_folders,
    checkpoint_problem,
    checkpoint_step,
    optimizer_files,
    read_trainer_state,
    remove_partial_checkpoints,
    restore_rng_state,
    rng_file,
    rng_state,
    rotate_checkpoints,
    write_checkpoint,
)
from qwenvl.train.data_loader import StepLoader, null_sample, total_steps
from qwenvl.train.flops import batch_workload, device_peak_flops, model_costs, step_flops
from qwenvl.parallel.world import DataParallel
from qwenvl.train.graceful_stop import StopSignals
from qwenvl.parallel.zero import ZeroConfig
from qwenvl.parallel.zero3 import align_vision
from qwenvl.train.optimizer import OptimizerState, build_optimizer, save_optimizer_state
from qwenvl.train.param_groups import build_param_groups
from qwenvl.train.run_record import ResumeConflict, clear_previous_run, conflict_message, resume_conflicts, run_args
from qwenvl.train.schedule import lr_factor, schedule_options, warmup_steps
from qwenvl.train.train_log import TrainLogger, memory_stats
from qwenvl.train.train_step import StepMetrics, TrainStep


class ModelFiles(Protocol):
    """How the trainer writes a model folder and reads weights back into a live model."""

    def save(self, model: nn.Cell, out_dir: Path) -> None: ...

    def load_into(self, model: nn.Cell, checkpoint: Path) -> None: ...


@dataclass
class TrainSummary:
    steps: int
    first_loss: float
    last_loss: float
    mean_step_seconds: float
    tokens: int
    skipped_steps: int
    bad_samples: list[str] = field(default_factory=list)
    last_checkpoint: str | None = None
    resumed_from: str | None = None
    stopped_by: str | None = None  # the signal that stopped the run early ("SIGTERM", "SIGINT")
    graphs: int = 0  # distinct train-step graphs compiled by this process
    compile_seconds: float = 0.0  # their estimated compile time (qwenvl.train.graph_tracker)


def _interval(value: float, total: int) -> int:
    """HF convention: a value below 1 is a fraction of the total steps."""
    return max(1, int(np.ceil(value * total)) if value < 1 else int(value))


class Trainer:
    """Trains `model` on `dataset` with the upstream TrainingArguments; `train()` returns a summary."""

    def __init__(
        self,
        model: nn.Cell,
        args,
        dataset: Sequence,
        collate: Callable,
        files: ModelFiles,
        dp: DataParallel | None = None,
        progress: bool = True,
        eval_dataset: Sequence | None = None,
        stop: StopSignals | None = None,
        zero: ZeroConfig | None = None,
    ) -> None:
        self.model = model
        self.model.set_train(True)
        self.eval_dataset = eval_dataset
        self.collate = collate
        self._eval_fn = None
        self.args = args
        self.files = files
        self.dp = dp or DataParallel()
        self.output_dir = Path(args.output_dir)
        self.groups = build_param_groups(model, args)
        self.zero = zero or ZeroConfig()
        sharded = getattr(model, "zero3", None)
        self.optimizer = build_optimizer(self.groups, args, self.dp, self.zero, sharded.specs if sharded else None)
        self.step_fn = TrainStep(model, self.optimizer, args, self._dropout_keys(model))
        self.loader = StepLoader(
            dataset,
            collate,
            rank=self.dp.rank,
            world=self.dp.world_size,
            seed=args.seed,
            micro_batch=args.per_device_train_batch_size,
            accumulation=args.gradient_accumulation_steps,
            num_workers=args.dataloader_num_workers,
            sizes=dataset_sizes(dataset) if args.group_by_modality_length or args.group_by_length else None,
        )
        self.total_steps = total_steps(args.num_train_epochs, args.max_steps, self.loader.steps_per_epoch)
        self.warmup = warmup_steps(self.total_steps, args.warmup_ratio, args.warmup_steps)
        self.schedule = schedule_options(args.lr_scheduler_type, args.lr_scheduler_kwargs, args.learning_rate)
        self.state = TrainerState(max_steps=self.total_steps, data=self._position(0, 0))
        self.progress = progress
        self.stop = stop or StopSignals()
        self._costs = model_costs(model)  # after the tuning flags: trainable and frozen parameters count differently
        self._peak, self._peak_source = device_peak_flops(getattr(args, "peak_tflops", None))

    def _dropout_keys(self, model: nn.Cell) -> Callable[[int], None] | None:
        """Before each micro-batch, key the model's dropout (`model.dropout_key`, LoRA) by (seed, step, micro-batch,
        rank): masks then depend only on what a checkpoint stores, so runs repeat and resume exactly."""
        key = getattr(model, "dropout_key", None)
        if key is None:
            return None
        return lambda index: key.set(self.args.seed, self.state.global_step, index, self.dp.rank)

    def _position(self, epoch: int, step_in_epoch: int) -> DataPosition:
        a = self.args
        return DataPosition(
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            seed=a.seed,
            world_size=self.dp.world_size,
            dataset_size=len(self.loader.dataset),
            micro_batch_size=a.per_device_train_batch_size,
            accumulation_steps=a.gradient_accumulation_steps,
        )

    def lr_factor(self, step: int) -> float:
        return lr_factor(self.args.lr_scheduler_type, step, self.total_steps, self.warmup, **self.schedule)

    # ----- checkpoints -------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.dp.world_size > 1:
            from mindspore import Tensor

            self.dp.all_reduce_sum([Tensor(np.zeros(1, np.float32))])

    def save_checkpoint(self) -> Path | None:
        """`output_dir/checkpoint-N`, written atomically; returns it on the main rank."""
        self.stop.reassert()
        step = self.state.global_step

        def shared_files(folder: Path) -> None:
            schedule = {"lr_scheduler_type": self.args.lr_scheduler_type, "total_steps": self.total_steps,
                        "warmup_steps": self.warmup, "last_factor": self.lr_factor(step)}  # fmt: skip
            (folder / "scheduler.json").write_text(json.dumps(schedule, indent=2), encoding="utf-8")

        def rank_files(folder: Path) -> None:
            # every rank: the model folder (ZeRO-3 weights are gathered tensor by tensor, the main rank writes)
            self.files.save(self.model, folder, write=self.dp.is_main)
            if self.optimizer.owns_state_file():
                state, metadata = self.step_fn.state_dict()
                save_optimizer_state(folder / f"optimizer-rank{self.dp.rank}.safetensors", state, metadata)
            rng_file(folder, self.dp.rank).write_text(json.dumps(rng_state()), encoding="utf-8")

        try:
            path = write_checkpoint(
                self.output_dir, step, shared_files, self.state, self.dp.is_main, self._barrier, rank_files
            )
        except OSError as exc:
            raise CheckpointError(
                f"cannot write {CHECKPOINT_PREFIX}{step} in {self.output_dir}: {exc.strerror or exc}; "
                "the earlier checkpoints are kept"
            ) from exc
        if self.dp.is_main:
            rotate_checkpoints(self.output_dir, self.args.save_total_limit)
        return path

    # What `args.json` of this run holds (set by train_qwen.py); compared with a checkpoint before resuming.
    run_record: dict | None = None

    def resume(self, checkpoint: Path) -> None:
        """Weights, optimizer moments, loss scale, RNG and data position from a complete checkpoint."""
        self.files.load_into(self.model, checkpoint)
        self.step_fn.load_state_dict(OptimizerState(optimizer_files(checkpoint)))
        state = read_trainer_state(checkpoint)
        state.max_steps = self.total_steps
        self.state = state
        rng = rng_file(checkpoint, self.dp.rank)
        if rng.is_file():
            restore_rng_state(json.loads(rng.read_text(encoding="utf-8")))

    def _find_resume(self) -> Path | None:
        """The checkpoint to continue: `--resume_from_checkpoint` (a damaged one is an error), else the newest
        intact checkpoint of output_dir, verified against its manifest on the main rank and agreed by all
        ranks (each newer damaged one is passed over with a one-line warning), unless `--overwrite_output_dir`
        (then output_dir's earlier checkpoints and logs are deleted). A checkpoint whose run had another data
        order or schedule is a `ResumeConflict` naming the flags. Decided once per run (verification reads
        every file)."""
        if not hasattr(self, "_resume_choice"):
            self._resume_choice = self._choose_resume()
        return self._resume_choice

    def _choose_resume(self) -> Path | None:
        args = self.args
        if args.overwrite_output_dir:
            if args.resume_from_checkpoint:
                raise ResumeConflict("--overwrite_output_dir True starts afresh and --resume_from_checkpoint continues "
                                     "a checkpoint: pass one of them (to start from a checkpoint's weights, pass it "
                                     "as --model_name_or_path)")  # fmt: skip
            if self.dp.is_main:
                clear_previous_run(self.output_dir)
            return None
        if args.resume_from_checkpoint:
            path = Path(args.resume_from_checkpoint)
            if self.dp.is_main and (problem := checkpoint_problem(path)):
                raise CheckpointError(f"--resume_from_checkpoint {path}: cannot resume, {problem}")
        else:
            path = self._agreed_intact_checkpoint()
        if path is not None:
            current = {**run_args(args, world_size=self.dp.world_size), **(self.run_record or {})}
            conflicts = resume_conflicts(path, current, self.total_steps, len(self.loader.dataset))
            if conflicts:
                raise ResumeConflict(conflict_message(self.output_dir, path, conflicts))
        return path

    def _agreed_intact_checkpoint(self) -> Path | None:
        chosen = self._newest_intact_checkpoint() if self.dp.is_main else None
        step = checkpoint_step(chosen) if chosen is not None else -1
        if self.dp.world_size > 1:
            from mindspore import Tensor

            (agreed,) = self.dp.all_reduce_sum([Tensor(np.asarray([step + 1 if self.dp.is_main else 0], np.float32))])
            step = int(agreed.asnumpy()[0]) - 1
        return self.output_dir / f"{CHECKPOINT_PREFIX}{step}" if step >= 0 else None

    def _newest_intact_checkpoint(self) -> Path | None:
        for path in reversed(checkpoint_folders(self.output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            print(f"[train] warning: skipping {path}: {problem}; falling back to the previous checkpoint", flush=True)
        return None

    def finished_checkpoint(self) -> Path | None:
        """The checkpoint a rerun would resume when it already holds every step: nothing is left to train."""
        if self.args.dry_run or (self.args.save_strategy == "no" and not self.args.resume_from_checkpoint):
            return None
        path = self._find_resume()
        return path if path is not None and read_trainer_state(path).global_step >= self.total_steps else None

    # ----- evaluation --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Token-mean loss and perplexity over the whole eval set (split across ranks, summed)."""
        import mindspore as ms
        from mindspore import Tensor

        if self._eval_fn is None:
            model = self.model

            def forward(*inputs):
                return model(*inputs)

            self._eval_fn = ms.jit(forward)
        data, world, bs = self.eval_dataset, self.dp.world_size, self.args.per_device_eval_batch_size
        mine = list(range(self.dp.rank, len(data), world))
        n_batches = math.ceil(math.ceil(len(data) / world) / bs)
        self.model.set_train(False)
        loss_sum, tokens = 0.0, 0.0
        for b in range(n_batches):
            samples = [data[i] for i in mine[b * bs : (b + 1) * bs]] or [null_sample()]
            (batch,) = align_vision(self.dp, self.model, [self.collate(samples)])
            inputs = self.model.prepare_inputs(batch)
            loss, count = self._eval_fn(*self.step_fn.positional(inputs))
            loss_sum, tokens = loss_sum + float(loss), tokens + float(count)
        self.model.set_train(True)
        total_loss, total_tokens = (float(t) for t in self.dp.all_reduce_sum([Tensor(loss_sum), Tensor(tokens)]))
        mean = total_loss / max(total_tokens, 1.0)
        return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 80.0)), "eval_tokens": int(total_tokens)}

    def _eval_due(self, epoch_done: bool) -> bool:
        strategy = self.args.eval_strategy
        if self.eval_dataset is None or strategy == "no":
            return False
        if strategy == "epoch":
            return epoch_done
        every = _interval(self.args.eval_steps or self.args.logging_steps, self.total_steps)
        return self.state.global_step % every == 0

    # ----- the loop ----------------------------------------------------------------------------
    def _bad_samples(self, errors: list[SampleError], logger: TrainLogger) -> None:
        for error in errors:
            if not self.args.skip_bad_samples:
                raise error
            key = str(error)
            if key not in self.state.bad_samples:
                self.state.bad_samples.append(key)
                logger.message(f"[train] skipped bad sample: {key}")

    def _step_flops(self, inputs: list[dict]) -> float:
        """Model FLOPs of this rank's micro-batches (`qwenvl.train.flops`); 0 for a model it cannot describe."""
        if self._costs is None:
            return 0.0
        return sum(step_flops(self._costs, *batch_workload(self.model, batch)) for batch in inputs)

    def _report_graphs(self, logger: TrainLogger) -> None:
        """One line per newly compiled train-step graph, and the warning when new shapes keep arriving."""
        tracker = self.step_fn.graphs
        new = tracker.take_new()
        for graph in new:
            logger.message(f"[train] compiled train-step graph {graph.index} (first call {graph.first_call_s:.1f} s): "
                           f"{graph.summary}")  # fmt: skip
        warning = tracker.warning(self.state.global_step, self.total_steps, bool(new))
        if warning:
            logger.message(f"[train] warning: {warning}")

    def _log_record(self, metrics: list[StepMetrics], seconds: list[float], tokens: int, flops: float) -> dict:
        step = self.state.global_step
        good = [m for m in metrics if not m.skipped]
        loss = float(np.mean([m.loss for m in good])) if good else float("nan")
        factor = self.lr_factor(step - 1)
        achieved = flops / max(sum(seconds), 1e-9)
        return {
            "step": step,
            "epoch": round(step / self.loader.steps_per_epoch, 4),
            "loss": loss,
            "grad_norm": float(metrics[-1].grad_norm),
            "lr": {g.name: g.lr * factor for g in self.groups},
            "tokens_per_s": tokens / max(sum(seconds), 1e-9),
            "step_time_s": float(np.mean(seconds)),
            "tflops": achieved / 1e12 if self._costs is not None else None,  # model FLOP/s of the main rank's device
            "mfu": achieved / self._peak if self._peak and self._costs is not None else None,
            "graphs": self.step_fn.graphs.graphs,
            "compile_s": self.step_fn.graphs.compile_seconds,
            "skipped_steps": self.state.skipped_steps,
            "memory": memory_stats(),
        }

    def _agreed_stop(self) -> int | None:
        """The stop signal if any rank received one (one all-reduce, so every rank stops at the same step)."""
        self.stop.reassert()
        local = self.stop.received
        if self.dp.world_size == 1:
            return local
        from mindspore import Tensor

        flags = np.asarray([local == signal.SIGTERM, local == signal.SIGINT], np.float32)
        term, interrupt = self.dp.all_reduce_sum([Tensor(flags)])[0].asnumpy()
        return signal.SIGTERM if term > 0 else signal.SIGINT if interrupt > 0 else None

    def _announce_stop(self, signum: int, saved: Path | None) -> None:
        """One line on the main rank, then a barrier: no rank exits (and gets the job killed) before it is out."""
        if self.dp.is_main:
            written = f"checkpoint {saved} written" if saved else "no checkpoint written"
            print(f"[train] stopped by {signal.Signals(signum).name} after step {self.state.global_step} of "
                  f"{self.total_steps}; {written}; run the same command again to resume", flush=True)  # fmt: skip
        self._barrier()

    def train(self) -> TrainSummary:
        """Train to the end, or to the step boundary after a SIGTERM/SIGINT (then with a checkpoint)."""
        with self.stop.deferred():
            return self._train()

    def _train(self) -> TrainSummary:
        args = self.args
        saving = args.save_strategy != "no" and not args.dry_run
        if self.dp.is_main:
            remove_partial_checkpoints(self.output_dir)
        resumed = self._find_resume() if saving or args.resume_from_checkpoint else None
        if resumed is not None:
            self.resume(resumed)
        logger = TrainLogger(
            self.output_dir,
            self.total_steps,
            self.state.global_step,
            enabled=self.dp.is_main,
            tensorboard=args.report_to == "tensorboard",
            progress=self.progress,
        )
        if resumed is not None:
            logger.message(f"[train] resumed from {resumed} at step {self.state.global_step}")
        logger.message(f"[train] MFU against {self._peak_source}" if self._peak else
                       f"[train] MFU not logged: {self._peak_source}")  # fmt: skip
        log_every = _interval(args.logging_steps, self.total_steps)
        save_every = _interval(args.save_steps, self.total_steps)
        window: list[StepMetrics] = []
        window_seconds: list[float] = []
        window_tokens, window_flops = 0, 0.0
        all_losses: list[float] = []
        step_seconds: list[float] = []
        last_saved: Path | None = None
        start_step, saved_step, stopped = self.state.global_step, -1, None
        steps = self.loader.iterate(self.state.data.epoch, self.state.data.step_in_epoch)
        try:
            while self.state.global_step < self.total_steps:
                if (stopped := self._agreed_stop()) is not None:
                    break
                loaded = next(steps)
                self._bad_samples(loaded.bad, logger)
                start = time.perf_counter()
                batches = align_vision(self.dp, self.model, loaded.micro_batches,
                                       self.step_fn.reduces_vision_per_micro_batch)  # fmt: skip
                inputs = [self.model.prepare_inputs(batch) for batch in batches]
                metrics = self.step_fn.run(inputs, self.lr_factor(self.state.global_step))
                self.stop.reassert()  # a compiled step left MindSpore's SIGINT handler in place
                elapsed = time.perf_counter() - start
                window_flops += self._step_flops(inputs)
                self.state.global_step += 1
                self.state.skipped_steps = self.step_fn.skipped_steps
                self.state.tokens_seen += metrics.n_tokens
                next_step = loaded.step_in_epoch + 1
                epoch_done = next_step >= self.loader.steps_per_epoch
                self.state.data = self._position(loaded.epoch + epoch_done, 0 if epoch_done else next_step)
                self.state.epoch = self.state.global_step / self.loader.steps_per_epoch
                if metrics.skipped:
                    logger.message(f"[train] step {self.state.global_step} skipped: {metrics.skip_reason}")
                else:
                    all_losses.append(metrics.loss)
                step_seconds.append(elapsed)
                window.append(metrics)
                window_seconds.append(elapsed)
                window_tokens += loaded.n_input_tokens
                self._report_graphs(logger)
                logger.advance(1, metrics.loss)
                if self.state.global_step % log_every == 0 or self.state.global_step == self.total_steps:
                    record = self._log_record(window, window_seconds, window_tokens * self.dp.world_size, window_flops)
                    self.state.log_history.append({k: v for k, v in record.items() if k != "memory"})
                    logger.log(record)
                    window, window_seconds, window_tokens, window_flops = [], [], 0, 0.0
                if self._eval_due(epoch_done):
                    record = {"step": self.state.global_step, **self.evaluate()}
                    self.state.log_history.append(record)
                    logger.log(record)
                    logger.message(f"[eval] step {record['step']}: loss {record['eval_loss']:.4f}, "
                                   f"perplexity {record['eval_perplexity']:.2f}")  # fmt: skip
                due = args.save_strategy == "steps" and self.state.global_step % save_every == 0
                due = due or (args.save_strategy == "epoch" and epoch_done)
                if saving and (due or self.state.global_step == self.total_steps):
                    last_saved, saved_step = self.save_checkpoint(), self.state.global_step
            if stopped is not None and saving and self.state.global_step not in (start_step, saved_step):
                last_saved = self.save_checkpoint()
        finally:
            steps.close()
            logger.close()
        if stopped is not None:
            self._announce_stop(stopped, last_saved)
        graphs = self.step_fn.graphs
        if self.dp.is_main:
            print(f"[train] {graphs.graphs} train-step graph(s) compiled, {graphs.compile_seconds:.1f} s compiling",
                  flush=True)  # fmt: skip
        if args.dry_run and self.dp.is_main:
            print(f"[dry_run] {len(step_seconds)} steps, mean step {np.mean(step_seconds[1:] or step_seconds):.3f} s "
                  f"(first, with compilation, {step_seconds[0] if step_seconds else float('nan'):.3f} s), "
                  f"memory {json.dumps(memory_stats())}")  # fmt: skip
        return TrainSummary(
            steps=self.state.global_step,
            first_loss=all_losses[0] if all_losses else float("nan"),
            last_loss=all_losses[-1] if all_losses else float("nan"),
            mean_step_seconds=float(np.mean(step_seconds)) if step_seconds else 0.0,
            tokens=self.state.tokens_seen,
            skipped_steps=self.state.skipped_steps,
            bad_samples=list(self.state.bad_samples),
            last_checkpoint=str(last_saved) if last_saved else None,
            resumed_from=str(resumed) if resumed else None,
            stopped_by=signal.Signals(stopped).name if stopped is not None else None,
            graphs=graphs.graphs,
            compile_seconds=graphs.compile_seconds,
        )
