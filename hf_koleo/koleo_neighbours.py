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

**Updated between searches** (``update``, fixed shapes, no host sync). If a prototype's nearest
neighbour drifted to one of its candidates' own candidates, the lists could be renewed from those
between two full searches: each row ranks its ``m`` candidates and their ``m²`` candidates
(``K x (m + m²)`` distances instead of ``K²``) and keeps the ``m`` nearest. The certificate stays a
bound: a prototype outside the new list was either ranked and dropped (so at least the
``(m+1)``-th ranked distance away now) or outside the old list (so at least ``boundary_i - moved_i -
max(moved)`` away now); the new boundary is the smaller of the two, measured from the prototypes of
now (the new reference). Measured on real runs it hardly helps (+0.1 to +0.8 points of exact choices at a
full search every 25-100 steps, for a third of a full search's time: docs/benchmarks.md): the
neighbours the lists miss come from farther away, so it is off by default.

**Tighter, and repaired** (both fixed shapes, no host sync). ``max(moved)`` is set by the few
prototypes that moved most, so the bound above certifies few rows a few steps after a refresh.
With ``movers = s`` the ``s`` prototypes that moved most are compared with every row each step (a
``K x s`` product): they become candidates of every row, and ``max(moved)`` in the bound becomes the
``(s+1)``-th largest move. With ``repair = r`` the ``r`` rows nearest to failing the bound get an
exact search of their own each step (an ``r x K`` product) and count as certified. Rows the bound
does not reach keep the nearest candidate, as before. On real runs both raise the certified
fraction but hardly the exact one (the prototypes all drift; a few fast ones are not the cause of
stale choices: docs/benchmarks.md), so both are off by default; the refresh period is the lever.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .losses import chord_distance, full_precision, koleo_from_neighbours, similarity_blocks, without_autocast

# Error bound of a similarity of unit vectors computed in bfloat16 (inputs rounded to 8 significant
# bits, 2 x 2**-9, and the result rounded once more, 2**-8): 2**-7, used to keep the boundary a bound.
BFLOAT16_SIMILARITY_ERROR = 2.0**-7


def multiplies_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports it, a CPU
    with AVX512-BF16 or AMX. Elsewhere bf16 products are emulated and cost more than float32 ones
    (K = 16,384 on an AVX-512 Xeon without either: 2.9x; docs/benchmarks.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


def search_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """The dtype a full search runs in: ``dtype`` itself (a ``torch.dtype`` or its name), or for
    ``"auto"`` bfloat16 where :func:`multiplies_bfloat16`, else float32."""
    if dtype == "auto":
        return torch.bfloat16 if multiplies_bfloat16(device) else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


@torch.compiler.disable  # eager even in a compiled forward, so that full_precision holds
@torch.no_grad()
def nearest_candidates(
    unit_vectors: torch.Tensor, m: int, block_size: int | None = None, dtype: torch.dtype | str = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``m`` nearest other rows (nearest first) and a lower bound of its distance to any other.

    A blocked search, as :func:`hf_koleo.losses.nearest_neighbours` (extra memory ``block_size *
    K``). ``dtype`` ``torch.bfloat16`` halves the memory traffic of the K² similarities (1.7x
    faster on a CPU with AVX512-BF16, 1.7-2.9x *slower* on one without); ``"auto"`` picks it only
    where the hardware multiplies bf16 (:func:`search_dtype`). In bf16 the candidates are the
    nearest up to its rounding, and the boundary is lowered by the rounding bound, so that every row
    outside the candidates is still at least ``boundary`` away. With ``m >= K - 1`` every other row
    is a candidate and the boundary is inf.

    Returns:
        ``(candidates (K, m') long, boundary (K,))`` with ``m' = min(m, K - 1)``.
    """
    n_rows = unit_vectors.shape[0]
    if n_rows < 2:
        raise ValueError(f"nearest neighbours need at least 2 vectors, got {n_rows}")
    dtype = search_dtype(dtype, unit_vectors.device)
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
            boundary[start:stop] = chord_distance(similarities[:, m].float() + slack)
    return candidates, boundary


class NeighbourCandidates(nn.Module):
    """The candidate lists of one set of ``(K, d)`` prototypes (see the module docstring).

    Its buffers are saved with the model, so a resumed run ranks the same candidates as the run it
    continues.
    """

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        candidates: int,
        dtype: torch.dtype | str = torch.float32,
        movers: int = 0,
        repair: int = 0,
    ) -> None:
        super().__init__()
        self.dtype = dtype  # of the refresh's search (or "auto": search_dtype)
        self.movers = min(movers, num_prototypes)  # prototypes that moved most, compared with every row
        self.repair = min(repair, num_prototypes)  # least-certain rows searched exactly each step
        width = min(candidates, num_prototypes - 1)
        self.register_buffer("candidates", torch.zeros(num_prototypes, width, dtype=torch.long))
        self.register_buffer("boundary", torch.zeros(num_prototypes))
        self.register_buffer("reference", torch.zeros(num_prototypes, dim))

    @classmethod
    def from_config(cls, config, num_prototypes: int, dim: int) -> NeighbourCandidates:
        """The lists a config's ``koleo_proto_*`` settings ask for (a ``KoLeoDinoConfig``, or any object
        with its ``koleo_proto_candidates``, ``_refresh_dtype``, ``_movers`` and ``_repair``)."""
        return cls(
            num_prototypes,
            dim,
            config.koleo_proto_candidates,
            config.koleo_proto_refresh_dtype,
            movers=config.koleo_proto_movers,
            repair=config.koleo_proto_repair,
        )

    @torch.no_grad()
    def refresh(self, unit_vectors: torch.Tensor) -> None:
        """The exact search: new candidates, boundaries and reference, in place."""
        candidates, boundary = nearest_candidates(unit_vectors, self.candidates.shape[1], dtype=self.dtype)
        self.candidates.copy_(candidates)
        self.boundary.copy_(boundary)
        self.reference.copy_(unit_vectors.detach())

    @torch.no_grad()
    def update(self, unit_vectors: torch.Tensor) -> None:
        """The cheap renewal from the candidates' candidates (module docstring): lists, boundaries and
        reference, in place; the certificate stays sound."""
        search = unit_vectors.detach().float()
        n_rows, m = self.candidates.shape
        with without_autocast(search.device):
            moved = self._moved(search)
            outside = self.boundary - moved - moved.max()  # anything never ranked, now
            pool = torch.cat([self.candidates, self.candidates[self.candidates].reshape(n_rows, m * m)], dim=1)
            pool = pool.sort(dim=1).values  # repeats side by side
            similarities = candidate_similarities(search, pool)
            repeated = torch.zeros_like(pool, dtype=torch.bool)
            repeated[:, 1:] = pool[:, 1:] == pool[:, :-1]
            itself = pool == torch.arange(n_rows, device=pool.device)[:, None]
            similarities = similarities.masked_fill(repeated | itself, -float("inf"))
            best, position = similarities.topk(m + 1, dim=1)  # the old list alone holds m distinct others
            dropped = chord_distance(best[:, m])  # inf where nothing else was ranked
            self.candidates.copy_(pool.gather(1, position[:, :m]))
            self.boundary.copy_(torch.minimum(outside, dropped))
            self.reference.copy_(search)

    @torch.no_grad()
    def choose(self, unit_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(neighbour index (K,), certified (K,) bool)``: the nearest candidate of each row (the
        fast movers among them), and whether it is provably the nearest of all rows."""
        search = unit_vectors.detach().float()
        with without_autocast(search.device):
            similarities = candidate_similarities(search, self.candidates)
            best_similarity, best = similarities.max(dim=1)
            index = self.candidates.gather(1, best[:, None]).squeeze(1)
            moved = self._moved(search)
            if self.movers:
                index, best_similarity, others_moved = self._with_movers(search, moved, index, best_similarity)
            else:
                others_moved = moved.max()
            distance = chord_distance(best_similarity)
            margin = self.boundary - moved - others_moved - distance
            certified = margin >= 0
            if self.repair:
                rows = margin.topk(self.repair, largest=False).indices
                index[rows] = exact_similarities(search[rows], search, rows).argmax(dim=1)
                certified[rows] = True
        return index, certified

    def _moved(self, search: torch.Tensor) -> torch.Tensor:
        """How far each prototype moved since the candidates' reference, ``(K,)``."""
        return torch.linalg.vector_norm(search - self.reference, dim=1)

    def _with_movers(
        self, search: torch.Tensor, moved: torch.Tensor, index: torch.Tensor, best_similarity: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row compared with the ``movers`` prototypes that moved most; returns the new choice,
        its similarity, and the largest move among the others (the bound's new ``max(moved)``)."""
        n_rows = search.shape[0]
        ranked = moved.topk(min(self.movers + 1, n_rows))
        fast = ranked.indices[: self.movers]
        others_moved = ranked.values[self.movers] if self.movers < n_rows else moved.new_zeros(())
        to_fast = exact_similarities(search, search[fast], fast, rows_are_columns=False)  # (K, s)
        best_fast, which = to_fast.max(dim=1)
        closer = best_fast > best_similarity
        return torch.where(closer, fast[which], index), torch.maximum(best_similarity, best_fast), others_moved


def candidate_similarities(search: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``(K, m)`` IEEE fp32 similarities of each row to its ``m`` candidates.

    On a CPU a sampled product (``torch.sparse.sampled_addmm``: only the K x m dot products, reading
    the rows where they lie; K = 16,384, m = 16, d = 64: 2.5 ms against 50 ms for gathering the
    candidates and summing products). Elsewhere products and a sum, which no matmul precision setting
    (TF32) can round and which a compiled graph keeps.
    """
    if search.device.type == "cpu" and candidates.shape[1] <= search.shape[0]:  # the pattern fits the K x K matrix
        return _sampled_dot_products(search, candidates)
    return (search[:, None, :] * search[candidates]).sum(dim=-1)


@torch.compiler.disable  # eager, so that full_precision holds
def _sampled_dot_products(search: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    n_rows, m = candidates.shape
    row_starts = torch.arange(0, n_rows * m + 1, m, device=search.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": said once per process, to a training log
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        pattern = torch.sparse_csr_tensor(
            row_starts,
            candidates.reshape(-1),
            search.new_zeros(n_rows * m),  # zeros, not empty: beta = 0 still reads them (0 * NaN)
            size=(n_rows, n_rows),
            check_invariants=False,
        )  # each row keeps its candidates' order (nearest first) in the result
    with full_precision(search.device):
        return torch.sparse.sampled_addmm(pattern, search, search.t(), beta=0.0).values().view(n_rows, m)


@torch.compiler.disable  # eager even in a compiled forward, so that full_precision holds
def exact_similarities(
    rows: torch.Tensor, columns: torch.Tensor, positions: torch.Tensor, rows_are_columns: bool = True
) -> torch.Tensor:
    """IEEE fp32 ``rows @ columns.T`` with each prototype's similarity to itself set to -inf.

    ``positions``: where ``rows`` sit among the columns (``rows_are_columns``), or where ``columns``
    sit among the rows (otherwise), so that ``(i, positions[i])`` or ``(positions[j], j)`` is a
    prototype against itself.
    """
    with full_precision(rows.device):
        similarities = rows @ columns.t()
    own = torch.arange(positions.shape[0], device=rows.device)
    if rows_are_columns:
        similarities[own, positions] = -float("inf")
    else:
        similarities[positions, own] = -float("inf")
    return similarities


REFRESHES = ("full", "update", "none")  # what the candidate search does before a step's choice


def neighbour_refresh(step: int, refresh_every: int, update_every: int = 0) -> str:
    """``"full"`` (the exact search) every ``refresh_every`` steps, else ``"update"`` (from the
    candidates' candidates) every ``update_every`` steps (0: never), else ``"none"``; host arithmetic."""
    if step % refresh_every == 0:
        return "full"
    return "update" if update_every and step % update_every == 0 else "none"


def koleo_proto_with_candidates(
    prototypes: torch.Tensor, cache: NeighbourCandidates, refresh: str | bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """KoLeo-proto of ``(K, d)`` prototypes with neighbours from ``cache``, refreshed first as
    ``refresh`` says (one of :data:`REFRESHES`; ``True`` is ``"full"``, ``False`` ``"none"``); returns the
    loss and the fraction of certified-exact neighbours (a 0-d tensor)."""
    if isinstance(refresh, bool):
        refresh = "full" if refresh else "none"
    if refresh not in REFRESHES:
        raise ValueError(f"refresh must be one of {REFRESHES} or a bool, got {refresh!r}")
    unit_vectors = F.normalize(prototypes, p=2, dim=-1)
    if refresh == "full":
        cache.refresh(unit_vectors)
    elif refresh == "update":
        cache.update(unit_vectors)
    neighbour_index, certified = cache.choose(unit_vectors)
    return koleo_from_neighbours(unit_vectors, neighbour_index), certified.float().mean()


__all__ = [
    "REFRESHES",
    "NeighbourCandidates",
    "candidate_similarities",
    "koleo_proto_with_candidates",
    "multiplies_bfloat16",
    "nearest_candidates",
    "neighbour_refresh",
    "search_dtype",
]
