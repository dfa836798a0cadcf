"""SIGTERM/SIGINT handling: the first signal is recorded while deferred, the second ends the process at once,
outside a deferred block a signal exits at once with 128 + its number, and MindSpore's own SIGINT handler
never swallows a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from qwenvl.train.graceful_stop import StopSignals, exit_code

ROOT = Path(__file__).resolve().parents[1]


def _child(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python from a file (MindSpore compiles only functions defined in files)."""
    program = tmp_path / "child.py"
    program.write_text("import os, signal, sys, time\nfrom qwenvl.train.graceful_stop import StopSignals\n" + textwrap.dedent(code))
    return subprocess.run([sys.executable, str(program)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "GLOG_v": "3"},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_first_signal_is_recorded_and_handlers_come_back_after():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = StopSignals().install()
    try:
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received == signal.SIGTERM
            # the default action is back for both: a second signal would end the process
            assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL == signal.getsignal(signal.SIGTERM)
    finally:
        stop.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130


def test_reassert_takes_back_a_replaced_handler_until_a_signal_came():
    stop = StopSignals().install()
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # what MindSpore's runtime does to SIGINT
        stop.reassert()
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        stop.reassert()  # after a signal the default actions stay
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    finally:
        stop.uninstall()


def test_install_outside_the_main_thread_changes_nothing():
    before = signal.getsignal(signal.SIGTERM)
    stops: list[StopSignals] = []
    thread = threading.Thread(target=lambda: stops.append(StopSignals().install()))
    thread.start()
    thread.join()
    assert not stops[0].installed and signal.getsignal(signal.SIGTERM) == before


def test_a_second_signal_ends_the_process_at_once(tmp_path):
    result = _child(tmp_path, """
        stop = StopSignals().install()
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            print("first recorded", stop.received == signal.SIGINT, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("still alive", flush=True)
    """)
    assert result.returncode == -signal.SIGINT
    assert result.stdout == "first recorded True\n"
    assert result.stderr.strip() == ("[train] SIGINT received: stopping at the end of this step with a checkpoint "
                                     "(send it again to exit at once)")  # fmt: skip


def test_outside_training_a_signal_exits_at_once_with_one_line(tmp_path):
    result = _child(tmp_path, """
        StopSignals().install()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still alive")
    """)
    assert result.returncode == 143 and result.stdout == ""
    assert result.stderr == "[train] SIGTERM received before training started: exiting\n"


@pytest.mark.slow
def test_mindspores_sigint_handler_never_swallows_a_signal(tmp_path):
    """After a compiled graph ran, MindSpore's runtime owns SIGINT and turns it into SIGTERM: still a graceful stop.
    With our handler reasserted, SIGINT is SIGINT again."""
    result = _child(tmp_path, """
        import mindspore as ms
        from mindspore import Tensor
        ms.set_device("CPU")
        ms.set_context(mode=ms.GRAPH_MODE)

        @ms.jit
        def double(x):
            return x * 2

        for reassert in (False, True):
            stop = StopSignals().install()
            with stop.deferred():
                double(Tensor([1.0]))
                if reassert:
                    stop.reassert()
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
                print(signal.Signals(stop.received).name, flush=True)
            stop.uninstall()
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["SIGTERM", "SIGINT"]
