"""Partial prototype collapse with a frozen backbone: only the DINO head trains (arXiv 2410.14060, sec. 3).

The paper's argument: the DINO objective asks the marginal latent class distribution to match a
(centred, near uniform) target, and the head can meet it by moving prototypes alone, so many
prototypes drift onto each other (*partial prototype collapse*). Freezing the backbone isolates
that mechanism: nothing but the head (MLP + prototypes) learns, from two augmented views of each
image, with the DINO loss, an EMA teacher and EMA centring, with or without KoLeo-proto.

Two frozen "backbones" produce the head's inputs (:mod:`experiments.frozen_head_views`): raw pixels cut
into augmented views on the fly, or a trained backbone's features over cached augmented views.

:func:`run_frozen_head` trains one head and returns its metrics over time; :func:`frozen_head_run`
is the run kind of ``configs/experiments/frozen_head.yaml`` (backbones x variants x seeds), and
:mod:`experiments.frozen_head_report` renders its records (:mod:`experiments.frozen_head_k_report` those of
a K sweep).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hf_koleo import DINOHead, koleo_proto_loss
from hf_koleo.data.counter_rng import sample_keys
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

from .frozen_head_views import Views, backbone_views
from .runner import RunContext, Unfinished

logger = logging.getLogger(__name__)

TRACKED_QUANTILES = (0.0, 0.1, 0.5, 0.9)
CLUSTER_KEYS = ("clusters_used", "nmi", "ari", "purity", "clusters_for_coverage_mean")


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
