"""The records of an experiment: one small JSON per run, keyed by its name, checked by its digest.

A record holds the run's name, stage, kind, axis values, parameters and digest, and either its
``result`` (``status: done``) or its ``error`` (``status: failed``: the run raised; the error's
type and message, so a report can say so and the next ``run`` can retry it with ``--retry_failed``),
with where and when it ran (:func:`environment`: machine, torch, threads, device, load average) and
how long it took. Records are written whole or not at all (a kill mid-write leaves no half record).

A run's *status*: ``pending`` (no record), ``done``, ``failed``, or ``stale`` (a record made with
other parameters than the spec gives the run now: never overwritten silently; delete it to rerun).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .spec import RunSpec

PROGRAM = "python -m experiments"  # sys.argv[0] under the command line


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``) and the kernels ATen picked for it (AVX512, AVX2, ...):
    sessions land on different machines, and timings only compare within one."""
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()} kernels)"


def machine_description() -> str:
    """The machine in one line: CPU, cores, memory, torch and its threads, the accelerator if any."""
    memory = ""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        memory = f", {int(fields['MemTotal'].split()[0]) / 2**20:.0f} GiB"
    except (OSError, KeyError, ValueError):
        pass
    device = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores{memory}{device}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def cpu_model(description: str) -> str:
    """The CPU's short name in a :func:`machine_description` (``AMD EPYC`` from ``x86_64 AMD EPYC (AVX2
    kernels), 2 cores, ...``; ``?`` when there is none): a table's "which machine" column."""
    name = description.split(",")[0].split(" ", 1)[-1].split(" (")[0]
    return name.replace("(R)", "").replace(" Processor", "") or "?"


def device_name() -> str:
    """The accelerator this process runs on: the GPU's name, or ``CPU``."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages (what else ran on the machine beside the run)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def command_line() -> str:
    """The command this process runs, as a person would type it (``python -m experiments ...``)."""
    if sys.argv[0] == PROGRAM:
        return " ".join(sys.argv)
    return " ".join(["python", *sys.argv])


def environment() -> dict[str, Any]:
    """Where, how and under what load a run ran: recorded beside every result."""
    return {
        "command": command_line(),
        "machine": machine_description(),
        "device": device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
    }


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Written whole or not at all: a process killed mid-write leaves no half record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(staging, path)


class Store:
    """The records folder of an experiment."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def read(self, name: str) -> dict[str, Any] | None:
        path = self.path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def status(self, run: RunSpec) -> str:
        record = self.read(run.name)
        if record is None:
            return "pending"
        if record.get("digest") != run.digest:
            return "stale"
        return record.get("status", "done")

    def write(
        self, run: RunSpec, result: dict[str, Any] | None, seconds: float, error: str | None = None
    ) -> dict[str, Any]:
        """Record a finished run (``result``) or a failed one (``error``); returns the record."""
        record = {
            "name": run.name,
            "stage": run.stage,
            "kind": run.kind,
            "axes": run.axes,
            "digest": run.digest,
            "status": "failed" if error is not None else "done",
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": round(seconds, 3),
            "environment": environment(),
            "params": run.params,
        }
        if error is not None:
            record["error"] = error
        else:
            record["result"] = result
        write_json(self.path(run.name), record)
        return record

    def records(self, runs: list[RunSpec]) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The records a report may use, in plan order, and ``{name: why}`` for those it may not: a
        record of a run no longer in ``runs`` (the spec's plan) or made with other parameters is left out.
        """
        found = {path.stem: json.loads(path.read_text()) for path in sorted(self.folder.glob("*.json"))}
        kept, left_out = [], {}
        planned = {run.name: run for run in runs}
        for run in runs:
            record = found.get(run.name)
            if record is None:
                continue
            if record.get("digest") != run.digest:
                left_out[run.name] = "stale: made with other parameters than the spec gives it now"
            else:
                kept.append(record)
        for name in found:
            if name not in planned:
                left_out[name] = "not in the plan"
        return kept, left_out


__all__ = ["PROGRAM", "Store", "environment", "load_average", "machine_description", "write_json"]
