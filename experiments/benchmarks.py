"""Measurements behind ``docs/benchmarks.md``: time and peak memory, and side-by-side timings
against peers run alternately in one process.

Run kinds of ``configs/experiments/benchmarks.yaml`` (``koleo_timing``, ``dino_ibot_timing``,
``step_vs_peer``, ``data_rate``, ``feature_extraction``; each run in a fresh process, so peak memory
is the run's own). Every ratio and img/s figure is computed from the timings the record carries
(``seconds``), so a reader can recompute it; :func:`check_targets` marks the targets met or not;
:func:`write_report` rewrites the generated tables of ``docs/benchmarks.md``. The peer step is
built from lightly (``pip install --no-deps lightly``), with a torchvision stub where torchvision
cannot import beside the CPU torch wheel.
"""

from __future__ import annotations

import copy
import functools
import importlib.abc
import importlib.machinery
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from experiments.koleo_reference import dinov2_koleo_loss
from experiments.markdown import distinct, markdown_table, verdict_list, write_generated
from hf_koleo.losses import dino_loss, ibot_patch_loss, koleo_proto_loss, masked_patch_slots
from hf_koleo.prototypes import TRACKED_EPS, unique_prototype_curve


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


def koleo_timing(params: dict[str, Any], context=None) -> dict[str, Any]:
    """Run kind: forward+backward time and peak extra resident memory of one KoLeo-proto implementation.

    ``params``: ``implementation`` (a key of :data:`KOLEO_IMPLEMENTATIONS`), ``num_prototypes``,
    ``dim`` (256), ``repeats`` (3). DINOv2's algorithm (``"dense"``) is not attempted when its
    ``K x K`` float32 similarity matrix cannot fit in the available memory (the run fails saying so).
    Peak memory is meaningful in a fresh process (the spec's ``fresh_process: true``).
    """
    implementation, num_prototypes, dim = params["implementation"], params["num_prototypes"], params.get("dim", 256)
    compute = koleo_implementation(implementation)  # resolved before the clock starts
    needed_gib = num_prototypes**2 * 4 / 2**30
    if implementation == "dense" and needed_gib > 0.8 * available_memory_gib():
        raise MemoryError(
            f"not run: needs about {needed_gib:.0f} GiB for the K x K similarity matrix, "
            f"{available_memory_gib():.0f} GiB available"
        )
    torch.manual_seed(0)
    timing = _timed_forward_backward(
        lambda: (torch.randn(num_prototypes, dim, requires_grad=True),), compute, params.get("repeats", 3)
    )
    record = {"implementation": implementation, "num_prototypes": num_prototypes, "dim": dim}
    return {**record, "threads": torch.get_num_threads(), **timing}


def dino_ibot_timing(params: dict[str, Any], context=None) -> dict[str, Any]:
    """Run kind: forward+backward of ``dino_loss`` + ``ibot_patch_loss`` on given logits (heads excluded).

    ``params``: ``num_prototypes``, ``batch``, ``n_global`` (2), ``n_local`` (8),
    ``masked_patches_per_crop`` (50), ``repeats`` (3).
    """
    num_prototypes, batch = params["num_prototypes"], params["batch"]
    n_global, n_local = params.get("n_global", 2), params.get("n_local", 8)
    n_masked_per_image = params.get("masked_patches_per_crop", 50)
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

    record = {
        "num_prototypes": num_prototypes,
        "batch": batch,
        "n_global": n_global,
        "n_local": n_local,
        "masked_patches_per_crop": n_masked_per_image,
    }
    return {**record, **_timed_forward_backward(make_inputs, compute, params.get("repeats", 3))}


