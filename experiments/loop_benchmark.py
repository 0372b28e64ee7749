"""Speed of the training loop on the accelerator (GPU; runs on CPU too, at any size).

For a pretraining config (the argv ``scripts/pretrain.py`` takes) and several per-device batch
sizes, measures in one process:

* **data**: ``DataPipeline.next_batch`` alone (decode-once images -> crops, colours, masks on the device);
* **step**: ``train_step`` + EMA on a batch already on the device (the model alone);
* **end to end**: data + step + EMA, as the trainer runs them;
* the ratios the GPU-speed issue sets targets for: step time at 4x the batch / at the batch,
  data img/s / step img/s, end-to-end / step;
* **host syncs** inside data + step: ``torch.cuda.set_sync_debug_mode("error")`` on a GPU, the
  :class:`HostSyncRecorder` on a CPU;
* KoLeo-proto forward + backward at a given K on the device.

Every timing waits for the device (``torch.cuda.synchronize``) before reading the clock.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.markdown import markdown_table
from hf_koleo import KoLeoDinoForPreTraining, koleo_proto_loss
from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.checkpoint import TrainerState
from hf_koleo.training.host_sync import HostSyncRecorder
from hf_koleo.training.optimization import apply_schedules, build_optimizer, schedule_values
from hf_koleo.training.pipeline import DataPipeline
from hf_koleo.training.trainer import NonFiniteGuard, compile_model, train_step

logger = logging.getLogger(__name__)


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Loop:
    """Everything one batch size needs: the model, optimiser and data path as the trainer builds them."""

    accelerator: Accelerator
    model: Any
    optimizer: Any
    data: DataPipeline
    values: Any
    batch_size: int
    state: TrainerState
    guard: NonFiniteGuard
    step_index: int = 0

    @classmethod
    def build(cls, argv: list[str], batch_size: int) -> Loop:
        arguments, model_config = parse_pretraining_args([*argv, "--per_device_batch_size", str(batch_size)])
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=arguments.mixed_precision or None)
        torch.manual_seed(arguments.seed)
        model = KoLeoDinoForPreTraining(model_config)
        model, optimizer = accelerator.prepare(model, build_optimizer(model, arguments.weight_decay))
        if arguments.compile:
            compile_model(accelerator.unwrap_model(model), arguments.compile_mode, arguments.compile_scope)
        data = DataPipeline(arguments, model_config, accelerator)
        values = schedule_values(arguments, 0, 1000, 100.0, arguments.peak_lr(1))
        values.freeze_last_layer_steps = 0
        apply_schedules(optimizer, values)
        return cls(accelerator, model, optimizer, data, values, batch_size, TrainerState(), NonFiniteGuard())

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def next_batch(self) -> dict[str, Any]:
        return self.data.next_batch(self.state)

    def step(self, batch: dict[str, Any]) -> None:
        train_step(self.accelerator, self.model, self.optimizer, batch, self.values, self.step_index, 3.0, self.guard)
        self.accelerator.unwrap_model(self.model).update_teacher(0.996)
        self.step_index += 1


def _timed(device: torch.device, function, repeats: int) -> float:
    """Seconds per call, the device waited for before and after."""
    _wait(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    _wait(device)
    return (time.perf_counter() - start) / repeats


def host_syncs(loop: Loop, steps: int = 2) -> list[str]:
    """Synchronising operations in ``steps`` data + training steps (after a warm-up step); [] is the goal."""
    loop.step(loop.next_batch())
    _wait(loop.device)
    if loop.device.type == "cuda":
        found: list[str] = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                loop.step(loop.next_batch())
        except RuntimeError as error:  # the first synchronising call
            found.append(str(error).splitlines()[0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return found
    with HostSyncRecorder() as recorder:
        for _ in range(steps):
            loop.step(loop.next_batch())
    return [f"{name} at {where}" for name, where in recorder.syncs]


def measure_batch(argv: list[str], batch_size: int, steps: int, warmup: int = 3) -> dict[str, Any]:
    """Data alone, step alone and end to end for one per-device batch size."""
    loop = Loop.build(argv, batch_size)
    for _ in range(warmup):
        loop.step(loop.next_batch())
    data_seconds = _timed(loop.device, loop.next_batch, steps)
    fixed = loop.next_batch()
    step_seconds = _timed(loop.device, lambda: loop.step(fixed), steps)
    end_to_end_seconds = _timed(loop.device, lambda: loop.step(loop.next_batch()), steps)
    syncs = host_syncs(loop)
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
    }


def measure_loop(argv: list[str], batch_sizes: list[int], steps: int = 20) -> dict[str, Any]:
    """:func:`measure_batch` per batch size, plus step-time scaling between consecutive sizes."""
    # one batch size failing (out of memory at the largest) keeps the others' rows
    rows = [_recorded({"batch_size": batch_size}, measure_batch, argv, batch_size, steps) for batch_size in batch_sizes]
    measured = [row for row in rows if "error" not in row]
    for smaller, larger in zip(measured, measured[1:]):
        larger["step_time_ratio_to_previous"] = larger["step_ms"] / smaller["step_ms"]
        larger["batch_ratio_to_previous"] = larger["batch_size"] / smaller["batch_size"]
    return {"argv": argv, "device": device_name(), "rows": rows}


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
        "argv": argv,
        "batch_size": batch_size,
        "data_ms": 1000 * _timed(loop.device, loop.next_batch, steps),
        "step_ms": 1000 * _timed(loop.device, lambda: loop.step(fixed), steps),
        "data_ops": data_ops.count,
        "step_ops": step_ops.count,
    }


def measure_koleo_on_device(num_prototypes: int, dim: int = 256, repeats: int = 5) -> dict[str, Any]:
    """KoLeo-proto forward + backward on the accelerator: ms per call and peak extra memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prototypes = torch.randn(num_prototypes, dim, device=device, requires_grad=True)

    def call() -> None:
        koleo_proto_loss(prototypes).backward()

    call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [_timed(device, call, 1) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"num_prototypes": num_prototypes, "dim": dim, "ms": 1000 * statistics.median(seconds), "peak_mib": peak}


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def render_loop_markdown(name: str, results: dict[str, Any]) -> list[str]:
    """A markdown table of :func:`measure_loop` results."""
    if "error" in results:
        return [f"### {name}", "", f"`{' '.join(results['argv'])}`", "", f"**Failed**: {results['error']}", ""]
    lines = [
        f"### {name} ({results['device']})",
        "",
        f"`{' '.join(results['argv'])}`",
        "",
    ]
    header = ["batch", "data img/s", "step ms", "step img/s", "end-to-end img/s", "data ÷ step", "end-to-end ÷ step"]
    header += ["step time vs previous batch", "host syncs"]
    rows = []
    for row in results["rows"]:
        if "error" in row:
            rows.append([str(row["batch_size"]), f"failed: {row['error'][:100]}", *["–"] * (len(header) - 2)])
            continue
        scaling = row.get("step_time_ratio_to_previous")
        scaling_cell = f"{scaling:.2f}x for {row['batch_ratio_to_previous']:.0f}x batch" if scaling else "–"
        syncs = "none" if not row["host_syncs"] else "; ".join(row["host_syncs"])[:120]
        rows.append(
            [
                str(row["batch_size"]),
                f"{row['data_images_per_second']:,.0f}",
                f"{row['step_ms']:.1f}",
                f"{row['step_images_per_second']:,.0f}",
                f"{row['end_to_end_images_per_second']:,.0f}",
                f"{row['data_over_step']:.2f}",
                f"{row['end_to_end_over_step']:.2f}",
                scaling_cell,
                syncs,
            ]
        )
    return [*lines, *markdown_table(header, rows), ""]


