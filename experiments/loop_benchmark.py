"""Speed of the training loop on the accelerator (GPU; runs on CPU too, at any size).

Run kinds of ``configs/experiments/loop_benchmark.yaml`` (``loop_batch``, ``host_overhead``,
``koleo_on_device``; the peer step is ``experiments.benchmarks.step_vs_peer``). For a pretraining
config (the argv ``scripts/pretrain.py`` takes) and a per-device batch size, a ``loop_batch`` run
measures in one process:

* **data**: ``Pipeline.next_batch`` alone (decode-once images -> crops, colours, masks on the device);
* **step**: ``train_step`` + EMA on a batch already on the device (the model alone);
* **end to end**: data + step + EMA, as the trainer runs them;
* the ratios the speed targets are set on: step time at 4x the batch / at the batch,
  data img/s / step img/s, end-to-end / step;
* **host syncs** in the first data + training steps (after the warm-up when compiled): every one
  the :class:`HostSyncRecorder` sees, and on a GPU every warning of
  ``torch.cuda.set_sync_debug_mode("warn")``;
* KoLeo-proto forward + backward at a given K on the device.

Every timing waits for the device (``torch.cuda.synchronize``) before reading the clock.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.timing import synchronize, timed
from hf_koleo import koleo_proto_loss
from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.checkpoint import TrainerState
from hf_koleo.training.host_sync import HostSyncRecorder
from hf_koleo.training.optimization import apply_schedules, schedule_values
from hf_koleo.training.pipeline import Pipeline
from hf_koleo.training.run_setup import build_run
from hf_koleo.training.trainer import NonFiniteGuard, train_step


@dataclass
class Loop:
    """Everything one batch size needs: the model, optimiser and data path as the trainer builds them."""

    accelerator: Accelerator
    model: Any
    optimizer: Any
    data: Pipeline
    values: Any
    state: TrainerState
    guard: NonFiniteGuard
    compiled: bool = False
    step_index: int = 0

    @classmethod
    def build(cls, argv: list[str], batch_size: int) -> Loop:
        arguments, model_config = parse_pretraining_args([*argv, "--per_device_batch_size", str(batch_size)])
        # A fresh compiler for each loop: otherwise automatic dynamic shapes make the next batch size
        # measure a dynamic-shape graph (the previous one saw another batch dimension).
        torch._dynamo.reset()
        run = build_run(arguments, model_config, resume=False)
        values = schedule_values(arguments, 0, 1000, 100.0, arguments.peak_lr(1))
        values.last_layer_lr = values.lr  # measured past the freeze: every parameter updates
        apply_schedules(run.optimizer, values)
        guard = NonFiniteGuard()
        return cls(
            run.accelerator, run.model, run.optimizer, run.data, values, run.state, guard, compiled=arguments.compile
        )

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def next_batch(self) -> dict[str, Any]:
        return self.data.next_batch(self.state)

    def step(self, batch: dict[str, Any]) -> None:
        train_step(self.accelerator, self.model, self.optimizer, batch, self.values, self.step_index, 3.0, self.guard)
        self.accelerator.unwrap_model(self.model).update_teacher(0.996)
        self.step_index += 1


def host_syncs(loop: Loop, steps: int = 3) -> list[str]:
    """Every synchronising operation in ``steps`` data + training steps, [] being the goal: on a fresh
    loop the first step is among them (nothing may be copied lazily). :class:`HostSyncRecorder` on any
    device (host reads, blocking copies, host tensors in device operations) and, on a GPU, each
    warning of ``torch.cuda.set_sync_debug_mode("warn")`` besides."""
    synchronize(loop.device)
    cuda = loop.device.type == "cuda"
    device = None if loop.device.type == "cpu" else loop.device  # on an accelerator, host work is no sync
    with warnings.catch_warnings(record=True) as caught, HostSyncRecorder(device) as recorder:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                loop.step(loop.next_batch())
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    found = [f"{name} at {where}" for name, where in recorder.syncs]
    return found + sync_warnings(caught)


SYNC_DEBUG_NOTICE = "Synchronization debug mode is a prototype feature"


def sync_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings of ``set_sync_debug_mode("warn")`` that name a synchronising call ("called a
    synchronizing CUDA operation"), one line each; not the notice torch gives the first time the mode
    is turned on ("Synchronization debug mode is a prototype feature ..."), which the first H200 window
    reported as a sync."""
    return [
        f"{str(warning.message).splitlines()[0]} at {warning.filename}:{warning.lineno}"
        for warning in caught
        if "called a synchronizing" in str(warning.message)
    ]


def matmul_gflops(device: torch.device, size: int = 1024, repeats: int = 10, dtype=torch.float32) -> float:
    """This machine's own matrix-multiply rate (GFLOP/s) on a ``size``-square product in ``dtype``:
    the yardstick of the step's achieved rate (an MFU for machines without a datasheet figure)."""
    left, right = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    left @ right  # warm-up
    return 2 * size**3 / timed(device, lambda: left @ right, repeats) / 1e9