def merged_prototypes(num_prototypes: int, groups: int, dim: int = 256, seed: int = 0) -> torch.Tensor:
    """A collapsed-looking ``(K, dim)`` set: K prototypes drawn around ``groups`` random directions, group
    sizes skewed (weight 1 / rank), each group with its own spread (distances of ~0.001 to ~0.1 inside
    it), so the unique count depends on eps as a baseline run's does."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(groups, dim, generator=generator), dim=-1)
    weights = 1.0 / torch.arange(1, groups + 1, dtype=torch.float64)
    members = torch.multinomial(weights, num_prototypes, replacement=True, generator=generator)
    spreads = 10 ** (-3 + 2 * torch.rand(groups, generator=generator)) / (2 * dim) ** 0.5
    noise = torch.randn(num_prototypes, dim, generator=generator) * spreads[members, None]
    return F.normalize(centres[members] + noise, dim=-1)


def unique_curve_timing(params: dict[str, Any], context=None) -> dict[str, Any]:
    """Run kind: seconds of ``unique_prototype_curve`` on :func:`merged_prototypes` (``num_prototypes``,
    ``groups``, ``dim`` 256, ``eps`` the four the trainer tracks, ``hf_koleo.prototypes.TRACKED_EPS``):
    a collapsed set, where most rows link to many others."""
    eps_values = params.get("eps", TRACKED_EPS)
    prototypes = merged_prototypes(params["num_prototypes"], params["groups"], params.get("dim", 256))
    start = time.perf_counter()
    curve = unique_prototype_curve(prototypes, eps_values)
    seconds = time.perf_counter() - start
    record = {"num_prototypes": params["num_prototypes"], "groups": params["groups"], "dim": prototypes.shape[1]}
    return {**record, "unique": {f"{eps:g}": count for eps, count in curve.items()}, "seconds": seconds}


def _dino_only(argv: list[str]):
    """A pretraining config's arguments and model with iBOT and KoLeo-proto off (peers have neither)."""
    from hf_koleo.training.arguments import parse_pretraining_args

    return parse_pretraining_args([*argv, "--model.ibot_loss_weight", "0", "--model.koleo_proto_weight", "0"])


def step_vs_peer(params: dict[str, Any], context=None) -> dict[str, Any]:
    """Run kind: :func:`compare_training_steps` for a pretraining config (``argv``) at ``num_prototypes``
    (default: the config's), ``batch``, ``rounds`` (5), ``warmup`` (2) and ``compile`` (false)."""
    arguments, model_config = _dino_only(params["argv"])
    if params.get("num_prototypes"):
        model_config.num_prototypes = model_config.num_patch_prototypes = params["num_prototypes"]
    return compare_training_steps(
        model_config,
        params["batch"],
        arguments.global_crops_size,
        arguments.local_crops_size,
        arguments.local_crops_number,
        rounds=params.get("rounds", 5),
        warmup=params.get("warmup", 2),
        compile=params.get("compile", False),
    )


def step_profile(params: dict[str, Any], context=None) -> dict[str, Any]:
    """Run kind: where ours and the lightly-based step spend their time (``torch.profiler``, CPU).

    ``params``: ``argv`` (a pretraining config), ``batch``, ``steps`` (3) profiled after 2 warm-up
    steps. Returns each step's self CPU milliseconds per operator (the ``top`` 20) and its total.
    """
    from torch.profiler import ProfilerActivity, profile

    arguments, model_config = _dino_only(params["argv"])
    n_steps = params.get("steps", 3)
    sizes = arguments.global_crops_size, arguments.local_crops_size, arguments.local_crops_number
    result = {}
    for name, step in _peer_steps(model_config, params["batch"], *sizes, torch.device("cpu")).items():
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(n_steps):
                step()
        events = sorted(profiler.key_averages(), key=lambda event: -event.self_cpu_time_total)
        result[name] = {
            "ms_per_step": sum(event.self_cpu_time_total for event in events) / 1000 / n_steps,
            "top": {event.key: event.self_cpu_time_total / 1000 / n_steps for event in events[: params.get("top", 20)]},
        }
    return result


def data_rate(params: dict[str, Any], context=None) -> dict[str, Any]:
    """Run kind: :func:`measure_data_pipeline` for a pretraining config (``argv``), ``batches`` (20)."""
    return measure_data_pipeline(params["argv"], params.get("batches", 20))


def feature_extraction(params: dict[str, Any], context=None) -> dict[str, Any]:
    """Run kind: :func:`compare_feature_extraction` on a backbone exported from a fresh model of a
    pretraining config (``argv``), ``batch`` (64) and ``rounds`` (5)."""
    import tempfile

    from hf_koleo.backbone_export import export_backbone
    from hf_koleo.modeling_koleo_dino import KoLeoDinoForPreTraining

    arguments, model_config = _dino_only(params["argv"])
    with tempfile.TemporaryDirectory() as folder:
        export_backbone(KoLeoDinoForPreTraining(model_config), folder, arguments.global_crops_size)
        return compare_feature_extraction(folder, params.get("batch", 64), params.get("rounds", 5))


