"""One run per ``output_dir``: a lock file holding the owner's pid and host.

The main process creates ``output_dir/.lock`` with ``O_CREAT | O_EXCL`` (atomic: of two runs
started together exactly one succeeds) and removes it when the run ends, also on an exception.
A lock left by a process that died without removing it (same host, pid no longer alive) is taken
over with a warning; a lock from another host cannot be checked and is never taken over.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from accelerate.utils import get_int_from_env

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# The variables Accelerate reads for the global rank (torchrun, then MPI launchers).
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
Function = TypeVar("Function", bound=Callable[..., Any])


class OutputDirLockedError(RuntimeError):
    """Another run holds the ``output_dir``."""


def _this_owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The lock's owner, or None when the file is gone, empty or not ours to parse."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _is_stale(owner: dict[str, Any]) -> bool:
    return owner.get("host") == socket.gethostname() and not _is_alive(owner["pid"])


def _try_create(path: Path) -> bool:
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(_this_owner(), handle)
    except BaseException:  # a lock without an owner would block every later run
        path.unlink(missing_ok=True)
        raise
    return True


def _take_over(path: Path, stale: dict[str, Any]) -> None:
    """Move a stale lock aside; put it back if another run replaced it in the meantime."""
    aside = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:  # another run moved it first
        return
    moved = _read_owner(aside)
    if moved is not None and (moved.get("pid"), moved.get("host")) != (stale["pid"], stale["host"]):
        os.rename(aside, path)  # a live run's fresh lock, not the stale one we saw
        return
    aside.unlink(missing_ok=True)
    logger.warning(
        "took over the lock %s of process %d on %s (started %s), which is no longer running",
        path,
        stale["pid"],
        stale["host"],
        stale.get("started", "?"),
    )


def acquire(output_dir: str | os.PathLike) -> Path:
    """Create ``output_dir/.lock`` for this process; raise ``OutputDirLockedError`` if another run holds it."""
    path = Path(output_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a stale lock taken over by a concurrent run is seen again on the next try
        if _try_create(path):
            return path
        owner = _read_owner(path)
        if owner is not None and _is_stale(owner):
            _take_over(path, owner)
            continue
        if owner is None and not path.exists():  # released between our create and read
            continue
        break
    who = "an unknown run" if owner is None else f"pid {owner['pid']} on {owner.get('host', '?')}"
    raise OutputDirLockedError(
        f"output_dir {Path(output_dir)} is in use by {who} (lock file {path}); wait for that run, choose "
        f"another --output_dir, or delete {path} if no run uses it"
    )


def release(path: Path) -> None:
    """Remove the lock if this process still owns it."""
    owner = _read_owner(path)
    if owner is not None and (owner["pid"], owner.get("host")) == (os.getpid(), socket.gethostname()):
        path.unlink(missing_ok=True)


@contextmanager
def output_dir_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[Path | None]:
    """Hold ``output_dir``'s lock for the block (``enabled=False``: a non-main process, holds nothing)."""
    path = acquire(output_dir) if enabled else None
    try:
        yield path
    finally:
        if path is not None:
            release(path)


def locks_output_dir(function: Function) -> Function:
    """Run ``function(arguments, ...)`` with ``arguments.output_dir`` locked by the main process.

    The rank comes from the launcher's environment, so the lock is held before the Accelerator
    exists and a refused run stops before any other work.
    """

    @functools.wraps(function)
    def locked(arguments, *args, **kwargs):
        with output_dir_lock(arguments.output_dir, enabled=get_int_from_env(RANK_VARIABLES, 0) == 0):
            return function(arguments, *args, **kwargs)

    return locked  # type: ignore[return-value]
