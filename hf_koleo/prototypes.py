"""Partial prototype collapse diagnostics (arXiv 2410.14060, section 3).

All functions take prototypes as a ``(K, d)`` tensor (rows are L2-normalised here) and work in
row blocks, so K = 65536 never builds a ``K x K`` matrix.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .losses import full_precision, nearest_neighbours, search_block_size

if TYPE_CHECKING:
    from .modeling_koleo_dino import KoLeoDinoForPreTraining

DEFAULT_EPS_VALUES = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4)
NN_DISTANCE_QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
TRACKED_QUANTILES = (0.01, 0.1, 0.5, 0.9)  # logged with every prototype-statistics row
TRACKED_EPS = (0.01, 0.025, 0.05, 0.1)  # unique counts logged while training (the trainer's default, the frozen head)


def _unit_rows(prototypes: torch.Tensor) -> torch.Tensor:
    if prototypes.dim() != 2 or prototypes.shape[0] < 1:
        raise ValueError(f"prototypes must be a non-empty (K, d) matrix, got {tuple(prototypes.shape)}")
    rows = prototypes.detach()
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    return F.normalize(rows, p=2, dim=-1)


def _compress(parents: torch.Tensor) -> torch.Tensor:
    """Point every node at its root (pointer jumping; parents only ever point to smaller ids)."""
    while True:
        grandparents = parents[parents]
        if torch.equal(grandparents, parents):
            return parents
        parents = grandparents


def _union_edges(parents: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Union the edges ``first[e] -- second[e]`` into the forest ``parents`` (vectorised): each round
    hooks the larger root of every edge whose ends differ under the smallest root it meets."""
    while True:
        roots = _compress(parents)
        first_roots, second_roots = roots[first], roots[second]
        differ = first_roots != second_roots
        if not bool(differ.any()):
            return roots
        smaller = torch.minimum(first_roots, second_roots)[differ]
        larger = torch.maximum(first_roots, second_roots)[differ]
        parents = roots.scatter_reduce(0, larger, smaller, reduce="amin")


@torch.no_grad()
def unique_prototype_curve(
    prototypes: torch.Tensor,
    eps_values: Sequence[float] = DEFAULT_EPS_VALUES,
    block_size: int | None = None,
) -> dict[float, int]:
    """Unique prototypes at each ``eps`` from one blocked pass over the pairwise distances.

    Two L2-normalised prototypes are linked when their Euclidean distance is below ``eps``; the
    number of unique prototypes is the number of connected components of that graph.

    A block of rows meets only the columns before its end (every link is seen once, from its later
    end), and those columns are already joined into components by the earlier blocks: the block's
    similarities are reduced to their maximum per component, and only the (row, component) pairs
    above the threshold become edges. A collapsed set (most rows linked to thousands of others) thus
    costs about what a healthy one does; K = 65,536 needs no ``K x K`` matrix.

    Returns:
        ``{eps: n_unique}`` in the order of ``eps_values``.
    """
    eps_values = [float(eps) for eps in eps_values]
    for eps in eps_values:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
    unit_rows = _unit_rows(prototypes)
    n_rows = unit_rows.shape[0]
    block_size = block_size or search_block_size(n_rows, n_rows)
    # ||a - b|| < eps  <=>  a.b > 1 - eps^2 / 2 for unit vectors.
    thresholds = [1.0 - eps * eps / 2.0 for eps in eps_values]
    parents = [torch.arange(n_rows, device=unit_rows.device) for _ in eps_values]
    for start in range(0, n_rows, block_size):
        stop = min(start + block_size, n_rows)
        with full_precision(unit_rows.device):
            similarities = unit_rows[:stop] @ unit_rows[start:stop].t()  # (earlier columns, block rows)
        similarities[start:stop].diagonal().fill_(-math.inf)  # a row is not its own link
        nearest = similarities.amax(dim=0)  # (block,)
        rows = torch.arange(start, stop, device=unit_rows.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)  # "in beta"
            for position, threshold in enumerate(thresholds):
                if not bool((nearest > threshold).any()):
                    continue
                roots = _compress(parents[position])
                components, component_of = torch.unique(roots[:stop], return_inverse=True)
                closest = similarities.new_full((components.shape[0], stop - start), -math.inf)
                closest.index_reduce_(0, component_of, similarities, "amax")  # (components, block rows)
                component, row = (closest > threshold).nonzero(as_tuple=True)
                parents[position] = _union_edges(roots, components[component], rows[row])
    return {eps: int(_compress(forest).unique().numel()) for eps, forest in zip(eps_values, parents)}


