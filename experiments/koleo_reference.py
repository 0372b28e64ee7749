"""DINOv2's KoLeo algorithm: the peer that ``hf_koleo.losses.koleo_loss`` is checked and timed against.

DINOv2's ``KoLeoLoss`` (facebookresearch/dinov2, ``dinov2/loss/koleo_loss.py``; the regulariser of
Sablayrolles et al. 2018, "Spreading vectors for similarity search") L2-normalises the rows, builds
the full ``(K, K)`` dot-product matrix, fills its diagonal with -1, takes each row's arg-max, and
differentiates only the ``K`` distances to the chosen neighbours (``torch.nn.PairwiseDistance``).
Written here from that description.

How it differs from ours:

- search: one dense ``K x K`` similarity matrix (``K**2`` floats at once) where ours searches in row
  blocks (``block_size * K``); the differentiated part is the same ``K`` distances;
- regularisation: DINOv2 normalises with ``eps = 1e-8`` and measures ``||u_i - u_j + 1e-8||``
  (``PairwiseDistance`` adds its eps to every component of the difference); ours normalises with
  torch's default ``eps = 1e-12`` and measures ``||u_i - u_j||``. Both return
  ``-mean(log(d + 1e-8))``. ``pairwise_eps=0.0, normalize_eps=1e-12`` gives ours exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DINOV2_EPS = 1e-8


def dinov2_koleo_loss(
    vectors: torch.Tensor,
    eps: float = DINOV2_EPS,
    pairwise_eps: float = DINOV2_EPS,
    normalize_eps: float = DINOV2_EPS,
) -> torch.Tensor:
    """KoLeo by DINOv2's algorithm: dense similarity, arg-max without gradient, ``K`` distances.

    Args:
        vectors: ``(K, d)``, any scale (rows are normalised here).
        eps: added to each distance inside the log.
        pairwise_eps: added to each component of ``u_i - u_j`` before the norm (DINOv2's
            ``PairwiseDistance(2, eps=1e-8)``); 0 measures the plain distance, as ours does.
        normalize_eps: ``F.normalize``'s floor on the row norm.

    Returns:
        Scalar in the dtype of ``vectors``.
    """
    unit = F.normalize(vectors, p=2, dim=-1, eps=normalize_eps)
    # DINOv2 never differentiates the similarity matrix (only its arg-max is used); no_grad says so.
    with torch.no_grad():
        similarities = unit @ unit.t()  # (K, K): the memory cost of this algorithm
        similarities.fill_diagonal_(-1.0)  # unit vectors: every other similarity is >= -1
        neighbour_index = similarities.argmax(dim=1)
    distances = F.pairwise_distance(unit, unit[neighbour_index], p=2.0, eps=pairwise_eps)
    return -torch.log(distances + eps).mean()
