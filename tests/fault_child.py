"""Runs `train_qwen.main` with one fault injected at a precise moment, for tests/test_fault_injection.py.

`python tests/fault_child.py FAULT[@RANK] -- <train_qwen flags>`; the faults are monkeypatches of this
process only (product code has no test hooks), applied on every rank or only on rank RANK:

- `none`: train normally.
- `kill-in-write:S`: SIGKILL halfway through writing the optimizer file of checkpoint-S.
- `kill-in-rotation`: SIGKILL after rotation deleted one file of the folder it removes.
- `kill-in-final-save:N`: SIGKILL after N files of the final model were moved into the output folder.
- `signal-in-save:SIG:S:K`: send SIG (TERM or INT) to this process K times while checkpoint-S is written.
- `wait-at-step:S`: after step S, create `<output_dir>/ready-S` and sleep 5 s (the test signals meanwhile).
- `signal-at-step:SIG:S`: send SIG (TERM or INT) to this process after step S.
- `kill-at-step:S`: SIGKILL after step S.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def _at_step(action) -> None:
    """Run `action(global step)` after every optimizer step (the trainer advances its progress once per step)."""
    from qwenvl.train.train_log import TrainLogger

    init, advance = TrainLogger.__init__, TrainLogger.advance

    def recording_init(self, output_dir, total_steps, start_step=0, *args, **kwargs) -> None:
        init(self, output_dir, total_steps, start_step, *args, **kwargs)
        self.fault_step = start_step

    def counting_advance(self, steps: int = 1, loss=None) -> None:
        advance(self, steps, loss)
        self.fault_step += steps
        action(self.fault_step)

    TrainLogger.__init__, TrainLogger.advance = recording_init, counting_advance


def install(fault: str, output_dir: Path) -> None:
    kind, *params = fault.split(":")
    if kind == "none":
        return
    if kind == "kill-in-write":
        from qwenvl.model import checkpoint_io

        write_file, step = checkpoint_io._write_file, params[0]

        def half_then_die(target, *args, **kwargs):  # every safetensors file the trainer writes goes through it
            if target is not None and target.parent.name == f".tmp-checkpoint-{step}" and "optimizer" in target.name:
                write_file(target, *args, **kwargs)
                data = target.read_bytes()
                target.write_bytes(data[: len(data) // 2])
                _die()
            return write_file(target, *args, **kwargs)

        checkpoint_io._write_file = half_then_die
    elif kind == "kill-in-rotation":
        rmtree = shutil.rmtree

        def one_file_then_die(path, *args, **kwargs):
            if str(path).endswith(".deleting"):
                next(p for p in Path(path).iterdir() if p.is_file()).unlink()
                _die()
            return rmtree(path, *args, **kwargs)

        shutil.rmtree = one_file_then_die
    elif kind == "kill-in-final-save":
        replace, limit, moved = os.replace, int(params[0]), []

        def move_then_die(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if Path(src).parent.name == ".tmp-final-model":
                moved.append(dst)
                if len(moved) == limit:
                    _die()

        os.replace = move_then_die
    elif kind == "signal-in-save":
        from qwenvl.train import checkpoint

        name, step, times = params
        write_manifest = checkpoint.write_manifest

        def signalled(folder):
            if folder.name == f".tmp-checkpoint-{step}":
                for _ in range(int(times)):
                    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
                    time.sleep(0.2)
            return write_manifest(folder)

        checkpoint.write_manifest = signalled
    elif kind == "wait-at-step":

        def wait(step: int) -> None:
            if step == int(params[0]):
                (output_dir / f"ready-{step}").write_text("waiting")
                time.sleep(5)

        _at_step(wait)
    elif kind == "signal-at-step":
        name, at = params
        _at_step(lambda step: os.kill(os.getpid(), getattr(signal, f"SIG{name}")) if step == int(at) else None)
    elif kind == "kill-at-step":
        _at_step(lambda step: _die() if step == int(params[0]) else None)
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def main(argv: list[str]) -> int:
    fault, separator, *flags = argv
    assert separator == "--", "usage: fault_child.py FAULT[@RANK] -- <train_qwen flags>"
    fault, _, rank = fault.partition("@")
    output_dir = Path(flags[flags.index("--output_dir") + 1])
    if not rank:
        install(fault, output_dir)
    else:  # a rank is known once the process group is up: install then, on that rank only
        from qwenvl.parallel import world

        init = world.init_distributed

        def init_then_install():
            dp = init()
            if dp.rank == int(rank) and not getattr(init_then_install, "done", False):
                init_then_install.done = True
                install(fault, output_dir)
            return dp

        world.init_distributed = init_then_install
    from qwenvl.train.train_qwen import main as train_main

    return train_main(flags)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
