"""Measurements behind ``docs/benchmarks.md``: time and peak memory of the losses and the collapse
diagnostic, the data pipeline's rate, and the side-by-side timings of :mod:`experiments.peers`.

Run kinds of ``configs/experiments/benchmarks.yaml`` (``koleo_timing``, ``dino_ibot_timing``,
``step_vs_peer``, ``data_rate``, ``feature_extraction``; each run in a fresh process, so peak memory
is the run's own). Every ratio and img/s figure is computed from the timings the record carries
(``seconds``), so a reader can recompute it; :mod:`experiments.benchmarks_report` turns the records
into the generated tables and targets of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from experiments.koleo_reference import dinov2_koleo_loss
from experiments.peers import compare_feature_extraction, compare_training_steps, peer_steps
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
    for name, step in peer_steps(model_config, params["batch"], *sizes, torch.device("cpu")).items():
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
