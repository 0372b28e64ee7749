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


class RunInterrupted(KeyboardInterrupt):
    """A stop signal arrived where the run could not stop cleanly (before its first step, or twice)."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f" {detail}" if detail else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The stop signal received so far (``signum``, None when none); ``deferring`` while the loop runs."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def handle(self, signum: int, frame=None) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if not self.deferring:
            raise RunInterrupted(signum, "before the first step: nothing to save")
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


__all__ = ["RunInterrupted", "StopRequest", "stop_on_signals"]
