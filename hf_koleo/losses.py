"""The DINO-family losses as pure functions of tensors.

Shapes use ``batch`` for images, ``K`` for prototypes and ``d`` for the prototype (bottleneck)
dimension. Nothing here holds state: centres, EMA teachers and optimisers live in the model or
the trainer, which call these functions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Extra memory for the blocked nearest-neighbour search is about ``block_size * K`` floats; this
# many floats (128 MiB in float32) keeps K = 65536 well under 1 GiB while leaving the matmuls big
# enough to run at full speed on a CPU. A GPU gets 8x more (1 GiB), so K = 65536 takes 16 matmuls
# instead of 128 (each launch and max-reduction has a fixed cost there).
_SEARCH_BLOCK_ELEMENTS = 1 << 25
_SEARCH_BLOCK_ELEMENTS_GPU = 1 << 28

KOLEO_EPSILON = 1e-8


def _distributed_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all processes when ``torch.distributed`` is initialised."""
    if _distributed_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def dino_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temperature: float) -> torch.Tensor:
    """Cross-entropy between teacher and student views, averaged over every valid pair.

    Args:
        student_logits: ``(batch, n_student_crops, K)``; the first ``n_global`` crops are the same
            global views the teacher saw, in the same order, followed by the local crops.
        teacher_probs: ``(batch, n_global, K)`` centred and sharpened teacher distributions.
        student_temperature: divides the student logits before the softmax.

    Returns:
        Scalar: the mean over the batch and over all (teacher view ``t``, student view ``s``)
        pairs with ``s != t`` of ``-sum_k teacher_probs[t, k] * log_softmax(student[s] / T)[k]``.
    """
    batch, n_student, _ = student_logits.shape
    n_global = teacher_probs.shape[1]
    if teacher_probs.shape[0] != batch or teacher_probs.shape[2] != student_logits.shape[2]:
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} does not match student_logits {tuple(student_logits.shape)}"
        )
    if n_student < n_global or n_student < 2:
        raise ValueError(
            f"the student needs every teacher view plus at least one more, got {n_student} student "
            f"views for {n_global} teacher views"
        )
    # View-major (view, batch, K): contiguous when the views were stacked view-major, as the model
    # stacks them, so the pair losses are one matrix product and no (batch, views, K) copy is made.
    student_log_probs = F.log_softmax(student_logits.transpose(0, 1).float() / student_temperature, dim=-1)
    teacher_views = teacher_probs.transpose(0, 1).float()
    # (n_global, n_student) matrix of batch-averaged cross-entropies, one per view pair.
    pair_losses = -(teacher_views.reshape(n_global, -1) @ student_log_probs.reshape(n_student, -1).t()) / batch
    same_view = torch.eye(n_global, n_student, dtype=torch.bool, device=pair_losses.device)
    return pair_losses.masked_fill(same_view, 0.0).sum() / (n_global * n_student - n_global)


def max_masked_patches(n_patches: int, ratio_max: float) -> int:
    """The most patches one crop may have masked (``ratio_max`` of them, rounded up)."""
    return max(1, min(n_patches, math.ceil(ratio_max * n_patches)))