# The dtype a step's matrix multiplies run in under each of accelerate's mixed-precision settings.
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def step_flops(loop: Loop, batch: dict[str, Any]) -> int:
    """Floating-point operations of one training step (forward and backward) in matrix multiplies,
    convolutions and attention, as ``torch.utils.flop_counter`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loop.step(batch)
    return counter.get_total_flops()


def measure_batch(argv: list[str], batch_size: int, steps: int, warmup: int = 3) -> dict[str, Any]:
    """Data alone, step alone and end to end for one per-device batch size; the step's matmul rate
    against the machine's own (``mfu``)."""
    loop = Loop.build(argv, batch_size)
    # The first steps of an eager loop are checked for syncs before the warm-up; a compiled one
    # after it (its first steps trace and compile, with host work of their own).
    syncs = None if loop.compiled else host_syncs(loop)
    for _ in range(warmup):
        loop.step(loop.next_batch())
    data_seconds = timed(loop.device, loop.next_batch, steps)
    fixed = loop.next_batch()
    step_seconds = timed(loop.device, lambda: loop.step(fixed), steps)
    end_to_end_seconds = timed(loop.device, lambda: loop.step(loop.next_batch()), steps)
    syncs = host_syncs(loop) if syncs is None else syncs
    flops = step_flops(loop, fixed)
    # The yardstick in the step's own precision: against float32 a bf16 step on an H200 read "86 %"
    # where the bf16 units were far from busy.
    dtype = MATMUL_DTYPES.get(str(loop.accelerator.mixed_precision), torch.float32)
    achieved, machine = flops / step_seconds / 1e9, matmul_gflops(loop.device, dtype=dtype)
    return {
        "batch_size": batch_size,
        "resident": loop.data.resident,
        "data_images_per_second": batch_size / data_seconds,
        "step_ms": 1000 * step_seconds,
        "step_images_per_second": batch_size / step_seconds,
        "end_to_end_images_per_second": batch_size / end_to_end_seconds,
        "data_over_step": step_seconds / data_seconds,
        "end_to_end_over_step": step_seconds / end_to_end_seconds,
        "host_syncs": syncs,
        "step_gflop": flops / 1e9,
        "achieved_gflops": achieved,
        "machine_matmul_gflops": machine,
        "machine_matmul_dtype": str(dtype).removeprefix("torch."),
        "mfu": achieved / machine,
    }


# A measurement logs nothing and must not end: the schedules assume a run of this many steps.
MEASURE_ARGV = ["--report_to", "none", "--max_steps", "1000"]


def loop_batch(params: dict[str, Any], context=None) -> dict[str, Any]:
    """Run kind: :func:`measure_batch` for a pretraining config (``argv``), ``batch_size``, ``steps`` (20)."""
    argv = [*params["argv"], *MEASURE_ARGV]
    return {"argv": params["argv"], **measure_batch(argv, params["batch_size"], params.get("steps", 20))}


def host_overhead(params: dict[str, Any], context=None) -> dict[str, Any]:
    """Run kind: :func:`measure_host_overhead` for a pretraining config (``argv``), ``batch_size`` (2)."""
    argv = [*params["argv"], *MEASURE_ARGV]
    return {"argv": params["argv"], **measure_host_overhead(argv, params.get("batch_size", 2), params.get("steps", 20))}


# Every op of the data path and the step kept, their work shrunk to nothing: what is left is the host's
# cost of dispatching (and, on a GPU, launching) them, the floor under the step time at any batch.
SHRUNK_MODEL = [
    *("--model.backbone_config.hidden_size", "8", "--model.backbone_config.num_attention_heads", "1"),
    *("--model.num_prototypes", "16", "--model.head_hidden_size", "8", "--model.head_bottleneck_size", "8"),
]


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it (each is at least one kernel launch on a GPU,
    views excepted)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure_host_overhead(argv: list[str], batch_size: int = 2, steps: int = 20) -> dict[str, Any]:
    """ms per data batch and per step, and ATen operators dispatched by each, with the model shrunk."""
    loop = Loop.build([*argv, *SHRUNK_MODEL], batch_size)
    for _ in range(3):
        loop.step(loop.next_batch())
    fixed = loop.next_batch()
    with _OpCounter() as data_ops:
        loop.next_batch()
    with _OpCounter() as step_ops:
        loop.step(fixed)
    return {
        "batch_size": batch_size,
        "data_ms": 1000 * timed(loop.device, loop.next_batch, steps),
        "step_ms": 1000 * timed(loop.device, lambda: loop.step(fixed), steps),
        "data_ops": data_ops.count,
        "step_ops": step_ops.count,
    }


def koleo_on_device(params: dict[str, Any], context=None) -> dict[str, Any]:
    """Run kind: KoLeo-proto forward + backward on the accelerator (``num_prototypes``, ``dim`` 256,
    ``repeats`` 5): ms per call and peak memory (NaN on a CPU)."""
    num_prototypes, dim, repeats = params["num_prototypes"], params.get("dim", 256), params.get("repeats", 5)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prototypes = torch.randn(num_prototypes, dim, device=device, requires_grad=True)

    def call() -> None:
        koleo_proto_loss(prototypes).backward()

    call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [timed(device, call) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"num_prototypes": num_prototypes, "dim": dim, "ms": 1000 * statistics.median(seconds), "peak_mib": peak}
