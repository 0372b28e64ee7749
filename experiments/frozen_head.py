"""Partial prototype collapse with a frozen backbone: only the DINO head trains (arXiv 2410.14060, sec. 3).

The paper's argument: the DINO objective asks the marginal latent class distribution to match a
(centred, near uniform) target, and the head can meet it by moving prototypes alone, so many
prototypes drift onto each other (*partial prototype collapse*). Freezing the backbone isolates
that mechanism: nothing but the head (MLP + prototypes) learns, from two augmented views of each
image, with the DINO loss, an EMA teacher and EMA centring, with or without KoLeo-proto.

Two frozen "backbones" produce the head's inputs:

* :class:`PixelViews`: raw pixels, ``(S * S)``-d flattened grayscale views cut on the fly
  (random resized crop, flip, brightness) with the library's batched crop kernels;
* :class:`FeatureBankViews`: a trained backbone (any ``AutoModel`` folder, e.g. an exported
  ``Dinov2Model``), run once over ``n_views`` augmented views per image
  (:func:`build_backbone_views`); each step takes two different cached views of an image.

:func:`run_frozen_head` trains one head and returns its metrics over time; :func:`frozen_head_run`
is the run kind of ``configs/experiments/frozen_head.yaml`` (backbones x variants x seeds), and
:mod:`experiments.frozen_head_report` renders its records.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hf_koleo import DINOHead, koleo_proto_loss
from hf_koleo.data.augment import CROP_ATTEMPTS, crop_and_resize, random_resized_boxes
from hf_koleo.data.counter_rng import sample_keys, uniforms
from hf_koleo.data.decoded import load_decoded
from hf_koleo.data.sources import cache_dir
from hf_koleo.evaluation.clusters import cluster_metrics
from hf_koleo.koleo_neighbours import NeighbourCandidates, koleo_proto_with_candidates, neighbour_refresh
from hf_koleo.losses import batch_centre, centred_teacher_probs, dino_loss, ema_centre, nearest_neighbours
from hf_koleo.modeling_koleo_dino import ema_update_
from hf_koleo.prototypes import (
    DEFAULT_EPS_VALUES,
    TRACKED_EPS,
    count_unique_prototypes,
    distance_quantiles,
    marginal_entropy,
    nearest_neighbour_distances,
    unique_prototype_curve,
    utilisation,
)

from .runner import RunContext, Unfinished

logger = logging.getLogger(__name__)

TRACKED_QUANTILES = (0.0, 0.1, 0.5, 0.9)
CLUSTER_KEYS = ("clusters_used", "nmi", "ari", "purity", "clusters_for_coverage_mean")
# Fashion-MNIST pixel statistics (those of configs/fashion_mnist.yaml), to centre the raw pixels.
PIXEL_MEAN, PIXEL_STD = 0.286, 0.353
# Uniforms per view: the crop box attempts, a flip coin and a brightness factor.
_DRAWS_PER_VIEW = 4 * CROP_ATTEMPTS + 2


@dataclass
class ViewAugmentation:
    """The views both backbones see: random resized crop, horizontal flip, brightness."""

    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    brightness: float = 0.4

    def __call__(self, images: torch.Tensor, extents: torch.Tensor, keys: torch.Tensor, n_views: int, size: int):
        """``n_views`` views of each image, a pure function of its key.

        Args:
            images: ``(batch, C, S, S)`` uint8 canvases.
            extents: ``(batch, 2)`` image ``(height, width)`` on its canvas.
            keys: ``(batch,)`` int64 keys from :func:`sample_keys`.
            n_views: views per image.
            size: output side.

        Returns:
            ``(batch, n_views, C, size, size)`` float in [0, 1].
        """
        batch = images.shape[0]
        draws = uniforms(keys, n_views * _DRAWS_PER_VIEW, "global_crops").reshape(batch, n_views, -1)
        boxes = random_resized_boxes(
            draws[..., : 4 * CROP_ATTEMPTS].reshape(batch * n_views, -1),
            extents.repeat_interleave(n_views, dim=0),
            list(self.crop_scale),
            list(self.crop_ratio),
        ).reshape(batch, n_views, 4)
        flips = draws[..., 4 * CROP_ATTEMPTS] < self.flip_probability
        crops = crop_and_resize(images.float() / 255.0, boxes, flips, size, extents)
        factor = 1.0 - self.brightness + 2.0 * self.brightness * draws[..., 4 * CROP_ATTEMPTS + 1]
        return (crops * factor[..., None, None, None]).clamp(0.0, 1.0)


class Views(Protocol):
    """What the head trains on: ``n_images`` images, each giving ``dim``-d inputs."""

    n_images: int
    dim: int
    labels: torch.Tensor | None  # (n_images,) class ids, for the cluster metrics (None: unlabelled)

    def views(self, indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``(batch, 2, dim)``: two augmented views of each indexed image."""

    def clean(self, indices: torch.Tensor) -> torch.Tensor:
        """``(batch, dim)``: the un-augmented image (for arg-max utilisation)."""


