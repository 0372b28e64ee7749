"""Timers for the benchmarks: every clock read waits for the device first, so queued GPU work is counted."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function: Callable[[], Any], repeats: int = 1) -> float:
    """Seconds per call, the device waited for before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def alternate(
    calls: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each call in each of ``rounds`` rounds (``{name: [seconds]}``), the calls taking turns
    after ``warmup`` untimed rounds, so that a machine's drift weighs on all of them alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            seconds[name].append(timed(device, call))
    return seconds
