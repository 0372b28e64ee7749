"""Make ``accelerate launch --cpu --num_processes N`` start N processes.

Accelerate's launcher runs several CPU processes only through ``mpirun``; without it, it starts
one process (setting ``MASTER_ADDR`` but no ``WORLD_SIZE``) and that process trains alone. We
detect that case, read ``--num_processes`` from the launcher's command line, and re-execute
the script under ``torch.distributed.run`` (gloo over loopback) with the same arguments.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


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
    """Replace this process with ``torch.distributed.run`` when accelerate asked for N > 1 CPU processes."""
    n_processes = requested_cpu_processes(dict(os.environ), _parent_argv())
    if n_processes <= 1:
        return
    port = os.environ.get("MASTER_PORT", "29500")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n_processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        port,
        script,
        *argv,
    ]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def needs_cpu_backend() -> bool:
    """Several processes but no accelerator: Accelerate must be told to use CPU (gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1 and not torch.accelerator.is_available()