def count_unique_prototypes(prototypes: torch.Tensor, eps: float = 0.025) -> int:
    """Connected components of the graph linking normalised prototypes closer than ``eps``."""
    return unique_prototype_curve(prototypes, [eps])[float(eps)]


@torch.no_grad()
def nearest_neighbour_distances(prototypes: torch.Tensor) -> torch.Tensor:
    """``(K,)`` Euclidean distance from each normalised prototype to its nearest other one."""
    return nearest_neighbours(_unit_rows(prototypes))[1]


def distance_quantiles(distances: torch.Tensor, quantiles: Sequence[float] = NN_DISTANCE_QUANTILES) -> dict[str, float]:
    """``{"q0.5": median, ...}`` of a 1-D tensor of distances."""
    levels = torch.tensor(list(quantiles), dtype=torch.float64)
    values = torch.quantile(distances.double().cpu(), levels)
    return {f"q{level:g}": float(value) for level, value in zip(quantiles, values)}


@torch.no_grad()
def cosine_to_prototypes(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` cosine similarities between features ``(N, d)`` and prototypes ``(K, d)``."""
    unit_rows = _unit_rows(prototypes)
    return F.normalize(features.detach().to(unit_rows.dtype), p=2, dim=-1) @ unit_rows.t()


def utilisation(assignments: torch.Tensor, num_prototypes: int) -> dict[str, float]:
    """How many prototypes are the arg-max for at least one sample, and the assignment entropy.

    Args:
        assignments: ``(N,)`` prototype indices (e.g. arg-max of teacher logits).
        num_prototypes: K.

    Returns:
        ``used`` (count), ``used_fraction``, ``assignment_entropy`` (nats) and
        ``assignment_perplexity`` (``exp(entropy)``, the effective number of prototypes in use).
    """
    counts = torch.bincount(assignments.flatten().cpu(), minlength=num_prototypes).double()
    entropy = marginal_entropy(counts / counts.sum())
    used = int((counts > 0).sum())
    return {
        "used": used,
        "used_fraction": used / num_prototypes,
        "assignment_entropy": entropy,
        "assignment_perplexity": math.exp(entropy),
    }


def marginal_entropy(probabilities: torch.Tensor) -> float:
    """Entropy (nats) of a distribution over prototypes given as ``(K,)`` or ``(N, K)``.

    With ``(N, K)`` rows (e.g. teacher softmax outputs) the marginal latent class distribution
    is their mean. Its maximum is ``log K``; partial collapse can keep it high because duplicated
    prototypes share the mass.
    """
    marginal = probabilities.double()
    if marginal.dim() == 2:
        marginal = marginal.mean(dim=0)
    marginal = marginal / marginal.sum()
    return max(0.0, float(-(marginal * marginal.clamp(min=1e-300).log()).sum()))


def prototype_statistics(
    prototypes: torch.Tensor,
    features: torch.Tensor | None = None,
    eps_values: Sequence[float] = DEFAULT_EPS_VALUES,
    eps: float = 0.025,
    temperature: float = 0.1,
) -> dict[str, Any]:
    """Every collapse statistic of one ``(K, d)`` prototype matrix.

    Args:
        prototypes: ``(K, d)``.
        features: optional ``(N, d)`` head embeddings (see
            ``KoLeoDinoForPreTraining.head_embeddings``) for utilisation and the marginal
            latent class distribution.
        eps_values: the eps curve.
        eps: the headline eps for ``unique_prototypes``.
        temperature: softmax temperature of the marginal latent class distribution.
    """
    curve = unique_prototype_curve(prototypes, sorted({*eps_values, eps}))
    distances = nearest_neighbour_distances(prototypes)
    num_prototypes = prototypes.shape[0]
    statistics: dict[str, Any] = {
        "num_prototypes": num_prototypes,
        "eps": eps,
        "unique_prototypes": curve[float(eps)],
        "unique_fraction": curve[float(eps)] / num_prototypes,
        "unique_curve": {f"{key:g}": value for key, value in curve.items()},
        "nn_distance_quantiles": distance_quantiles(distances),
        "nn_distance_mean": float(distances.double().mean()),
    }
    if features is not None:
        cosine = cosine_to_prototypes(features, prototypes)
        statistics["utilisation"] = utilisation(cosine.argmax(dim=1), num_prototypes)
        statistics["marginal_entropy"] = marginal_entropy(F.softmax(cosine / temperature, dim=-1))
        statistics["max_marginal_entropy"] = math.log(num_prototypes)
    return statistics


def _load_model(model_or_path: KoLeoDinoForPreTraining | str | os.PathLike) -> KoLeoDinoForPreTraining:
    from .modeling_koleo_dino import KoLeoDinoForPreTraining

    if isinstance(model_or_path, KoLeoDinoForPreTraining):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return KoLeoDinoForPreTraining.from_pretrained(model_or_path)
    raise TypeError(
        "prototype_report expects a KoLeoDinoForPreTraining or the path of one saved with "
        f"save_pretrained, got {type(model_or_path).__name__}"
    )


@torch.no_grad()
def prototype_report(
    model_or_path: KoLeoDinoForPreTraining | str | os.PathLike,
    features: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    eps_values: Sequence[float] = DEFAULT_EPS_VALUES,
    eps: float = 0.025,
    branches: Sequence[str] = ("teacher", "student"),
) -> dict[str, Any]:
    """Collapse report of a pretraining model (object or ``save_pretrained`` directory).

    Args:
        model_or_path: a :class:`KoLeoDinoForPreTraining` or a path to one.
        features: optional ``(N, head_bottleneck_size)`` teacher head embeddings.
        pixel_values: optional ``(N, C, H, W)`` images; the teacher embeds them when
            ``features`` is not given. Either enables utilisation and marginal entropy.
        eps_values: eps values of the unique-prototype curve.
        eps: the headline eps.
        branches: which of ``"teacher"`` / ``"student"`` to report.

    Returns:
        ``{"<branch>/cls": statistics, "<branch>/patch": statistics (separate patch head only)}``
        with the entries of :func:`prototype_statistics`, plus ``"config"`` (K, eps).
    """
    model = _load_model(model_or_path)
    for branch in branches:
        if branch not in ("teacher", "student"):
            raise ValueError(f"branches may contain 'teacher' and 'student', got {branch!r}")
    if features is None and pixel_values is not None:
        features = model.head_embeddings(pixel_values, branch="teacher")
    report: dict[str, Any] = {
        "config": {
            "num_prototypes": model.config.num_prototypes,
            "eps": eps,
            "n_images": None if features is None else int(features.shape[0]),
        },
    }
    for branch in branches:
        for head_name, head in model.prototype_heads(branch).items():
            head_features = features if (branch == "teacher" and head_name == "cls") else None
            report[f"{branch}/{head_name}"] = prototype_statistics(
                head.prototype_vectors(),
                head_features,
                eps_values,
                eps,
                model.config.student_temperature,
            )
    return report


@torch.no_grad()
def prototype_metrics(model, assignment_counts: torch.Tensor, eps_values) -> dict[str, Any]:
    """Scalars for the trackers: unique prototypes per eps, NN-distance quantiles, utilisation.

    Args:
        model: a :class:`KoLeoDinoForPreTraining`.
        assignment_counts: ``(K,)`` teacher CLS arg-max counts since the last call.
    """
    metrics: dict[str, Any] = {}
    for branch in ("teacher", "student"):
        for head_name, head in model.prototype_heads(branch).items():
            prefix = f"prototypes/{branch}_{head_name}"
            for eps, count in unique_prototype_curve(head.prototypes, eps_values).items():
                metrics[f"{prefix}/unique@{eps:g}"] = count
            quantiles = distance_quantiles(nearest_neighbour_distances(head.prototypes), TRACKED_QUANTILES)
            metrics.update({f"{prefix}/nn_distance_{key}": value for key, value in quantiles.items()})
    usage = utilisation(
        torch.repeat_interleave(torch.arange(len(assignment_counts)), assignment_counts.cpu()), len(assignment_counts)
    )
    metrics.update({f"prototypes/teacher_cls/{key}": value for key, value in usage.items()})
    return metrics
