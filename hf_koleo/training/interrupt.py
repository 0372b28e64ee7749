"""SIGTERM and SIGINT during pretraining: finish the step, save a checkpoint, leave with 128 + signal.

A cluster scheduler sends SIGTERM before it preempts a job, a person presses Ctrl-C (SIGINT).
While the loop runs, the first of either only raises a flag: the loop stops at the next step
boundary (with several processes, at the next ``log_every`` step, where they already agree on
the loss), saves a checkpoint, and the script exits with 130 (SIGINT) or 143 (SIGTERM) after one
line; ``--resume latest`` goes on from there. A second Ctrl-C stops at once. Before the loop
(set-up, decoding) there is nothing to save: a signal ends the run straight away, as
:class:`RunInterrupted`, and the output folder's lock is released either way.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


BEFORE_THE_LOOP = "before the first step: nothing to save"
AFTER_THE_LOOP = "after the last step, while exporting: --resume latest exports from the final checkpoint"


def exit_code(signum: int) -> int:
    """A process's exit status when a signal stopped it: 128 + the signal's number (shells' convention)."""
    return 128 + int(signum)


class RunInterrupted(KeyboardInterrupt):
    """A stop signal arrived where the run could not stop cleanly (outside the loop, or twice)."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f" {detail}" if detail else ""))

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class StopRequest:
    """The stop signal received so far (``signum``, None when none); ``deferring`` while the loop runs.

    ``outside`` says where the run is when it is not deferring (the message of the
    :class:`RunInterrupted` raised there).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False
        self.outside = BEFORE_THE_LOOP

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def handle(self, signum: int, frame=None) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if not self.deferring:
            raise RunInterrupted(signum, self.outside)
        if not first and signum == signal.SIGINT:
            raise RunInterrupted(signum, "twice: stopped at once; --resume latest goes on from the last checkpoint")


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Route SIGINT and SIGTERM to a :class:`StopRequest` for the block; the old handlers come back after.

    Outside the main thread (signals can only be handled there) nothing is installed and the
    request never fires.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request.handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore SIGINT and SIGTERM.

    A scheduler's SIGTERM and a terminal's Ctrl-C reach the whole process group: the workers must
    go on delivering batches while the main process finishes its step and saves; it stops them
    when it leaves (and they stop by themselves if it dies).
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


__all__ = ["RunInterrupted", "StopRequest", "exit_code", "ignore_stop_signals", "stop_on_signals"]