# The GPU-speed issue's measurements: (name, pretrain argv, per-device batch sizes).
_FMNIST_BF16 = ["--config", "configs/fashion_mnist.yaml", "--mixed_precision", "bf16"]
# 28 px images decode onto 28 px canvases (141 MiB): --in_memory yes, as auto budgets 224 px ones.
_VITS16_RESIDENT = [
    *("--config", "configs/vits16_in1k.yaml", "--data", "fashion_mnist:train"),
    *("--dataset_size", "0", "--in_memory", "yes"),
]
# The whole forward (backbones, heads, losses) traces as one graph: CUDA graphs replay all of it.
_WHOLE_MODEL_CUDA_GRAPHS = ["--compile", "true", "--compile_scope", "model", "--compile_mode", "reduce-overhead"]
GPU_SUITE = (
    ("fashion_mnist", _FMNIST_BF16, [256, 1024, 4096]),
    (
        "vits16_in1k (ViT-S/16, 2x224 + 10x96, iBOT, K = 8192; Fashion-MNIST images, resident)",
        _VITS16_RESIDENT,
        [32, 128],
    ),
)
# Measured after KoLeo-proto and the peer (a run cut by the device's time limit keeps the targets' tables):
# the GPU study's recipe, and torch.compile (default mode; reduce-overhead adds CUDA graphs).
GPU_EXTRA = (
    (
        "fashion_mnist_gpu (the GPU study's recipe: ViT-Tiny-sized, 6 local crops)",
        ["--config", "configs/fashion_mnist_gpu.yaml"],
        [512, 2048],
    ),
    ("fashion_mnist, --compile true", [*_FMNIST_BF16, "--compile", "true"], [1024, 4096]),
    (
        "fashion_mnist, --compile true --compile_mode reduce-overhead",
        [*_FMNIST_BF16, "--compile", "true", "--compile_mode", "reduce-overhead"],
        [1024, 4096],
    ),
    (
        "fashion_mnist, --compile true --compile_scope model --compile_mode reduce-overhead",
        [*_FMNIST_BF16, *_WHOLE_MODEL_CUDA_GRAPHS],
        [1024, 4096],
    ),
    (
        "vits16_in1k, --compile true --compile_scope model --compile_mode reduce-overhead",
        [*_VITS16_RESIDENT, *_WHOLE_MODEL_CUDA_GRAPHS],
        [128],
    ),
)
# The same pipeline at sizes a 2-core CPU (and CI) runs in seconds.
QUICK_SUITE = (
    (
        "demo, tiny",
        [
            "--config",
            "configs/demo.yaml",
            "--model.backbone_config",
            "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, image_size: 32, patch_size: 8}",
            "--model.num_prototypes",
            "64",
            "--model.head_hidden_size",
            "32",
            "--global_crops_size",
            "16",
            "--local_crops_size",
            "8",
        ],
        [4, 16],
    ),
)