def masked_patch_slots(masks: torch.Tensor, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed number of patch slots for a batch, masked patches first, with loss weights.

    Static shapes instead of boolean indexing: the iBOT heads run on ``n_slots`` tokens whatever
    the masks, and slots that hold no masked patch get weight 0. No value is read on the host,
    so the step never waits for the device. With ``n_slots >= masks.sum()`` every masked patch
    has a slot; masked patches beyond ``n_slots`` (in image order) stay masked for the student
    but leave the loss.

    Args:
        masks: ``(n_images, n_patches)`` bool, True where a patch is masked.
        n_slots: slots for the whole batch (at most ``n_images * n_patches``).

    Returns:
        ``slot_index`` ``(n_slots,)`` long into the flattened ``(n_images * n_patches)`` patches,
        and ``slot_weights`` ``(n_slots,)`` float: each image's masked patches share
        ``1 / n_images`` equally (0 elsewhere), so the loss is a mean over images of a mean over
        their masked patches.
    """
    n_images, n_patches = masks.shape
    flat = masks.reshape(-1).bool()
    n_slots = min(n_slots, flat.numel())
    slot_index = torch.sort(flat.to(torch.uint8), descending=True, stable=True).indices[:n_slots]
    valid = flat[slot_index].float()
    image = torch.div(slot_index, n_patches, rounding_mode="floor")
    per_image = torch.zeros(n_images, device=masks.device).index_add_(0, image, valid)
    return slot_index, valid / per_image[image].clamp(min=1.0) / n_images


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    patch_weights: torch.Tensor,
    student_temperature: float,
) -> torch.Tensor:
    """iBOT masked-image-modelling loss over the masked patch tokens only.

    Args:
        student_patch_logits: ``(n_slots, K)`` student logits of the patch slots.
        teacher_patch_probs: ``(n_slots, K)`` teacher distributions of the same (unmasked) patches.
        patch_weights: ``(n_slots,)`` from :func:`masked_patch_slots` (0 for unmasked slots).
        student_temperature: divides the student logits before the softmax.

    Returns:
        Scalar: ``sum_i patch_weights[i] * CE(teacher_i, student_i)``.
    """
    if student_patch_logits.shape != teacher_patch_probs.shape:
        raise ValueError(
            f"student_patch_logits {tuple(student_patch_logits.shape)} and teacher_patch_probs "
            f"{tuple(teacher_patch_probs.shape)} must have the same shape"
        )
    log_probs = F.log_softmax(student_patch_logits.float() / student_temperature, dim=-1)
    cross_entropy = -(teacher_patch_probs.float() * log_probs).sum(dim=-1)
    return (cross_entropy * patch_weights).sum()


def centred_teacher_probs(
    teacher_logits: torch.Tensor, centre: torch.Tensor, teacher_temperature: float | torch.Tensor
) -> torch.Tensor:
    """DINO centring and sharpening: ``softmax((logits - centre) / T)`` over the last axis."""
    return F.softmax((teacher_logits.float() - centre) / teacher_temperature, dim=-1)


def batch_centre(teacher_logits: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean teacher logit over the (valid) rows of ``(n, K)`` on every process.

    Returns:
        ``(centre, count)``: ``(1, K)`` mean (zeros when no row is valid) and the number of rows
        it averages, a scalar tensor (never read on the host).
    """
    flat = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
    weights = flat.new_ones(flat.shape[0]) if valid is None else valid.reshape(-1).float()
    total = all_reduce_sum(weights @ flat)[None]
    count = all_reduce_sum(weights.sum())
    return total / count.clamp(min=1.0), count


def ema_centre(
    centre: torch.Tensor, new_centre: torch.Tensor, momentum: float, count: torch.Tensor | None = None
) -> torch.Tensor:
    """``momentum * centre + (1 - momentum) * new_centre``; unchanged when ``count`` is 0 or the result not finite."""
    updated = centre * momentum + new_centre * (1.0 - momentum)
    keep = ~torch.isfinite(updated).all()
    if count is not None:
        keep = keep | (count <= 0)
    return torch.where(keep, centre, updated)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temperature: float | torch.Tensor,
    n_iterations: int = 3,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher assignments (SwAV / DINOv2 centring), across all processes.

    Args:
        teacher_logits: ``(n_samples, K)`` local teacher logits.
        teacher_temperature: sharpening temperature (a float or a 0-d tensor).
        n_iterations: alternating normalisations.
        valid: optional ``(n_samples,)`` bool; other rows (empty iBOT slots) take no part and get
            all-zero rows. Every process runs the same collectives whatever its count.

    Returns:
        ``(n_samples, K)`` rows that sum to one, with prototype marginals pushed towards uniform
        over the global batch.
    """
    logits = teacher_logits.float() / teacher_temperature
    weights = logits.new_ones(logits.shape[0]) if valid is None else valid.reshape(-1).float()
    # Subtracting the global max is a no-op after normalisation but keeps exp() finite.
    global_max = logits.masked_fill(weights[:, None] == 0, -float("inf")).max().clone()
    if _distributed_world_size() > 1:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX)
    global_max = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
    scores = (torch.exp(logits - global_max) * weights[:, None]).t()  # (K, n_samples)
    n_prototypes = scores.shape[0]
    n_samples = all_reduce_sum(weights.sum()).clamp(min=1.0)
    scores /= all_reduce_sum(scores.sum()).clamp(min=1e-30)
    for _ in range(n_iterations):
        scores /= all_reduce_sum(scores.sum(dim=1, keepdim=True)).clamp(min=1e-30)
        scores /= n_prototypes
        scores /= scores.sum(dim=0, keepdim=True).clamp(min=1e-30)
        scores /= n_samples
    scores *= n_samples
    return scores.t()


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Full precision inside a mixed-precision forward: under bf16 autocast, similarities near 1 are
    rounded to steps of 2**-8 (distance steps of ~0.09), which hides which prototype is nearest."""
    if device.type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """IEEE fp32 for the nearest-neighbour searches: autocast off (:func:`without_autocast`), and fp32
    matrix products at ``"highest"`` precision even where the user allows TF32 or bf16 passes
    (``torch.set_float32_matmul_precision("high")``): TF32 keeps 10 mantissa bits, enough to flip
    which of two prototypes is nearer, or whether two are within eps of each other. Eager code only
    (the searches are excluded from compiled graphs). The setting is process-wide while the context
    is open, across a generator's ``yield`` too: its users consume it whole inside one function.
    """
    previous = torch.get_float32_matmul_precision()
    with without_autocast(device):
        if previous != "highest":
            torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            if previous != "highest":
                torch.set_float32_matmul_precision(previous)


def search_block_size(n_rows: int, n_columns: int, device: torch.device | str = "cpu") -> int:
    """Rows per block of a nearest-neighbour search over ``n_columns`` candidates."""
    budget = _SEARCH_BLOCK_ELEMENTS_GPU if torch.device(device).type == "cuda" else _SEARCH_BLOCK_ELEMENTS
    return max(1, min(n_rows, budget // max(1, n_columns)))


def similarity_blocks(search: torch.Tensor, block_size: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, rows[start:stop] @ rows.T)`` for consecutive row blocks of ``(K, d)`` rows, in
    full precision, each row's similarity to itself set to -inf (extra memory ``block_size * K``)."""
    n_rows = search.shape[0]
    block_size = block_size or search_block_size(n_rows, n_rows, search.device)
    with full_precision(search.device):
        for start in range(0, n_rows, block_size):
            stop = min(start + block_size, n_rows)
            block = search[start:stop] @ search.t()  # (block, K)
            block.diagonal(offset=start).fill_(-float("inf"))  # a row is not its own neighbour
            yield start, stop, block


@torch.compiler.disable  # eager even in a compiled forward, so that full_precision holds (see there)
@torch.no_grad()
def nearest_neighbours(unit_vectors: torch.Tensor, block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and distance to each row's nearest other row, without the ``K x K`` matrix.

    Args:
        unit_vectors: ``(K, d)`` L2-normalised rows.
        block_size: rows per block (extra memory ``block_size * K``); chosen automatically if None.

    Returns:
        ``(indices, distances)``, each ``(K,)``: for row ``i`` the row ``j != i`` maximising the
        cosine similarity (equivalently minimising the Euclidean distance) and that distance.
    """
    n_rows = unit_vectors.shape[0]
    if n_rows < 2:
        raise ValueError(f"nearest neighbours need at least 2 vectors, got {n_rows}")
    search = unit_vectors.detach()
    if search.dtype in (torch.float16, torch.bfloat16):
        search = search.float()
    indices = torch.empty(n_rows, dtype=torch.long, device=search.device)
    similarities = torch.empty(n_rows, dtype=search.dtype, device=search.device)
    for start, stop, block in similarity_blocks(search, block_size):
        similarities[start:stop], indices[start:stop] = block.max(dim=1)
    return indices, chord_distance(similarities)


def chord_distance(similarity: torch.Tensor) -> torch.Tensor:
    """The Euclidean distance between unit vectors of cosine ``similarity``: ``sqrt(2 - 2 s)``, never NaN
    where rounding lifts ``s`` above 1."""
    return (2.0 - 2.0 * similarity).clamp(min=0.0).sqrt()


def koleo_loss(
    vectors: torch.Tensor, block_size: int | None = None, neighbour_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser of a set of vectors (to be minimised).

    ``-(1/K) * sum_i log(min_{j != i} ||v_i - v_j||_2 + 1e-8)`` with ``v_i`` the L2-normalised
    rows. The nearest neighbours are found without gradient in row blocks (extra memory
    ``O(block_size * K)``, never ``K x K``); only the ``K`` neighbour distances are
    differentiated, which gives exactly the gradient of the dense formula.

    Args:
        vectors: ``(K, d)``, any scale (rows are normalised here).
        block_size: rows per search block; automatic if None.
        neighbour_index: ``(K,)`` each row's neighbour, found elsewhere (e.g. by
            :class:`hf_koleo.koleo_neighbours.NeighbourCandidates`); the search is skipped.

    Returns:
        Scalar in the dtype of ``vectors``.
    """
    if vectors.dim() != 2:
        raise ValueError(f"koleo_loss expects a (K, d) matrix, got shape {tuple(vectors.shape)}")
    unit_vectors = F.normalize(vectors, p=2, dim=-1)
    if neighbour_index is None:
        neighbour_index, _ = nearest_neighbours(unit_vectors, block_size)
    return koleo_from_neighbours(unit_vectors, neighbour_index)


def koleo_from_neighbours(unit_vectors: torch.Tensor, neighbour_index: torch.Tensor) -> torch.Tensor:
    """``-mean log(||u_i - u_neighbour(i)|| + 1e-8)`` of ``(K, d)`` unit rows: the KoLeo loss once
    each row's neighbour is known (only these K distances are differentiated)."""
    distances = torch.linalg.vector_norm(unit_vectors - unit_vectors[neighbour_index], dim=-1)
    return -torch.log(distances + KOLEO_EPSILON).mean()


def koleo_proto_loss(prototypes: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """KoLeo-proto (arXiv 2410.14060): :func:`koleo_loss` applied to the ``(K, d)`` prototypes."""
    return koleo_loss(prototypes, block_size)
