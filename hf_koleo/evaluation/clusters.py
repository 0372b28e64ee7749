"""The teacher's prototypes as a clustering: which prototype wins each image, scored against the labels.

DINO's head is a clustering in disguise: the teacher's arg-max over K prototypes assigns every image
to one of K clusters. :func:`teacher_assignments` computes that assignment from a pretraining
checkpoint and the backbone's CLS features (those ``extract_features`` caches; the arg-max of the
raw teacher logits, as training counts prototypes used), and
:func:`cluster_metrics` scores it against the labels: clusters used, NMI and ARI (the scores
scikit-learn calls ``normalized_mutual_info_score`` with arithmetic averaging and
``adjusted_rand_score``), purity, how many clusters it takes to cover 90 % of each class, and for each
class how much of it sits in clusters it dominates (a rare class absorbed into frequent classes'
clusters dominates none).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch


@torch.no_grad()
def teacher_assignments(
    model_or_path, cls_features: torch.Tensor, batch_size: int = 4096, head: str = "cls"
) -> torch.Tensor:
    """``(n,)`` arg-max prototype of the teacher's head for backbone CLS features ``(n, hidden)``.

    Args:
        model_or_path: a :class:`~hf_koleo.KoLeoDinoForPreTraining` or a checkpoint folder holding one.
        cls_features: the teacher backbone's CLS token (``pooler_output``), e.g. ``FeatureSet.cls`` of
            the exported backbone.
    """
    from ..modeling_koleo_dino import KoLeoDinoForPreTraining

    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        model = KoLeoDinoForPreTraining.from_pretrained(model_or_path)
    teacher_head = model.prototype_heads("teacher")[head].float()
    rows = []
    for start in range(0, cls_features.shape[0], batch_size):  # the logits training takes its arg-max of
        rows.append(teacher_head(cls_features[start : start + batch_size].float()).argmax(dim=1))
    return torch.cat(rows).cpu()


def contingency(assignments: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(used clusters, classes)`` counts (float64) and the ids of the used clusters."""
    clusters, cluster_index = torch.unique(assignments.long().cpu(), return_inverse=True)
    classes, class_index = torch.unique(labels.long().cpu(), return_inverse=True)
    table = torch.zeros(len(clusters), len(classes), dtype=torch.float64)
    table.index_put_((cluster_index, class_index), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    return table, clusters


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def normalized_mutual_information(table: torch.Tensor) -> float:
    """NMI with the arithmetic mean of the two entropies (1 when either side has one value only)."""
    n = table.sum()
    h_clusters, h_classes = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_clusters == 0.0 or h_classes == 0.0:
        return 1.0 if h_clusters == h_classes else 0.0
    joint = table[table > 0] / n
    outer = (table.sum(1, keepdim=True) @ table.sum(0, keepdim=True))[table > 0] / n**2
    mutual = float((joint * (joint / outer).log()).sum())
    return max(0.0, mutual / ((h_clusters + h_classes) / 2))


def adjusted_rand_index(table: torch.Tensor) -> float:
    """Hubert and Arabie's adjusted Rand index (1: the same partition; about 0: chance)."""

    def pairs(counts: torch.Tensor) -> float:
        return float((counts * (counts - 1) / 2).sum())

    n = float(table.sum())
    index, rows, columns = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * columns / (n * (n - 1) / 2) if n > 1 else 0.0
    maximum = (rows + columns) / 2
    if maximum == expected:  # both partitions trivial in the same way
        return 1.0
    return (index - expected) / (maximum - expected)


def cluster_metrics(assignments: torch.Tensor, labels: torch.Tensor, coverage: float = 0.9) -> dict[str, Any]:
    """How well the teacher's clusters match the classes.

    Returns:
        ``clusters_used``; ``nmi``; ``ari``; ``purity`` (share of images in their cluster's majority
        class); ``clusters_for_coverage`` (per class: the fewest clusters holding ``coverage`` of its
        images) and its mean; ``own_clusters`` (per class: clusters where it is the majority) and
        ``in_own_clusters`` (per class: share of its images in those clusters; 0 = absorbed).
    """
    if len(assignments) != len(labels) or len(labels) == 0:
        raise ValueError(f"need one assignment per label, got {len(assignments)} and {len(labels)}")
    table, _ = contingency(assignments, labels)
    classes = torch.unique(labels.long().cpu()).tolist()
    majority = table.argmax(dim=1)  # each cluster's majority class (ties: the lowest)
    per_class_cover, own, in_own = {}, {}, {}
    for column, label in enumerate(classes):
        counts = table[:, column].sort(descending=True).values
        needed = math.ceil(coverage * float(counts.sum()) - 1e-9)
        per_class_cover[label] = int((counts.cumsum(0) < needed).sum()) + 1
        mine = majority == column
        own[label] = int(mine.sum())
        in_own[label] = float(table[mine, column].sum() / table[:, column].sum())
    return {
        "n_images": len(labels),
        "clusters_used": table.shape[0],
        "nmi": normalized_mutual_information(table),
        "ari": adjusted_rand_index(table),
        "purity": float(table.max(dim=1).values.sum() / table.sum()),
        "coverage": coverage,
        "clusters_for_coverage": per_class_cover,
        "clusters_for_coverage_mean": sum(per_class_cover.values()) / len(per_class_cover),
        "own_clusters": own,
        "in_own_clusters": in_own,
    }


__all__ = [
    "adjusted_rand_index",
    "cluster_metrics",
    "contingency",
    "normalized_mutual_information",
    "teacher_assignments",
]