SUITE_PARTS = ("all", "core", "extra")


def run_loop_suite(
    quick: bool = False, steps: int = 20, koleo_prototypes: int = 65536, progress=None, part: str = "all"
) -> dict[str, Any]:
    """Every loop measurement of the suite, KoLeo-proto at ``koleo_prototypes`` and the peer step on the device.

    ``part``: ``core`` (the targets, the overhead floor, KoLeo-proto, the peer), ``extra`` (the GPU
    study's recipe and the compiled variants: minutes of compilation) or ``all``, so a device with a
    10-minute limit per call can take them in two calls. ``progress(results)``, when given, is called
    after each measurement with what is measured so far (a run cut short keeps its first tables).
    """
    if part not in SUITE_PARTS:
        raise ValueError(f"part must be one of {SUITE_PARTS}, got {part!r}")
    results: dict[str, Any] = {"device": device_name(), "loops": {}}
    report = progress or (lambda _: None)

    def loops(suite) -> None:
        for name, argv, batch_sizes in suite:
            argv = [*argv, "--report_to", "none", "--max_steps", "1000"]
            results["loops"][name] = _recorded({"argv": argv}, measure_loop, argv, batch_sizes, steps)
            report(results)

    if part in ("all", "core"):
        loops(QUICK_SUITE if quick else GPU_SUITE)
        overhead_argv = [*(QUICK_SUITE[0][1] if quick else _FMNIST_BF16), "--report_to", "none", "--max_steps", "1000"]
        results["overhead"] = _recorded({"argv": overhead_argv}, measure_host_overhead, overhead_argv)
        report(results)
        results["koleo_proto"] = _recorded({}, measure_koleo_on_device, koleo_prototypes)
        report(results)
        results["peer"] = _recorded({}, measure_peer_step, *(QUICK_PEER if quick else GPU_PEER))
        report(results)
    if part in ("all", "extra"):
        loops(() if quick else GPU_EXTRA)
    return results


