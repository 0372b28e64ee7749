"""Run an experiment's pending runs, in plan order, within a time budget.

A run kind is a function ``kind(params, context) -> result`` (see :mod:`experiments.registry`):
it gets the run's parameters and a :class:`RunContext` (its own work folder, the seconds left in
the budget) and returns a JSON-able result, which becomes the run's record. A kind that cannot
finish within ``context.seconds_left`` stops with a checkpoint in its work folder and raises
:class:`Unfinished`; the next ``run`` resumes it. Any other exception becomes a *failed* record
(the error in one line), not a crash: the runs after it still run.

``fresh_process``: each run in a new Python process (``python -m experiments run SPEC --only
NAME``), for measurements of peak memory or anything a previous run's state could bias; a child
that dies without a record (killed, out of memory) is recorded as failed with its exit status.
"""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .registry import run_kind
from .spec import RunSpec, Spec
from .store import Store

logger = logging.getLogger(__name__)


class Unfinished(Exception):
    """The run used its budget and left a checkpoint; the next ``run`` resumes it."""


@dataclass
class RunContext:
    """What a run kind gets besides its parameters."""

    run: RunSpec
    work_dir: Path  # this run's own folder (checkpoints, caches): never committed
    seconds_left: float  # of the budget, minus the run's reserve


@dataclass
class Outcome:
    """What one ``run`` call did: runs finished, failed, cut by the budget, and those still pending."""

    finished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: str | None = None
    pending: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_pending(
    spec: Spec,
    store: Store,
    work_dir: str | Path,
    budget_seconds: float = float("inf"),
    fresh_process: bool | None = None,
    retry_failed: bool = False,
    only: list[str] | None = None,
) -> Outcome:
    """Run the spec's pending runs (``only``: those named) in plan order until the budget is spent.

    A run starts only with more than its ``reserve_seconds`` left; a stale record is reported and
    left alone (delete it to rerun); a failed one is retried only with ``retry_failed``.
    ``fresh_process`` None: the spec's ``fresh_process`` setting (default false).
    """
    if fresh_process is None:
        fresh_process = bool(spec.settings.get("fresh_process", False))
    unknown = sorted(set(only or ()) - {run.name for run in spec.runs})
    if unknown:  # a typo would otherwise run nothing and say nothing
        raise ValueError(f"{spec.path}: --only names no run of this spec: {unknown} (`plan` lists the runs)")
    deadline = time.perf_counter() + budget_seconds
    outcome = Outcome()
    for run in spec.runs:
        if only and run.name not in only:
            continue
        status = store.status(run)
        if status == "stale":
            logger.warning("%s: its record was made with other parameters; delete it to run it again", run.name)
        if status in ("done", "stale") or (status == "failed" and not retry_failed):
            continue
        left = deadline - time.perf_counter() - run.reserve_seconds
        if outcome.interrupted or left <= 0:
            outcome.pending.append(run.name)
            continue
        if fresh_process:
            finished = _run_in_child(spec, store, work_dir, run, left)
        else:
            finished = _run_here(spec, store, work_dir, run, left)
        if finished is None:
            outcome.interrupted = run.name
            outcome.pending.append(run.name)
        else:
            (outcome.finished if finished else outcome.failed).append(run.name)
    return outcome


def _run_here(spec: Spec, store: Store, work_dir: str | Path, run: RunSpec, left: float) -> bool | None:
    """Run in this process: True (done), False (failed, recorded), None (cut by the budget)."""
    context = RunContext(run, Path(work_dir) / run.name, left)
    started = time.perf_counter()
    logger.info("%s: starting (%s, %.0f s left)", run.name, run.kind, left)
    try:
        result = run_kind(run.kind)(run.params, context)
    except Unfinished as stopped:
        logger.info("%s: %s; the next run resumes it", run.name, stopped)
        return None
    except Exception as error:  # a run's failure is a result to report, not the end of the others
        logger.exception("%s: failed", run.name)
        store.write(run, None, time.perf_counter() - started, error=_one_line(error))
        return False
    finally:
        gc.collect()  # a run's model and batches, held in reference cycles, free their memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    store.write(run, result, time.perf_counter() - started)
    logger.info("%s: done in %.1f s", run.name, time.perf_counter() - started)
    return True


def _run_in_child(spec: Spec, store: Store, work_dir: str | Path, run: RunSpec, left: float) -> bool | None:
    """Run in a fresh ``python -m experiments run`` process; a child that leaves no record failed."""
    command = [sys.executable, "-m", "experiments", "run", str(spec.path), "--only", run.name]
    command += ["--records", str(store.folder), "--work_dir", str(work_dir), "--budget_seconds", f"{left:.0f}"]
    command += ["--threads", str(torch.get_num_threads())]  # the parent's --threads
    command += ["--retry_failed", "--in_process"] + (["--quick"] if spec.quick else [])
    started = time.perf_counter()
    before = store.read(run.name)
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path.cwd())
    record = store.read(run.name)
    if record is not None and record != before and record.get("digest") == run.digest:
        return record.get("status") == "done"
    if result.returncode == 0:
        return None  # no new record, no error: the budget cut it
    tail = " ".join(result.stderr.strip().splitlines()[-3:])[-400:]
    store.write(run, None, time.perf_counter() - started, error=f"exit status {result.returncode}: {tail}")
    return False


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"


__all__ = ["Outcome", "RunContext", "Unfinished", "run_pending"]
