"""Make ``accelerate launch --cpu --num_processes N`` start N processes.

Accelerate's launcher runs several CPU processes only through ``mpirun``; without it, it starts
one process (setting ``MASTER_ADDR`` but no ``WORLD_SIZE``) and that process trains alone. We
detect that case, read ``--num_processes`` from the launcher's command line, and run the script
on that many processes under torch's elastic launcher (``torch.distributed.run``, gloo over
loopback), in this process, with the same arguments.

Errors of the processes: a worker that stops on a user error writes its one-line message to
elastic's error file (``TORCHELASTIC_ERROR_FILE``, which the agent sets for each worker) and
exits 2. Our launcher tells its workers to print nothing (:data:`LAUNCHER_REPORTS_ERRORS`) and
prints the first such line itself, once, then exits with that worker's status: no agent log lines,
no ``ChildFailedError`` summary or traceback. A worker that crashed prints its own traceback and the
launcher adds elastic's summary (which rank, which exit code). Under a foreign launcher (torchrun)
rank 0 prints the line and the other ranks stay silent; torchrun's summary names it as the root cause.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .interrupt import exit_code
from .lock import RANK_VARIABLES

logger = logging.getLogger(__name__)

# Set by our launcher for its workers: it prints their user errors itself, once.
LAUNCHER_REPORTS_ERRORS = "HF_KOLEO_LAUNCHER_REPORTS_ERRORS"


def requested_cpu_processes(environment: dict[str, str], launcher_argv: list[str]) -> int:
    """Processes asked of ``accelerate launch --cpu`` that were not started (1 if none)."""
    started_by_accelerate_cpu = environment.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    already_distributed = any(key in environment for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not started_by_accelerate_cpu or already_distributed or "MASTER_ADDR" not in environment:
        return 1
    for flag in ("--num_processes", "--num-processes"):
        if flag in launcher_argv:
            index = launcher_argv.index(flag)
            if index + 1 < len(launcher_argv) and launcher_argv[index + 1].isdigit():
                return int(launcher_argv[index + 1])
        for token in launcher_argv:
            if token.startswith(f"{flag}="):
                return int(token.split("=", 1)[1])
    return 1


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def relaunch_as_cpu_processes(script: str, argv: list[str]) -> None:
    """Run ``script`` on N CPU processes and exit with their status when accelerate asked for N > 1 of them."""
    n_processes = requested_cpu_processes(dict(os.environ), _parent_argv())
    if n_processes <= 1:
        return
    sys.stdout.flush()
    raise SystemExit(run_cpu_processes(script, argv, n_processes, os.environ.get("MASTER_PORT", "29500")))


def run_cpu_processes(script: str, argv: list[str], n_processes: int, port: str = "29500") -> int:
    """``torch.distributed.run --nproc_per_node n_processes script *argv`` in this process; its exit status.

    Rank 0 writes to this console; the other ranks' output goes to log files in a temporary folder
    (removed at the end). A worker's user error is printed once (its one line) and its exit status
    returned; any other failure prints the failed rank's traceback if the console did not show it,
    then elastic's summary, and returns the first failed worker's status (128 + signal for a
    signal). A signal to this launcher stops the workers and returns 128 + signal.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    command = ["--nproc_per_node", str(n_processes), "--master_addr", "127.0.0.1", "--master_port", port]
    quiet_ranks = ",".join(f"{rank}:3" for rank in range(1, n_processes))  # 3: stdout and stderr to files
    log_dir = Path(tempfile.mkdtemp(prefix="hf_koleo_ranks_"))
    arguments = parse_args([*command, "--log-dir", str(log_dir), "--redirects", quiet_ranks, script, *argv])
    os.environ[LAUNCHER_REPORTS_ERRORS] = "1"  # the workers inherit it
    try:
        with _quiet_elastic_agent():
            run(arguments)
    except ChildFailedError as error:
        return report_child_failure(error, log_dir)
    except SignalException as error:  # the agent stopped the workers before re-raising
        return exit_code(error.sigval)
    finally:
        os.environ.pop(LAUNCHER_REPORTS_ERRORS, None)
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def report_child_failure(error, log_dir: Path | None = None) -> int:
    """Print a ``ChildFailedError`` as described in the module docstring; the exit status to leave with.

    Args:
        error: the elastic agent's ``ChildFailedError``.
        log_dir: the agent's log folder, where ranks other than 0 wrote their output.
    """
    recorded = [  # workers that exited, before those killed after recording; then the first to fail
        (failure.exitcode <= 0, failure.timestamp, rank, line, failure.exitcode)
        for rank, failure in error.failures.items()
        if (line := _recorded_line(failure.message)) is not None
    ]
    if recorded:
        *_, line, exitcode = min(recorded)
        print(line, file=sys.stderr, flush=True)
        return exitcode if exitcode > 0 else 1
    _, failure = error.get_first_failure()
    if failure.local_rank != 0 and log_dir is not None:
        for log in sorted(log_dir.glob(f"*/attempt_*/{failure.local_rank}/stderr.log")):
            print(_last_traceback(log.read_text(errors="replace")), file=sys.stderr)
    print(error, file=sys.stderr, flush=True)
    return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode


def _last_traceback(text: str, max_lines: int = 200) -> str:
    """The end of a log from its last traceback on (at most ``max_lines`` lines)."""
    lines = text.rstrip().splitlines()
    starts = [index for index, line in enumerate(lines) if "Traceback (most recent call last)" in line]
    return "\n".join(lines[starts[-1] if starts else 0 :][-max_lines:])


def _recorded_line(message) -> str | None:
    """The line a worker recorded in its error file (elastic's format), or None if it recorded none."""
    if isinstance(message, dict) and isinstance(message.get("message"), str):
        return message["message"]
    return None


@contextmanager
def _quiet_elastic_agent() -> Iterator[None]:
    """Drop the agent's log lines below CRITICAL (which worker failed, which got SIGTERM): the report says it.

    The agent is all this process runs meanwhile, so logging is turned down process-wide.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def worker_rank(environment: dict[str, str] | None = None) -> int:
    """This process's global rank as the launcher set it (0 when not launched as several processes)."""
    environment = os.environ if environment is None else environment
    for name in RANK_VARIABLES:
        if environment.get(name, "").isdigit():
            return int(environment[name])
    return 0


def record_worker_error(line: str) -> None:
    """Write ``line`` as this worker's error in elastic's error file, when its agent set one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    extra = {"py_callstack": line, "timestamp": str(int(time.time()))}
    try:
        Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": extra}}))
    except OSError as error:  # the launcher then reports the exit status alone
        logger.warning("cannot record the error for the launcher in %s: %s", path, error)


def should_print_user_error() -> bool:
    """Whether this process prints its user error: not when our launcher reports it, else rank 0 only.

    The launcher's variable counts only in its workers (``WORLD_SIZE`` > 1): a single process that
    inherited it (a script run from inside a worker, say) prints its own error.
    """
    in_launcher_worker = int(os.environ.get("WORLD_SIZE", "1")) > 1
    launcher_reports = os.environ.get(LAUNCHER_REPORTS_ERRORS) == "1" and in_launcher_worker
    return not launcher_reports and worker_rank() == 0


def needs_cpu_backend() -> bool:
    """Several processes but no accelerator: Accelerate must be told to use CPU (gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1 and not torch.accelerator.is_available()