def _recorded(context: dict[str, Any], measure, *args) -> dict[str, Any]:
    """A measurement's result, or ``{"error": ...}`` when it fails: one failure (an out-of-memory batch, a
    compiler error) must not cost the device run the measurements after it."""
    try:
        return measure(*args)
    except Exception as error:  # any failure of the measured code is a result to report
        logger.exception("measurement failed")
        return {**context, "error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}
    finally:
        gc.collect()  # a failed measurement's model and batches, held in reference cycles, free their memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# The lightly-based peer step against ours on the device: (pretrain argv, batch).
GPU_PEER = (["--config", "configs/fashion_mnist.yaml"], 256)
QUICK_PEER = (QUICK_SUITE[0][1], 4)


def measure_peer_step(argv: list[str], batch_size: int, rounds: int = 5) -> dict[str, Any]:
    """Our DINO step vs the lightly-based one (``experiments.benchmarks.compare_training_steps``) on the device.

    The config's model with iBOT and KoLeo-proto off (lightly has neither), both teachers batched,
    the same fused AdamW, random crops already on the device.
    """
    from .benchmarks import compare_training_steps

    arguments, model_config = parse_pretraining_args(
        [*argv, "--model.ibot_loss_weight", "0", "--model.koleo_proto_weight", "0"]
    )
    return compare_training_steps(
        model_config,
        batch_size,
        arguments.global_crops_size,
        arguments.local_crops_size,
        arguments.local_crops_number,
        rounds=rounds,
    )


def _overhead_sentence(overhead: dict[str, Any]) -> str:
    return (
        f"Host overhead (`{' '.join(overhead['argv'][:4])}` with the model shrunk to width 8, batch "
        f"{overhead['batch_size']}: every op kept, no work): data {overhead['data_ms']:.1f} ms "
        f"({overhead['data_ops']:,} ATen ops), step {overhead['step_ms']:.1f} ms ({overhead['step_ops']:,} ops): "
        "the floor under the step time at any batch."
    )


def _koleo_sentence(koleo: dict[str, Any]) -> str:
    memory = f", peak {koleo['peak_mib']:.0f} MiB." if koleo["peak_mib"] == koleo["peak_mib"] else " (no GPU memory)."
    return (
        f"KoLeo-proto forward + backward, K = {koleo['num_prototypes']:,}, d = {koleo['dim']}: {koleo['ms']:.1f} ms"
        + memory
    )


def _peer_sentence(peer: dict[str, Any]) -> str:
    return (
        f"Full DINO step against the lightly-based peer on {peer['device']} (batch {peer['batch']}, "
        f"K = {peer['K']:,}, {peer['n_local']} local crops, same fused AdamW, both teachers batched): ours "
        f"{peer['ours_images_per_second']:,.0f} img/s, lightly {peer['lightly_images_per_second']:,.0f} img/s, "
        f"median per-round speed-up {peer['speedup_median']:.2f}x."
    )


# (results key, label when it failed, the sentence when it was measured)
_SENTENCES = (
    ("overhead", "Host overhead", _overhead_sentence),
    ("koleo_proto", "KoLeo-proto at large K", _koleo_sentence),
    ("peer", "Peer step", _peer_sentence),
)


def render_loop_suite_markdown(results: dict[str, Any], command: str) -> str:
    lines = [
        "## Training loop on the accelerator",
        "",
        f"Measured on {results['device']} with `{command}`.",
        "",
    ]
    for name, loop in results["loops"].items():
        lines += render_loop_markdown(name, loop)
    for key, label, sentence in _SENTENCES:
        result = results.get(key)
        if result:
            lines += [f"{label} **failed**: {result['error']}" if "error" in result else sentence(result), ""]
    return "\n".join(lines)
