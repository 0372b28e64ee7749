"""Measurements behind ``docs/benchmarks.md``: time and peak memory, each in a fresh process,
and side-by-side timings against peers run alternately in one process.

Run by ``scripts/benchmark.py``. Every ratio and img/s figure is computed from the timings the
record carries (``seconds``), so a reader can recompute it; :func:`check_targets` marks the
acceptance targets met or not. The peer step is built from lightly (``pip install --no-deps
lightly``), with a torchvision stub where torchvision cannot import beside the CPU torch wheel.
"""

from __future__ import annotations

import concurrent.futures
import copy
import importlib.abc
import importlib.machinery
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch

from experiments.koleo_reference import dinov2_koleo_loss
from experiments.markdown import markdown_table
from hf_koleo.losses import dino_loss, ibot_patch_loss, koleo_proto_loss, masked_patch_slots


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize() / 2**20


def _peak_resident_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def available_memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def machine_description() -> str:
    return (
        f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"{available_memory_gib():.0f} GiB available, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


KOLEO_IMPLEMENTATIONS: dict[str, str] = {
    "blocked": "ours (blocked)",
    "dense": "DINOv2 algorithm (dense similarity, arg-max)",
}


def koleo_implementation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The KoLeo-proto loss called ``name`` in :data:`KOLEO_IMPLEMENTATIONS` (``"dense"``: DINOv2's algorithm)."""
    implementations = {"blocked": koleo_proto_loss, "dense": dinov2_koleo_loss}
    if name not in implementations:
        raise ValueError(f"implementation must be one of {sorted(KOLEO_IMPLEMENTATIONS)}, got {name!r}")
    return implementations[name]


def _timed_forward_backward(make_inputs: Callable[[], tuple], compute: Callable, repeats: int) -> dict[str, float]:
    """Run in the child: inputs first, then ``repeats`` forward+backward passes; peak is above inputs."""
    inputs = make_inputs()
    baseline = _resident_mib()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        compute(*inputs).backward()
        seconds.append(time.perf_counter() - start)
        for tensor in inputs:
            tensor.grad = None
    return {
        "seconds": seconds,
        "seconds_median": statistics.median(seconds),
        "seconds_first": seconds[0],
        "peak_extra_mib": max(0.0, _peak_resident_mib() - baseline),
    }


def _koleo_child(implementation: str, num_prototypes: int, dim: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    compute = koleo_implementation(implementation)  # resolved before the clock starts
    return _timed_forward_backward(lambda: (torch.randn(num_prototypes, dim, requires_grad=True),), compute, repeats)


def _dino_ibot_child(
    num_prototypes: int, batch: int, n_global: int, n_local: int, n_masked_per_image: int, repeats: int, threads: int
) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n_masked = batch * n_global * n_masked_per_image
    masks = torch.zeros(batch * n_global, n_masked_per_image * 2, dtype=torch.bool)
    masks[:, :n_masked_per_image] = True
    weights = masked_patch_slots(masks, n_masked)[1]

    def make_inputs():
        return (
            torch.randn(batch, n_global + n_local, num_prototypes, requires_grad=True),
            torch.randn(n_masked, num_prototypes, requires_grad=True),
        )

    teacher = torch.softmax(torch.randn(batch, n_global, num_prototypes), dim=-1)
    teacher_patches = torch.softmax(torch.randn(n_masked, num_prototypes), dim=-1)

    def compute(student_cls, student_patches):
        return dino_loss(student_cls, teacher, 0.1) + ibot_patch_loss(student_patches, teacher_patches, weights, 0.1)

    return _timed_forward_backward(make_inputs, compute, repeats)


def run_isolated(function: Callable, *args) -> dict[str, Any]:
    """``function(*args)`` in a fresh spawned process; ``{"error": ...}`` if the process dies."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(function, *args).result()
        except concurrent.futures.process.BrokenProcessPool as error:
            return {"error": f"process died (likely out of memory): {error}"}


def measure_koleo_proto(
    implementation: str, num_prototypes: int, dim: int = 256, repeats: int = 3, threads: int | None = None
) -> dict[str, Any]:
    """Forward+backward time and peak extra resident memory of one KoLeo-proto implementation.

    DINOv2's algorithm (``"dense"``) is not attempted when its ``K x K`` float32 similarity matrix
    cannot fit in the available memory; the result says so instead.
    """
    if implementation not in KOLEO_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {sorted(KOLEO_IMPLEMENTATIONS)}, got {implementation!r}")
    threads = threads or torch.get_num_threads()
    record = {"implementation": implementation, "num_prototypes": num_prototypes, "dim": dim, "threads": threads}
    needed_gib = num_prototypes**2 * 4 / 2**30
    if implementation == "dense" and needed_gib > 0.8 * available_memory_gib():
        return {
            **record,
            "error": f"not run: needs about {needed_gib:.0f} GiB for the K x K similarity matrix, "
            f"{available_memory_gib():.0f} GiB available",
        }
    return {**record, **run_isolated(_koleo_child, implementation, num_prototypes, dim, repeats, threads)}


def measure_dino_ibot(
    num_prototypes: int,
    batch: int,
    n_global: int = 2,
    n_local: int = 8,
    n_masked_per_image: int = 50,
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Forward+backward of ``dino_loss`` + ``ibot_patch_loss`` on given logits (heads excluded)."""
    threads = threads or torch.get_num_threads()
    record = {
        "num_prototypes": num_prototypes,
        "batch": batch,
        "n_global": n_global,
        "n_local": n_local,
        "masked_patches_per_crop": n_masked_per_image,
    }
    return {
        **record,
        **run_isolated(
            _dino_ibot_child, num_prototypes, batch, n_global, n_local, n_masked_per_image, repeats, threads
        ),
    }


def measure_data_pipeline(argv: list[str], n_batches: int = 20) -> dict[str, Any]:
    """Images per second of stream -> decode -> multi-crop -> device photometric, for a run config.

    ``argv`` is what ``scripts/pretrain.py`` would get (e.g. ``["--config", "configs/demo.yaml"]``).
    The first batch (worker start-up) is not timed.
    """
    from accelerate import Accelerator

    from hf_koleo.training.arguments import parse_pretraining_args
    from hf_koleo.training.checkpoint import TrainerState
    from hf_koleo.training.pipeline import DataPipeline

    arguments, model_config = parse_pretraining_args(argv)
    pipeline = DataPipeline(arguments, model_config, Accelerator(cpu=True))
    state = TrainerState()
    pipeline.next_batch(state)
    start, images = time.perf_counter(), 0
    for _ in range(n_batches):
        images += pipeline.next_batch(state)["global_crops"].shape[0]
    seconds = time.perf_counter() - start
    return {
        "images_per_second": images / seconds,
        "images": images,
        "seconds": seconds,
        "batches": n_batches,
        "batch_size": arguments.per_device_batch_size,
        "num_workers": arguments.num_workers,
        "local_crops": arguments.local_crops_number,
    }


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Satisfies lightly's package-level torchvision imports, which the DINO loss and head never use.

    PyPI's torchvision cannot import beside this project's CPU torch wheel.
    """

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__, module.__name__ = [], spec, spec.name
        return module

    def exec_module(self, module) -> None:
        pass


def import_lightly_dino():
    """``(DINOLoss, DINOProjectionHead, update_momentum)`` from lightly (``pip install --no-deps lightly``)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken beside the CPU wheel: stub it
        for name in [key for key in sys.modules if key.startswith("torchvision")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _TorchvisionStub())
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum

    return DINOLoss, DINOProjectionHead, update_momentum


def _step_settings(model_config) -> dict:
    return dict(
        hidden=model_config.backbone_config.hidden_size,
        K=model_config.num_prototypes,
        head_hidden=model_config.head_hidden_size,
        bottleneck=model_config.head_bottleneck_size,
    )


def _make_ours(model_config, device: torch.device):
    from hf_koleo.modeling_koleo_dino import KoLeoDinoForPreTraining

    model = KoLeoDinoForPreTraining(model_config).train().to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step(global_crops, local_crops):
        output = model(global_crops, local_crops, teacher_temperature=0.04)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        model.update_teacher(0.996)
        return output.loss

    return step


def _make_lightly(model_config, device: torch.device):
    from transformers import Dinov2Model

    DINOLoss, DINOProjectionHead, update_momentum = import_lightly_dino()
    settings = _step_settings(model_config)
    student_backbone = Dinov2Model(model_config.backbone_config).train()
    head_sizes = (settings["hidden"], settings["head_hidden"], settings["bottleneck"], settings["K"])
    student_head, teacher_head = DINOProjectionHead(*head_sizes), DINOProjectionHead(*head_sizes).eval()
    teacher_head.load_state_dict(student_head.state_dict())  # weight_norm modules cannot be deep-copied
    teacher_backbone = copy.deepcopy(student_backbone).eval()
    for module in (student_backbone, student_head, teacher_backbone, teacher_head):
        module.to(device)
    for parameter in [*teacher_backbone.parameters(), *teacher_head.parameters()]:
        parameter.requires_grad_(False)
    criterion = DINOLoss(output_dim=settings["K"], warmup_teacher_temp_epochs=0).to(device)
    parameters = [p for p in [*student_backbone.parameters(), *student_head.parameters()] if p.requires_grad]
    # The same optimiser as ours, so the comparison is about the model and loss code.
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=True)

    def step(global_crops, local_crops):
        globals_list = list(global_crops.unbind(1))
        locals_list = list(local_crops.unbind(1))
        with torch.no_grad():  # the teacher batched over both global views, as ours is
            teacher_out = list(teacher_head(teacher_backbone(torch.cat(globals_list)).pooler_output).chunk(2))
        student_globals = student_backbone(torch.cat(globals_list)).pooler_output
        student_locals = student_backbone(torch.cat(locals_list)).pooler_output
        n_views = len(globals_list) + len(locals_list)
        student_out = list(student_head(torch.cat([student_globals, student_locals])).chunk(n_views))
        loss = criterion(teacher_out, student_out, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_momentum(student_backbone, teacher_backbone, 0.996)
        update_momentum(student_head, teacher_head, 0.996)
        return loss

    return step


def compare_training_steps(
    model_config,
    batch: int,
    global_size: int,
    local_size: int,
    n_local: int,
    rounds: int = 5,
    warmup: int = 2,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Our full DINO step vs a step built from lightly's DINOLoss/DINOProjectionHead, alternately.

    Same backbone (a stock ``Dinov2Model`` of ``model_config.backbone_config``), same head sizes,
    same crops, same fused AdamW, both teachers batched over the two global views; iBOT and KoLeo
    terms off so both compute the same DINO objective. On ``device`` (default: the GPU when there is
    one); every timing waits for the device. Returns img/s of each and the median per-round ratio
    (ours / lightly).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    global_crops = torch.randn(batch, 2, 3, global_size, global_size, device=device)
    local_crops = torch.randn(batch, n_local, 3, local_size, local_size, device=device)
    steps = {"ours": _make_ours(model_config, device), "lightly": _make_lightly(model_config, device)}
    for _ in range(warmup):
        for step in steps.values():
            step(global_crops, local_crops)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(global_crops, local_crops)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    ratios = [lightly / ours for ours, lightly in zip(seconds["ours"], seconds["lightly"])]
    return {
        "batch": batch,
        **_step_settings(model_config),
        "n_local": n_local,
        "device": str(device),
        "ours_images_per_second": batch / statistics.median(seconds["ours"]),
        "lightly_images_per_second": batch / statistics.median(seconds["lightly"]),
        "speedup_median": statistics.median(ratios),
        "rounds": rounds,
        "seconds": seconds,
    }


def compare_feature_extraction(backbone_dir: str, batch: int = 64, rounds: int = 5) -> dict[str, Any]:
    """img/s of the exported backbone (loaded with ``AutoModel``) vs a stock ``Dinov2Model`` of its config."""
    from transformers import AutoConfig, AutoModel, Dinov2Model

    exported = AutoModel.from_pretrained(backbone_dir).eval()
    stock = Dinov2Model(AutoConfig.from_pretrained(backbone_dir)).eval()
    size = exported.config.image_size
    pixels = torch.randn(batch, 3, size, size)
    seconds: dict[str, list[float]] = {"exported": [], "stock": []}
    with torch.no_grad():
        for model in (exported, stock):
            model(pixel_values=pixels)
        for _ in range(rounds):
            for name, model in (("exported", exported), ("stock", stock)):
                start = time.perf_counter()
                model(pixel_values=pixels)
                seconds[name].append(time.perf_counter() - start)
    return {
        "batch": batch,
        "image_size": size,
        "exported_images_per_second": batch / statistics.median(seconds["exported"]),
        "stock_images_per_second": batch / statistics.median(seconds["stock"]),
        "ratio": statistics.median(seconds["stock"]) / statistics.median(seconds["exported"]),
        "seconds": seconds,
    }


def _cell(result: dict, key: str, fmt: str) -> str:
    return result["error"] if "error" in result else format(result[key], fmt)


def run_benchmark_suite(
    koleo_sizes=(1024, 8192, 65536),
    loss_sizes=(1024, 8192, 65536),
    loss_batches=(16, 64),
    step_sizes=(1024, 65536),
    step_batch: int = 64,
    data_config: str = "configs/demo.yaml",
    rounds: int = 5,
    dim: int = 256,
) -> dict[str, Any]:
    """Every measurement of ``docs/benchmarks.md`` (tiny sizes make it a smoke test)."""
    import tempfile

    from hf_koleo.backbone_export import export_backbone
    from hf_koleo.modeling_koleo_dino import KoLeoDinoForPreTraining
    from hf_koleo.training.arguments import parse_pretraining_args

    results: dict[str, Any] = {"machine": machine_description()}
    results["koleo"] = [
        measure_koleo_proto(implementation, size, dim)
        for size in koleo_sizes
        for implementation in ("blocked", "dense")
    ]
    results["dino_ibot"] = [measure_dino_ibot(size, batch) for size in loss_sizes for batch in loss_batches]
    arguments, model_config = parse_pretraining_args(
        ["--config", data_config, "--model.ibot_loss_weight", "0", "--model.koleo_proto_weight", "0"]
    )
    results["step"] = []
    for size in step_sizes:
        config = copy.deepcopy(model_config)
        config.num_prototypes = config.num_patch_prototypes = size
        results["step"].append(
            compare_training_steps(
                config,
                step_batch,
                arguments.global_crops_size,
                arguments.local_crops_size,
                arguments.local_crops_number,
                rounds=rounds,
            )
        )
    results["data"] = measure_data_pipeline(["--config", data_config])
    with tempfile.TemporaryDirectory() as folder:
        export_backbone(KoLeoDinoForPreTraining(model_config), folder, arguments.global_crops_size)
        results["features"] = compare_feature_extraction(folder, step_batch, rounds)
    return results


def render_benchmarks_markdown(results: dict[str, Any], command: str) -> str:
    """``docs/benchmarks.md`` from :func:`run_benchmark_suite` results."""
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on: {results['machine']}.",
        "",
        "Every figure is measured; memory is the peak resident memory above the inputs, in a fresh process.",
        "",
        "## KoLeo-proto forward + backward (d = 256)",
        "",
    ]
    by_size: dict[int, dict[str, dict]] = {}
    for row in results["koleo"]:
        by_size.setdefault(row["num_prototypes"], {})[row["implementation"]] = row
    rows = []
    for size, pair in by_size.items():
        blocked, dense = pair["blocked"], pair["dense"]
        ratio = "-"
        if "error" not in dense and "error" not in blocked:
            ratio = f"{blocked['seconds_median'] / dense['seconds_median']:.2f}"
        rows.append(
            [
                str(size),
                _cell(blocked, "seconds_median", ".3f"),
                _cell(blocked, "peak_extra_mib", ".0f"),
                _cell(dense, "seconds_median", ".3f"),
                _cell(dense, "peak_extra_mib", ".0f"),
                ratio,
            ]
        )
    dinov2 = KOLEO_IMPLEMENTATIONS["dense"]
    lines += [
        f"Ours against the {dinov2}: the full K x K dot products, each row's arg-max without gradient, then "
        "only the K chosen distances differentiated (`experiments/koleo_reference.py`).",
        "",
    ]
    lines += markdown_table(
        ["K", "ours (blocked) s", "ours peak MiB", f"{dinov2} s", f"{dinov2} peak MiB", "time ours ÷ DINOv2"], rows
    )
    lines += [
        "",
        "## DINO + iBOT loss forward + backward",
        "",
        "Logits given (heads excluded): 2 global + 8 local crops, 50 masked patches per global crop.",
        "",
    ]
    rows = [
        [
            str(row["num_prototypes"]),
            str(row["batch"]),
            _cell(row, "seconds_median", ".3f"),
            _cell(row, "peak_extra_mib", ".0f"),
        ]
        for row in results["dino_ibot"]
    ]
    lines += markdown_table(["K", "batch", "s", "peak MiB"], rows)
    lines += [
        "",
        "## One training step: ours vs a lightly-based step, alternately in one process",
        "",
        "Student forward/backward on 2 global + local crops, teacher forward, AdamW step, EMA update; the same "
        "stock Dinov2Model backbone, head sizes and crops; DINO loss only (lightly's DINOLoss and "
        "DINOProjectionHead for the peer).",
        "",
    ]
    rows = [
        [
            str(row["K"]),
            str(row["batch"]),
            f"{row['ours_images_per_second']:.1f}",
            f"{row['lightly_images_per_second']:.1f}",
            f"{row['speedup_median']:.2f}×",
        ]
        for row in results["step"]
    ]
    lines += markdown_table(["K", "batch", "ours img/s", "lightly img/s", "median ratio (ours / lightly)"], rows)
    data, step = results["data"], results["step"][0]
    headroom = data["images_per_second"] / step["ours_images_per_second"]
    lines += ["", "## Data pipeline vs what the training step consumes", ""]
    lines += markdown_table(
        ["pipeline img/s (stream → decode → multi-crop → photometric)", "step img/s", "headroom"],
        [
            [
                f"{data['images_per_second']:.0f} (workers {data['num_workers']}, batch {data['batch_size']})",
                f"{step['ours_images_per_second']:.1f} (K = {step['K']})",
                f"{headroom:.1f}×",
            ]
        ],
    )
    features = results["features"]
    lines += ["", "## Feature extraction: exported backbone vs stock Dinov2Model", ""]
    lines += markdown_table(
        ["exported img/s", "stock img/s", "ratio"],
        [
            [
                f"{features['exported_images_per_second']:.1f}",
                f"{features['stock_images_per_second']:.1f}",
                f"{features['ratio']:.2f}×",
            ]
        ],
    )
    lines += ["", "## Targets", ""] + [f"- {line}" for line in check_targets(results)]
    return "\n".join(lines + [""])


def check_targets(results: dict[str, Any]) -> list[str]:
    """The issue's targets, each marked met / not met with the measured number."""

    def mark(condition: bool) -> str:
        return "met" if condition else "NOT met"

    koleo = {(row["num_prototypes"], row["implementation"]): row for row in results["koleo"]}
    lines = []
    largest = max(size for size, _ in koleo)
    blocked = koleo[(largest, "blocked")]
    if "error" not in blocked:
        lines.append(
            f"KoLeo-proto at K = {largest}: {blocked['peak_extra_mib']:.0f} MiB extra peak memory "
            f"(target < 1024 MiB): {mark(blocked['peak_extra_mib'] < 1024)}."
        )
    if (8192, "blocked") in koleo and "error" not in koleo[(8192, "dense")]:
        ours, dense = koleo[(8192, "blocked")]["seconds_median"], koleo[(8192, "dense")]["seconds_median"]
        lines.append(
            f"KoLeo-proto at K = 8192 no slower than the DINOv2 algorithm: {ours:.3f} s vs {dense:.3f} s: "
            f"{mark(ours <= dense)}."
        )
    for row in results["step"]:
        lines.append(
            f"Full step at K = {row['K']} >= 1.2x the lightly-based step: {row['speedup_median']:.2f}x: "
            f"{mark(row['speedup_median'] >= 1.2)}."
        )
    headroom = results["data"]["images_per_second"] / results["step"][0]["ours_images_per_second"]
    lines.append(f"Data pipeline >= 2x the step's demand (demo config): {headroom:.1f}x: {mark(headroom >= 2)}.")
    ratio = results["features"]["ratio"]
    lines.append(
        f"Exported backbone feature extraction = stock Dinov2Model: {ratio:.2f}x: {mark(0.95 <= ratio <= 1.05)}."
    )
    return lines