def measure_data_pipeline(argv: list[str], n_batches: int = 20) -> dict[str, Any]:
    """Images per second of stream -> decode -> multi-crop -> device photometric, for a run config.

    ``argv`` is what ``scripts/pretrain.py`` would get (e.g. ``["--config", "configs/demo.yaml"]``).
    The first batch (worker start-up) is not timed.
    """
    from accelerate import Accelerator

    from hf_koleo.training.arguments import parse_pretraining_args
    from hf_koleo.training.checkpoint import TrainerState
    from hf_koleo.training.pipeline import build_pipeline

    arguments, model_config = parse_pretraining_args(argv)
    pipeline = build_pipeline(arguments, model_config, Accelerator(cpu=True))
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


def _make_ours(model_config, device: torch.device, compile: bool = False):
    from hf_koleo.modeling_koleo_dino import KoLeoDinoForPreTraining
    from hf_koleo.training.run_setup import compile_model

    model = KoLeoDinoForPreTraining(model_config).train().to(device)
    if compile:
        compile_model(model, scope="model")  # what --compile true --compile_scope model trains with
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step(global_crops, local_crops):
        output = model(global_crops, local_crops, teacher_temperature=0.04)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        model.update_teacher(0.996)
        return output.loss

    return step


def _make_lightly(model_config, device: torch.device, compile: bool = False):
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
    if compile:  # every module the step calls, as a user of lightly would compile them
        for module in (student_backbone, student_head, teacher_backbone, teacher_head, criterion):
            module.compile()
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


def _peer_steps(model_config, batch, global_size, local_size, n_local, device, compile=False):
    """``{"ours": step, "lightly": step}``, each a call of one training step on the same random crops."""
    torch.manual_seed(0)
    global_crops = torch.randn(batch, 2, 3, global_size, global_size, device=device)
    local_crops = torch.randn(batch, n_local, 3, local_size, local_size, device=device)
    steps = {"ours": _make_ours(model_config, device, compile), "lightly": _make_lightly(model_config, device, compile)}
    return {name: functools.partial(step, global_crops, local_crops) for name, step in steps.items()}


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


