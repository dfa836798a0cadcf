"""SIGTERM and SIGINT: finish the step, write a checkpoint, exit with 128 + the signal number (143, 130).

Cluster schedulers send SIGTERM some time before SIGKILL, users press Ctrl-C (SIGINT). While training
or writing the final model (`deferred()`), the first signal only records itself: the trainer looks at
it at each step boundary (all ranks agree through one all-reduce), writes a checkpoint and returns, and
a save in progress always finishes. The first signal also gives both signals their default action back,
so a second one ends the process at once, even in the middle of a compiled step (the kernel acts, no
Python code has to run). Outside `deferred()` (loading data and model: nothing to save yet) a signal
exits at once with the same code. No signal is ever ignored.

MindSpore's runtime replaces the process's SIGINT handler when it runs a graph with one that sends the
process SIGTERM; a Ctrl-C landing there therefore arrives here as SIGTERM (same graceful stop, code 143),
and `reassert()` puts our SIGINT handler back at every step boundary.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal."""
    return 128 + signum


class StopSignals:
    """Records the first SIGTERM/SIGINT; `install()` from the main thread, `uninstall()` when done."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = 0
        self._previous: dict[int, object] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "StopSignals":
        """Take over SIGTERM and SIGINT (only possible from the main thread; elsewhere nothing changes)."""
        if threading.current_thread() is threading.main_thread() and not self.installed:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler set outside Python, which cannot be put back from here
                signal.signal(signum, previous)
        self._previous.clear()

    def reassert(self) -> None:
        """Put our handlers back (MindSpore's runtime replaces the SIGINT one), unless a signal already came."""
        if self.installed and self.received is None:
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._handle)

    @contextmanager
    def deferred(self) -> Iterator["StopSignals"]:
        """Inside, the first signal is recorded for the caller to act on at a safe point."""
        self._deferring += 1
        try:
            yield self
        finally:
            self._deferring -= 1

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self._deferring:
            os.write(2, f"[train] {name} received before training started: exiting\n".encode())
            raise SystemExit(exit_code(signum))
        self.received = signum
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_DFL)
        os.write(2, f"[train] {name} received: stopping at the end of this step with a checkpoint "
                    f"(send it again to exit at once)\n".encode())  # fmt: skip