@dataclass
class PixelViews:
    """Raw pixels as the frozen backbone: flattened, centred grayscale crops at the image's own size."""

    images: torch.Tensor  # (N, 1, S, S) uint8
    extents: torch.Tensor  # (N, 2)
    labels: torch.Tensor | None = None
    augmentation: ViewAugmentation = field(default_factory=ViewAugmentation)

    @property
    def n_images(self) -> int:
        return self.images.shape[0]

    @property
    def dim(self) -> int:
        return self.images.shape[-1] * self.images.shape[-2]

    def views(self, indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        crops = self.augmentation(self.images[indices], self.extents[indices], keys, 2, self.images.shape[-1])
        return (crops.flatten(2) - PIXEL_MEAN) / PIXEL_STD

    def clean(self, indices: torch.Tensor) -> torch.Tensor:
        return (self.images[indices].flatten(1).float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


@dataclass
class FeatureBankViews:
    """Cached features of ``V`` augmented views per image; a step draws two different ones."""

    bank: torch.Tensor  # (N, V, D)
    clean_features: torch.Tensor  # (N, D)
    labels: torch.Tensor | None = None

    @property
    def n_images(self) -> int:
        return self.bank.shape[0]

    @property
    def dim(self) -> int:
        return self.bank.shape[-1]

    def views(self, indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        n_views = self.bank.shape[1]
        draws = uniforms(keys, 2, "global_crops")
        first = (draws[:, 0] * n_views).long()
        second = (first + 1 + (draws[:, 1] * (n_views - 1)).long()) % n_views  # never the first
        return self.bank[indices[:, None], torch.stack([first, second], dim=1)]

    def clean(self, indices: torch.Tensor) -> torch.Tensor:
        return self.clean_features[indices]


def load_pixel_views(source: str, limit: int | None = None) -> PixelViews:
    """The first ``limit`` images of a data source (e.g. ``fashion_mnist:train``) as :class:`PixelViews`."""
    decoded = load_decoded(source, 28)
    stop = len(decoded) if limit is None else min(limit, len(decoded))
    return PixelViews(decoded.images[:stop, :1].contiguous(), decoded.extents[:stop], decoded.labels[:stop])


def _model_fingerprint(model_dir: Path) -> list:
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model_dir.iterdir()) if p.is_file()]


def _processor_geometry(processor) -> tuple[int, list[float], list[float]]:
    """Input side, mean and std the backbone was trained with, from its image processor."""
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        size = processor.crop_size["height"]
    else:
        size = processor.size.get("height") or processor.size["shortest_edge"]
    return int(size), list(processor.image_mean), list(processor.image_std)


@torch.no_grad()
def build_backbone_views(
    model_dir: str | Path,
    source: str,
    n_images: int,
    n_views: int,
    seed: int = 0,
    batch_size: int = 256,
    use_cache: bool = True,
) -> FeatureBankViews:
    """Run a frozen backbone once over ``n_views`` augmented views and the clean view of each image.

    Views come from the 28 px canvases with :class:`ViewAugmentation`, resized to the backbone's
    input side and normalised with its image processor's mean and std; the feature is the CLS
    token of ``last_hidden_state`` (as ``hf_koleo.evaluation.features`` takes it). The clean view
    is the whole image resized the same way (bilinear, no crop). Cached under
    ``$HF_KOLEO_CACHE/frozen_head/`` keyed by the model files and every argument.

    Returns:
        :class:`FeatureBankViews` with ``bank`` ``(n_images, n_views, hidden)``.
    """
    from transformers import AutoImageProcessor, AutoModel

    model_dir = Path(model_dir)
    augmentation = ViewAugmentation()
    key = json.dumps([_model_fingerprint(model_dir), source, n_images, n_views, seed, asdict(augmentation)])
    cache_path = cache_dir() / "frozen_head" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    if use_cache and cache_path.exists():
        tensors = load_file(str(cache_path))
        n_cached = tensors["bank"].shape[0]
        return FeatureBankViews(tensors["bank"], tensors["clean"], load_decoded(source, 28).labels[:n_cached])
    backbone = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval()
    size, mean, std = _processor_geometry(AutoImageProcessor.from_pretrained(model_dir))
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    decoded = load_decoded(source, 28)
    n_images = min(n_images, len(decoded))
    full_boxes = torch.cat([torch.zeros(n_images, 2), decoded.extents[:n_images].flip(1).float()], dim=1)

    def embed(pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, size, size) in [0, 1] -> (n, hidden)
        return backbone(pixel_values=(pixels - mean_t) / std_t).last_hidden_state[:, 0].float()

    banks, cleans = [], []
    for start in range(0, n_images, batch_size):
        indices = torch.arange(start, min(start + batch_size, n_images))
        images, extents = decoded.images[indices], decoded.extents[indices]
        views = augmentation(images, extents, sample_keys(seed, 0, indices), n_views, size)
        banks.append(embed(views.flatten(0, 1)).reshape(len(indices), n_views, -1))
        whole = crop_and_resize(
            images.float() / 255.0, full_boxes[indices, None], torch.zeros(len(indices), 1, dtype=torch.bool), size
        )
        cleans.append(embed(whole[:, 0]))
        logger.info("backbone views: %d / %d images", indices[-1] + 1, n_images)
    bank_views = FeatureBankViews(torch.cat(banks), torch.cat(cleans), decoded.labels[:n_images])
    if use_cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        staging = cache_path.with_name(cache_path.name + ".tmp")
        save_file({"bank": bank_views.bank, "clean": bank_views.clean_features}, str(staging))
        staging.replace(cache_path)
    return bank_views


@dataclass
class FrozenHeadConfig:
    """One head-only DINO run (defaults: the experiment's first measurement, K = 4,096, batch 256, lr 5e-4)."""

    num_prototypes: int = 4096
    hidden_size: int = 1024
    bottleneck_size: int = 256
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    centre_momentum: float = 0.9
    teacher_momentum: float = 0.996
    learning_rate: float = 5e-4
    weight_decay: float = 0.04
    batch_size: int = 256
    steps: int = 3000
    eval_every: int = 100
    eval_images: int = 4096
    koleo_proto_weight: float = 0.0
    koleo_proto_search: str = "exact"  # or "candidates" (KoLeoDinoConfig's meaning)
    koleo_proto_candidates: int = 16
    koleo_proto_refresh_every: int = 10
    koleo_proto_update_every: int = 0
    koleo_proto_refresh_dtype: str = "float32"
    koleo_proto_movers: int = 0
    koleo_proto_repair: int = 0
    seed: int = 0
    init_std: float = 0.02  # KoLeoDinoConfig.initializer_range


@dataclass
class HeadState:
    """What a head-only DINO run carries from step to step."""

    student: DINOHead
    teacher: DINOHead
    optimizer: torch.optim.Optimizer
    centre: torch.Tensor  # (1, K)
    neighbours: NeighbourCandidates | None = None  # KoLeo-proto's candidate lists


def init_state(in_features: int, config: FrozenHeadConfig) -> HeadState:
    """A 3-layer student head initialised as ``KoLeoDinoForPreTraining`` does (truncated normal), its EMA
    teacher (an exact copy), AdamW and a zero centre, seeded by ``config.seed``."""
    torch.manual_seed(config.seed)
    student = DINOHead(
        in_features, config.num_prototypes, config.hidden_size, config.bottleneck_size, init_std=config.init_std
    )
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    neighbours = None
    if config.koleo_proto_search == "candidates":
        neighbours = NeighbourCandidates.from_config(config, config.num_prototypes, config.bottleneck_size)
    return HeadState(student, teacher, optimizer, torch.zeros(1, config.num_prototypes), neighbours)


def head_step(
    state: HeadState, views: torch.Tensor, config: FrozenHeadConfig, step: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DINO step on the head alone: teacher targets, student loss (+ KoLeo-proto), AdamW, EMA, centre.

    Args:
        views: ``(batch, 2, dim)`` two views of each image; the teacher sees both, the student
            predicts each from the other.
        step: the step's number (the candidate search refreshes as ``neighbour_refresh`` says).

    Returns:
        ``(dino_loss, koleo_proto_loss)`` detached scalars (KoLeo-proto is computed only when
        its weight is positive, else 0).
    """
    batch, n_views, dim = views.shape
    flat = views.reshape(batch * n_views, dim)
    with torch.no_grad():
        teacher_logits = state.teacher(flat)
    teacher_probs = centred_teacher_probs(teacher_logits, state.centre, config.teacher_temperature)
    student_logits = state.student(flat).reshape(batch, n_views, -1)
    loss = dino_loss(student_logits, teacher_probs.reshape(batch, n_views, -1), config.student_temperature)
    koleo = torch.zeros(())
    if config.koleo_proto_weight > 0 and state.neighbours is not None:
        refresh = neighbour_refresh(step, config.koleo_proto_refresh_every, config.koleo_proto_update_every)
        koleo, _ = koleo_proto_with_candidates(state.student.prototypes, state.neighbours, refresh)
    elif config.koleo_proto_weight > 0:
        koleo = koleo_proto_loss(state.student.prototypes)
    state.optimizer.zero_grad(set_to_none=True)
    (loss + config.koleo_proto_weight * koleo).backward()
    state.optimizer.step()
    ema_update_(state.teacher, state.student, config.teacher_momentum)  # the model's own EMA
    with torch.no_grad():
        new_centre, count = batch_centre(teacher_logits)
        state.centre = ema_centre(state.centre, new_centre, config.centre_momentum, count)
    return loss.detach(), koleo.detach()


@torch.no_grad()
def head_metrics(
    state: HeadState, clean_inputs: torch.Tensor, config: FrozenHeadConfig, labels: torch.Tensor | None = None
) -> dict[str, Any]:
    """Collapse metrics of the teacher head (the one DINO keeps) on a fixed set of clean inputs.

    Returns:
        ``unique`` ``{eps: count}`` at :data:`TRACKED_EPS`, ``student_unique@0.025``,
        ``nn_distance`` quantiles, ``used`` (prototypes that are the teacher's arg-max for at
        least one input), ``assignment_perplexity`` and ``marginal_perplexity`` (``exp`` of the
        entropy of the mean centred, sharpened teacher distribution: the marginal latent class
        distribution the loss matches). With KoLeo-proto's candidate search, ``koleo_certified``
        (the fraction of the student's prototypes whose neighbour is certified exact now) and
        ``koleo_agreement`` (the fraction whose candidate choice is the exact search's neighbour).
        With the inputs' ``labels``, ``clusters``: the teacher's arg-max scored as a clustering
        (NMI, ARI, purity, clusters covering 90 % of a class, see ``hf_koleo.evaluation.clusters``).
    """
    prototypes = state.teacher.prototypes
    logits = state.teacher(clean_inputs)
    assignments = logits.argmax(dim=1)
    use = utilisation(assignments, config.num_prototypes)
    probs = centred_teacher_probs(logits, state.centre, config.teacher_temperature)
    metrics = {
        "unique": {f"{eps:g}": count for eps, count in unique_prototype_curve(prototypes, TRACKED_EPS).items()},
        "student_unique@0.025": count_unique_prototypes(state.student.prototypes, 0.025),
        "nn_distance": distance_quantiles(nearest_neighbour_distances(prototypes), TRACKED_QUANTILES),
        "used": use["used"],
        "assignment_perplexity": use["assignment_perplexity"],
        "marginal_perplexity": math.exp(marginal_entropy(probs)),
    }
    if labels is not None:
        scores = cluster_metrics(assignments, labels)
        metrics["clusters"] = {key: scores[key] for key in CLUSTER_KEYS}
    if state.neighbours is not None and bool(state.neighbours.boundary.any()):  # searched at least once
        unit_vectors = F.normalize(state.student.prototypes, p=2, dim=-1)
        chosen, certified = state.neighbours.choose(unit_vectors)
        exact, _ = nearest_neighbours(unit_vectors)
        metrics["koleo_certified"] = float(certified.float().mean())
        metrics["koleo_agreement"] = float((chosen == exact).float().mean())
    return metrics


def run_frozen_head(
    views: Views,
    config: FrozenHeadConfig,
    log: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: Path | None = None,
    seconds_left: float = math.inf,
) -> dict[str, Any]:
    """Train one DINO head on a frozen backbone's views and track its prototypes.

    Images are drawn uniformly with replacement (``torch.Generator`` seeded by ``config.seed``);
    the views of image ``i`` at step ``t`` are a pure function of ``(seed, t, i)``. Metrics
    (:func:`head_metrics`) are taken at step 0, every ``eval_every`` steps and at the end, on the
    clean views of the first ``eval_images`` images.

    With a ``checkpoint`` path the run is resumable: if the file exists the run continues from it
    (the same steps as an uninterrupted run, to the last bit), and when the next ``eval_every``
    steps would not fit in ``seconds_left`` (judged by the last stretch) it saves its state there
    at a metrics row and raises :class:`~experiments.runner.Unfinished`; a finished run deletes it.

    Returns:
        ``{"config", "history": [{"step", "dino_loss", "koleo_proto_loss", **head_metrics}],
        "final_eps_curve": {eps: unique} over DEFAULT_EPS_VALUES, "seconds", "train_seconds"}``; the losses are
        means over the steps since the previous row (None at step 0); the seconds are summed over
        the calls a resumed run took.
    """
    state = init_state(views.dim, config)
    generator = torch.Generator().manual_seed(config.seed)
    clean_inputs = views.clean(torch.arange(min(config.eval_images, views.n_images)))
    labels = None if views.labels is None else views.labels[: len(clean_inputs)]
    labels = labels if labels is not None and bool((labels >= 0).all()) else None
    progress = {"step": 0, "history": [], "seconds": 0.0, "eval_seconds": 0.0}
    if checkpoint is not None and checkpoint.exists():
        progress = load_head_checkpoint(checkpoint, state, generator, config)
        logger.info("frozen head: resumed at step %d from %s", progress["step"], checkpoint)
    first, history, progress_seconds = progress["step"], progress["history"], progress["seconds"]
    loss_sum, koleo_sum, since = torch.zeros(()), torch.zeros(()), 0
    start, eval_seconds, stretch_start = time.perf_counter(), progress["eval_seconds"], time.perf_counter()
    for step in range(first, config.steps + 1):
        if (step % config.eval_every == 0 or step == config.steps) and not (history and history[-1]["step"] == step):
            eval_start = time.perf_counter()
            row = {
                "step": step,
                "dino_loss": float(loss_sum) / since if since else None,
                "koleo_proto_loss": float(koleo_sum) / since if since else None,
                **head_metrics(state, clean_inputs, config, labels),
            }
            history.append(row)
            loss_sum, koleo_sum, since = torch.zeros(()), torch.zeros(()), 0
            eval_seconds += time.perf_counter() - eval_start
            if log is not None:
                log(row)
            now = time.perf_counter()
            next_stretch_fits = now - start + 1.2 * (now - stretch_start) <= seconds_left
            if checkpoint is not None and first < step < config.steps and not next_stretch_fits:
                progress = {"step": step, "history": history, "eval_seconds": eval_seconds}
                progress["seconds"] = progress_seconds + now - start
                save_head_checkpoint(checkpoint, state, generator, config, progress)
                raise Unfinished(f"stopped at step {step} of {config.steps} (budget)")
            stretch_start = now
        if step == config.steps:
            break
        indices = torch.randint(views.n_images, (config.batch_size,), generator=generator)
        loss, koleo = head_step(state, views.views(indices, sample_keys(config.seed, step, indices)), config, step)
        loss_sum, koleo_sum, since = loss_sum + loss, koleo_sum + koleo, since + 1
    curve = unique_prototype_curve(state.teacher.prototypes, DEFAULT_EPS_VALUES)
    seconds = progress_seconds + time.perf_counter() - start
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # done: a rerun (its record deleted) starts afresh
    return {
        "config": asdict(config),
        "history": history,
        "final_eps_curve": {f"{eps:g}": count for eps, count in curve.items()},
        "seconds": seconds,
        "train_seconds": seconds - eval_seconds,  # the steps alone, metrics excluded
    }


def save_head_checkpoint(
    path: Path, state: HeadState, generator: torch.Generator, config: FrozenHeadConfig, progress: dict[str, Any]
) -> None:
    """Everything a head-only run needs to go on exactly (atomic: a killed save leaves the old file)."""
    saved = {
        "config": asdict(config),
        "student": state.student.state_dict(),
        "teacher": state.teacher.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "centre": state.centre,
        "neighbours": None if state.neighbours is None else state.neighbours.state_dict(),
        "generator": generator.get_state(),
        "progress": progress,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    torch.save(saved, staging)
    os.replace(staging, path)


def load_head_checkpoint(
    path: Path, state: HeadState, generator: torch.Generator, config: FrozenHeadConfig
) -> dict[str, Any]:
    """Restore :func:`save_head_checkpoint`'s state in place; returns the saved progress."""
    saved = torch.load(path, weights_only=True)
    if saved["config"] != asdict(config):
        raise ValueError(f"{path} was saved by a run with other head settings; delete it to start this run afresh")
    state.student.load_state_dict(saved["student"])
    state.teacher.load_state_dict(saved["teacher"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.centre = saved["centre"]
    if state.neighbours is not None:
        state.neighbours.load_state_dict(saved["neighbours"])
    generator.set_state(saved["generator"])
    return saved["progress"]


# Views are built once per process and backbone (a feature bank takes minutes), for every run on it.
_VIEWS: dict[str, tuple[Views, dict[str, Any]]] = {}


def backbone_views(backbone: dict[str, Any]) -> tuple[Views, dict[str, Any]]:
    """The views of a frozen backbone and a description of them, built once per process.

    ``backbone``: ``model`` (``"pixels"``, or a folder ``AutoModel`` loads with its image processor),
    ``data`` (a source), ``n_images`` (default: all for pixels), ``n_views`` (cached views per image,
    models only), ``cache`` (default true), ``description``.
    """
    key = json.dumps(backbone, sort_keys=True)
    if key not in _VIEWS:
        start = time.perf_counter()
        if backbone["model"] == "pixels":
            views: Views = load_pixel_views(backbone["data"], limit=backbone.get("n_images"))
        else:
            if not Path(backbone["model"]).is_dir():
                raise FileNotFoundError(
                    f"backbone {backbone['model']!r} is not a folder (export one with scripts/pretrain.py)"
                )
            views = build_backbone_views(
                backbone["model"],
                backbone["data"],
                n_images=backbone["n_images"],
                n_views=backbone["n_views"],
                use_cache=backbone.get("cache", True),
            )
        info = {
            "description": backbone.get("description", backbone["model"]),
            "dim": views.dim,
            "n_images": views.n_images,
            "mean_cosine_to_mean": feature_concentration(views.clean(torch.arange(min(views.n_images, 4096)))),
            "setup_seconds": time.perf_counter() - start,
        }
        _VIEWS[key] = (views, info)
    return _VIEWS[key]


def frozen_head_run(params: dict[str, Any], context: RunContext) -> dict[str, Any]:
    """Run kind ``frozen_head``: one head on one frozen backbone's views.

    ``params``: ``backbone`` (see :func:`backbone_views`) and ``head`` (:class:`FrozenHeadConfig`
    fields). The result is :func:`run_frozen_head`'s, with ``backbone``: the views' description and
    the head settings.
    """
    views, info = backbone_views(params["backbone"])
    config, name = FrozenHeadConfig(**params["head"]), context.run.name

    def report(row: dict[str, Any]) -> None:
        logger.info(
            "%s step %d: unique %s used %d loss %s", name, row["step"], row["unique"], row["used"], row["dino_loss"]
        )

    result = run_frozen_head(views, config, report, context.work_dir / "head_checkpoint.pt", context.seconds_left)
    return {"backbone": {**info, "head": asdict(config)}, **result}


def feature_concentration(features: torch.Tensor) -> float:
    """Mean cosine between ``(n, d)`` features and their mean: 1 when they all point one way."""
    unit = F.normalize(features.float(), dim=1)
    return float((unit @ F.normalize(unit.mean(dim=0), dim=0)).mean())
