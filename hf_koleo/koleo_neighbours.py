"""KoLeo-proto's nearest-neighbour search without the K x K work at every step.

The exact search (:func:`hf_koleo.losses.nearest_neighbours`) computes all K² prototype
similarities; at K = 16,384 that is a gigabyte of similarities a step, and it dominates a CPU
step. Prototypes move slowly, so :class:`NeighbourCandidates` does that search only every
``refresh_every`` steps and keeps, for each prototype, its ``m`` nearest others (the candidates),
the distance to its (m+1)-th nearest (the boundary) and the unit prototypes of that moment (the
reference). Every step then ranks only each row's candidates (K x m distances, fixed shapes, no
host sync) and takes the nearest.

**When the choice is exact.** Let ``moved_k`` be how far unit prototype ``k`` moved since the
refresh. A prototype ``k`` outside row ``i``'s candidates was at least ``boundary_i`` away then,
so now it is at least ``boundary_i - moved_i - moved_k >= boundary_i - moved_i - max(moved)``
away (triangle inequality). Row ``i``'s choice is therefore *certified* the exact nearest
neighbour whenever its distance is at most that bound; the fraction of certified rows is reported
with the loss (1.0: the same neighbours as the exact search). Either way only the chosen distances
are differentiated, so the gradient is exact for the neighbours used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import koleo_from_neighbours, similarity_blocks, without_autocast

# Error bound of a similarity of unit vectors computed in bfloat16 (inputs rounded to 8 significant
# bits, 2 x 2**-9, and the result rounded once more, 2**-8): 2**-7, used to keep the boundary a bound.
BFLOAT16_SIMILARITY_ERROR = 2.0**-7


@torch.compiler.disable  # eager even in a compiled forward, so that full_precision holds
@torch.no_grad()
def nearest_candidates(
    unit_vectors: torch.Tensor, m: int, block_size: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``m`` nearest other rows (nearest first) and a lower bound of its distance to any other.

    A blocked search, as :func:`hf_koleo.losses.nearest_neighbours` (extra memory ``block_size *
    K``). ``dtype`` ``torch.bfloat16`` halves the memory traffic of the K² similarities (1.7x
    faster on a CPU with AVX512-BF16); the candidates are then the nearest up to its rounding, and
    the boundary is lowered by the rounding bound, so that every row outside the candidates is
    still at least ``boundary`` away. With ``m >= K - 1`` every other row is a candidate and the
    boundary is inf.

    Returns:
        ``(candidates (K, m') long, boundary (K,))`` with ``m' = min(m, K - 1)``.
    """
    n_rows = unit_vectors.shape[0]
    if n_rows < 2:
        raise ValueError(f"nearest neighbours need at least 2 vectors, got {n_rows}")
    search = unit_vectors.detach().to(dtype)
    slack = BFLOAT16_SIMILARITY_ERROR if dtype == torch.bfloat16 else 0.0
    m = min(m, n_rows - 1)
    keep = min(m + 1, n_rows - 1)
    candidates = torch.empty(n_rows, m, dtype=torch.long, device=search.device)
    boundary = torch.full((n_rows,), float("inf"), device=search.device)  # float32
    for start, stop, block in similarity_blocks(search, block_size):
        similarities, indices = block.topk(keep, dim=1)
        candidates[start:stop] = indices[:, :m]
        if keep > m:
            boundary[start:stop] = (2.0 - 2.0 * (similarities[:, m].float() + slack)).clamp(min=0.0).sqrt()
    return candidates, boundary


class NeighbourCandidates(nn.Module):
    """The candidate lists of one set of ``(K, d)`` prototypes (see the module docstring).

    Its buffers are saved with the model, so a resumed run ranks the same candidates as the run it
    continues.
    """

    def __init__(self, num_prototypes: int, dim: int, candidates: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype  # of the refresh's search
        width = min(candidates, num_prototypes - 1)
        self.register_buffer("candidates", torch.zeros(num_prototypes, width, dtype=torch.long))
        self.register_buffer("boundary", torch.zeros(num_prototypes))
        self.register_buffer("reference", torch.zeros(num_prototypes, dim))

    @torch.no_grad()
    def refresh(self, unit_vectors: torch.Tensor) -> None:
        """The exact search: new candidates, boundaries and reference, in place."""
        candidates, boundary = nearest_candidates(unit_vectors, self.candidates.shape[1], dtype=self.dtype)
        self.candidates.copy_(candidates)
        self.boundary.copy_(boundary)
        self.reference.copy_(unit_vectors.detach())

    @torch.no_grad()
    def choose(self, unit_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(neighbour index (K,), certified (K,) bool)``: the nearest candidate of each row, and
        whether it is provably the nearest of all rows."""
        search = unit_vectors.detach().float()
        with without_autocast(search.device):
            # Products and a sum, not a batched matmul: IEEE fp32 whatever the matmul precision (TF32).
            similarities = (search[:, None, :] * search[self.candidates]).sum(dim=-1)
            best_similarity, best = similarities.max(dim=1)
            index = self.candidates.gather(1, best[:, None]).squeeze(1)
            distance = (2.0 - 2.0 * best_similarity).clamp(min=0.0).sqrt()
            moved = torch.linalg.vector_norm(search - self.reference, dim=1)
        return index, distance <= self.boundary - moved - moved.max()


def koleo_proto_with_candidates(
    prototypes: torch.Tensor, cache: NeighbourCandidates, refresh: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """KoLeo-proto of ``(K, d)`` prototypes with neighbours from ``cache`` (refreshed first when
    ``refresh``); returns the loss and the fraction of certified-exact neighbours (a 0-d tensor)."""
    unit_vectors = F.normalize(prototypes, p=2, dim=-1)
    if refresh:
        cache.refresh(unit_vectors)
    neighbour_index, certified = cache.choose(unit_vectors)
    return koleo_from_neighbours(unit_vectors, neighbour_index), certified.float().mean()


__all__ = ["NeighbourCandidates", "koleo_proto_with_candidates", "nearest_candidates"]