def compare_training_steps(
    model_config,
    batch: int,
    global_size: int,
    local_size: int,
    n_local: int,
    rounds: int = 5,
    warmup: int = 2,
    device: str | torch.device | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Our full DINO step vs a step built from lightly's DINOLoss/DINOProjectionHead, alternately.

    Same backbone (a stock ``Dinov2Model`` of ``model_config.backbone_config``), same head sizes,
    same crops, same fused AdamW, both teachers batched over the two global views; iBOT and KoLeo
    terms off so both compute the same DINO objective. On ``device`` (default: the GPU when there is
    one); every timing waits for the device. Returns img/s of each and the median per-round ratio
    (ours / lightly). ``compile``: both steps ``torch.compile``d (ours as one graph, lightly's
    modules each), the warm-up paying the compilation.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = _peer_steps(model_config, batch, global_size, local_size, n_local, device, compile)
    seconds = alternate(steps, rounds, warmup, device)
    ratios = [lightly / ours for ours, lightly in zip(seconds["ours"], seconds["lightly"])]
    return {
        "batch": batch,
        **_step_settings(model_config),
        "n_local": n_local,
        "device": str(device),
        "compiled": compile,
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
    with torch.no_grad():
        calls = {"exported": lambda: exported(pixel_values=pixels), "stock": lambda: stock(pixel_values=pixels)}
        seconds = alternate(calls, rounds, 1, torch.device("cpu"))
    return {
        "batch": batch,
        "image_size": size,
        "exported_images_per_second": batch / statistics.median(seconds["exported"]),
        "stock_images_per_second": batch / statistics.median(seconds["stock"]),
        "ratio": statistics.median(seconds["stock"]) / statistics.median(seconds["exported"]),
        "seconds": seconds,
    }


def _measured(row: dict | None) -> bool:
    return bool(row) and "error" not in row


def _timing_cells(row: dict) -> list[str]:
    """Median seconds and peak extra MiB of a timing row; a failed row's error in both."""
    if "error" in row:
        return [row["error"], row["error"]]
    return [f"{row['seconds_median']:.3f}", f"{row['peak_extra_mib']:.0f}"]


def _koleo_runs(results: dict[str, Any]) -> dict[tuple[int, str], dict]:
    return {(row["num_prototypes"], row["implementation"]): row for row in results.get("koleo", [])}


def _data_headroom(results: dict[str, Any]) -> tuple[dict, dict, float] | None:
    """The data row, the first measured step and pipeline img/s over that step's; None unless both were measured."""
    steps = [row for row in results.get("step", []) if _measured(row)]
    data = results.get("data")
    if not (_measured(data) and steps):
        return None
    return data, steps[0], data["images_per_second"] / steps[0]["ours_images_per_second"]


def benchmark_sections(results: dict[str, Any]) -> dict[str, list[str]]:
    """The generated parts of ``docs/benchmarks.md``, by name: each a table (or the targets list).

    ``results``: ``{"koleo": [rows], "dino_ibot": [rows], "step": [rows], "data": row, "features": row}``
    (:func:`load_results`); a row that failed holds its parameters and ``error``.
    """
    sections: dict[str, list[str]] = {}
    koleo = _koleo_runs(results)
    rows = []
    for size in dict.fromkeys(size for size, _ in koleo):
        blocked, dense = (koleo.get((size, name), {"error": "-"}) for name in ("blocked", "dense"))
        ratio = "-"
        if _measured(blocked) and _measured(dense):
            ratio = f"{blocked['seconds_median'] / dense['seconds_median']:.2f}"
        rows.append([str(size), *_timing_cells(blocked), *_timing_cells(dense), ratio])
    dinov2 = KOLEO_IMPLEMENTATIONS["dense"]
    if rows:
        sections["koleo"] = markdown_table(
            ["K", "ours (blocked) s", "ours peak MiB", f"{dinov2} s", f"{dinov2} peak MiB", "time ours ÷ DINOv2"], rows
        )
    if results.get("dino_ibot"):
        rows = [[str(row["num_prototypes"]), str(row["batch"]), *_timing_cells(row)] for row in results["dino_ibot"]]
        sections["dino_ibot"] = markdown_table(["K", "batch", "s", "peak MiB"], rows)
    if results.get("step"):
        rows = []
        for row in results["step"]:
            if "error" in row:
                cells = [row["error"], "", ""]
            else:
                images_per_second = row["ours_images_per_second"], row["lightly_images_per_second"]
                cells = [*(f"{value:.1f}" for value in images_per_second), f"{row['speedup_median']:.2f}×"]
            rows.append([str(row.get("K", row.get("num_prototypes"))), str(row["batch"]), *cells])
        header = ["K", "batch", "ours img/s", "lightly img/s", "median ratio (ours / lightly)"]
        sections["step"] = markdown_table(header, rows)
    if headroom := _data_headroom(results):
        data, step, ratio = headroom
        pipeline = f"{data['images_per_second']:.0f} (workers {data['num_workers']}, batch {data['batch_size']})"
        sections["data"] = markdown_table(
            ["pipeline img/s (stream → decode → multi-crop → photometric)", "step img/s", "headroom"],
            [[pipeline, f"{step['ours_images_per_second']:.1f} (K = {step['K']})", f"{ratio:.1f}×"]],
        )
    features = results.get("features")
    if _measured(features):
        rates = [f"{features[key]:.1f}" for key in ("exported_images_per_second", "stock_images_per_second")]
        sections["features"] = markdown_table(
            ["exported img/s", "stock img/s", "ratio"], [[*rates, f"{features['ratio']:.2f}×"]]
        )
    if results.get("unique_curve"):
        eps_values = list(next(row["unique"] for row in results["unique_curve"] if "unique" in row))
        rows = []
        for row in results["unique_curve"]:
            if "error" in row:
                cells = [row["error"], *[""] * len(eps_values)]
            else:
                cells = [f"{row['seconds']:.1f}", *[f"{row['unique'][eps]:,}" for eps in eps_values]]
            rows.append([f"{row['num_prototypes']:,}", f"{row['groups']:,}", *cells])
        header = ["K", "groups", "s", *[f"unique@{eps}" for eps in eps_values]]
        sections["unique_curve"] = markdown_table(header, rows)
    sections["targets"] = verdict_list(check_targets(results))
    return sections


SECTION_TITLES = {
    "koleo": "KoLeo-proto forward + backward",
    "dino_ibot": "DINO + iBOT loss forward + backward",
    "step": "One training step: ours vs a lightly-based step, alternately in one process",
    "data": "Data pipeline vs what the training step consumes",
    "features": "Feature extraction: exported backbone vs stock Dinov2Model",
    "unique_curve": "Unique prototypes of a merged set (the collapse diagnostic's worst case)",
    "targets": "Targets",
}

# Which part of the suite each run kind measures.
KIND_SECTIONS = {
    "koleo_timing": "koleo",
    "dino_ibot_timing": "dino_ibot",
    "step_vs_peer": "step",
    "data_rate": "data",
    "feature_extraction": "features",
    "unique_curve_timing": "unique_curve",
}


def load_results(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The suite's results from its records: lists for the tables, one row for data and features."""
    results: dict[str, Any] = {"machine": distinct(r["environment"]["machine"] for r in records)}
    for record in records:
        section = KIND_SECTIONS[record["kind"]]
        row = record["result"] if record["status"] == "done" else {**record["params"], "error": record["error"]}
        if section in ("data", "features"):
            results[section] = row
        else:
            results.setdefault(section, []).append(row)
    return results


def write_report(spec, records: list[dict[str, Any]], left_out: dict[str, str], report_dir: Path) -> list[Path]:
    """The generated parts of ``benchmarks.md`` in ``report_dir`` (the text around them is kept)."""
    path = report_dir / "benchmarks.md"
    header = ["# Benchmarks", "", f"Tables generated from the records in `{spec.folder('records', '')}`."]
    write_generated(path, benchmark_sections(load_results(records)), header, SECTION_TITLES)
    return [path]


def check_targets(results: dict[str, Any]) -> list[dict[str, str]]:
    """The suite's targets as verdicts (``claim``, ``verdict`` met / NOT met, ``evidence``: the measured
    number and the target); a target whose measurement is missing or failed is left out."""

    def verdict(claim: str, met: bool, evidence: str) -> dict[str, str]:
        return {"claim": claim, "verdict": "met" if met else "NOT met", "evidence": evidence}

    koleo = _koleo_runs(results)
    verdicts = []
    if koleo:
        largest = max(size for size, _ in koleo)
        blocked = koleo.get((largest, "blocked"))
        if _measured(blocked):
            mib = blocked["peak_extra_mib"]
            claim = f"KoLeo-proto at K = {largest}"
            verdicts.append(verdict(claim, mib < 1024, f"{mib:.0f} MiB extra peak memory (target < 1024 MiB)"))
    if _measured(koleo.get((8192, "blocked"))) and _measured(koleo.get((8192, "dense"))):
        ours, dense = koleo[(8192, "blocked")]["seconds_median"], koleo[(8192, "dense")]["seconds_median"]
        claim = "KoLeo-proto at K = 8192 no slower than the DINOv2 algorithm"
        verdicts.append(verdict(claim, ours <= dense, f"{ours:.3f} s vs {dense:.3f} s"))
    for row in results.get("step", []):
        if _measured(row):
            claim = f"Full step at K = {row['K']} >= 1.2x the lightly-based step"
            verdicts.append(verdict(claim, row["speedup_median"] >= 1.2, f"{row['speedup_median']:.2f}x"))
    if found := _data_headroom(results):
        _, _, headroom = found
        claim = "Data pipeline >= 2x the step's demand (demo config)"
        verdicts.append(verdict(claim, headroom >= 2, f"{headroom:.1f}x"))
    if _measured(results.get("features")):
        ratio = results["features"]["ratio"]
        claim = "Exported backbone feature extraction = stock Dinov2Model"
        verdicts.append(verdict(claim, 0.95 <= ratio <= 1.05, f"{ratio:.2f}x"))
    return verdicts
