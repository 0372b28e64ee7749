"""Time and peak-memory measurements, each in a fresh process so peaks do not leak between runs."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .losses import koleo_proto_loss


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize() / 2**20


def _peak_resident_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def dense_koleo_proto_loss(prototypes: torch.Tensor) -> torch.Tensor:
    """The DINOv2-style formula with the full ``K x K`` distance matrix (the reference peer)."""
    unit = F.normalize(prototypes, p=2, dim=-1)
    distances = torch.cdist(unit, unit)
    distances = distances + torch.diag(distances.new_full((unit.shape[0],), float("inf")))
    return -torch.log(distances.min(dim=1).values + 1e-8).mean()


KOLEO_IMPLEMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "blocked": koleo_proto_loss,
    "dense": dense_koleo_proto_loss,
}


def _koleo_forward_backward(implementation: str, num_prototypes: int, dim: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    prototypes = torch.randn(num_prototypes, dim, requires_grad=True)
    loss_fn = KOLEO_IMPLEMENTATIONS[implementation]
    baseline = _resident_mib()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss_fn(prototypes).backward()
        seconds.append(time.perf_counter() - start)
        prototypes.grad = None
    return {
        "seconds_median": statistics.median(seconds),
        "seconds_first": seconds[0],
        "peak_extra_mib": max(0.0, _peak_resident_mib() - baseline),
        "input_mib": num_prototypes * dim * 4 / 2**20,
    }


def measure_koleo_proto(
    implementation: str, num_prototypes: int, dim: int = 256, repeats: int = 3, threads: int | None = None
) -> dict[str, Any]:
    """Forward+backward time and peak extra resident memory of one KoLeo-proto implementation.

    Runs in a fresh spawned process; peak memory is the process high-water mark minus its
    resident size just before the first call (inputs already allocated). A process that dies
    (out of memory) is reported as ``{"error": ...}``.
    """
    if implementation not in KOLEO_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {sorted(KOLEO_IMPLEMENTATIONS)}, got {implementation!r}")
    threads = threads or torch.get_num_threads()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(_koleo_forward_backward, implementation, num_prototypes, dim, repeats, threads)
        try:
            result = future.result()
        except concurrent.futures.process.BrokenProcessPool as error:
            return {
                "implementation": implementation,
                "num_prototypes": num_prototypes,
                "dim": dim,
                "error": f"process died (likely out of memory): {error}",
            }
    return {
        "implementation": implementation,
        "num_prototypes": num_prototypes,
        "dim": dim,
        "threads": threads,
        **result,
    }


def measure_data_pipeline(argv: list[str], n_batches: int = 20) -> dict[str, Any]:
    """Images per second of stream -> decode -> multi-crop -> device photometric, for a run config.

    ``argv`` is what ``scripts/pretrain.py`` would get (e.g. ``["--config", "configs/demo.yaml"]``).
    The first batch (worker start-up) is not timed.
    """
    from accelerate import Accelerator

    from .training.arguments import parse_pretraining_args
    from .training.checkpoint import TrainerState
    from .training.pipeline import DataPipeline

    arguments, model_config = parse_pretraining_args(argv)
    pipeline = DataPipeline(arguments, model_config, Accelerator(cpu=True))
    state = TrainerState()
    pipeline.next_batch(state)
    start, images = time.perf_counter(), 0
    for _ in range(n_batches):
        images += pipeline.next_batch(state)["global_crops"].shape[0]
    seconds = time.perf_counter() - start
    return {"images_per_second": images / seconds, "batches": n_batches, "batch_size": arguments.per_device_batch_size,
            "num_workers": arguments.num_workers, "local_crops": arguments.local_crops_number}  # fmt: skip
