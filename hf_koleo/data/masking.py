"""iBOT / BEiT block-wise masking of patch grids, for a whole batch at once on any device.

BEiT places random rectangles one at a time until about ``ratio * n_patches`` patches are
masked, a Python loop per image. Here every crop draws ``MASK_BLOCKS`` candidate rectangles at
once (areas shrinking from the target towards ``min_block_patches``) and keeps the longest
prefix whose union stays within the target: a fixed number of tensor operations per batch, no
host reads, and never more than the target. The randomness is per image (see
:mod:`counter_rng`), so masks do not depend on the batch an image lands in.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..losses import max_masked_patches
from .counter_rng import sample_keys, uniforms

MASK_BLOCKS = 16
_DRAWS_PER_BLOCK = 4


def block_masks(
    keys: torch.Tensor,
    n_crops: int,
    grid_size: int,
    ratio_range: tuple[float, float],
    probability: float,
    min_block_patches: int = 4,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """Block masks for the global crops of a batch.

    Each crop is masked with ``probability``; a masked crop targets ``round(ratio * n_patches)``
    patches, ``ratio`` uniform in ``ratio_range``, and gets the union of the longest prefix of
    its candidate blocks that does not exceed the target.

    Args:
        keys: ``(batch,)`` per-image random keys.
        n_crops: global crops per image.
        grid_size: patches per side of a global crop.

    Returns:
        ``(batch, n_crops, grid_size * grid_size)`` bool, True where masked; at most
        ``max_masked_patches(n_patches, ratio_range[1])`` True per crop.
    """
    batch, n_patches = keys.shape[0], grid_size * grid_size
    per_crop = 2 + _DRAWS_PER_BLOCK * MASK_BLOCKS
    draws = uniforms(keys, n_crops * per_crop, "masks").reshape(batch * n_crops, per_crop)
    masked = draws[:, 0] < probability
    ratio = ratio_range[0] + (ratio_range[1] - ratio_range[0]) * draws[:, 1]
    target = torch.where(masked, torch.round(ratio * n_patches), torch.zeros_like(ratio))  # (n,)
    target = target.clamp(max=max_masked_patches(n_patches, ratio_range[1]))
    area_draw, aspect_draw, top_draw, left_draw = draws[:, 2:].reshape(-1, _DRAWS_PER_BLOCK, MASK_BLOCKS).unbind(1)

    # Candidate block b aims at an area between min(min_block_patches, target) and target / (b + 1);
    # the first block alone never exceeds the target, so a masked crop keeps at least one block.
    shrink = 1.0 / torch.arange(1, MASK_BLOCKS + 1, device=keys.device, dtype=torch.float32)
    smallest = target.clamp(min=1, max=min_block_patches)[:, None]
    largest = torch.maximum(target[:, None] * shrink, smallest)
    area = smallest + (largest - smallest) * area_draw  # (n, blocks)
    log_low, log_high = math.log(aspect_range[0]), math.log(aspect_range[1])
    aspect = torch.exp(log_low + (log_high - log_low) * aspect_draw)
    height = torch.minimum(torch.round(torch.sqrt(area * aspect)), largest).clamp(1, grid_size)
    width = torch.minimum(torch.round(torch.sqrt(area / aspect)), torch.floor(largest / height))
    width = width.clamp(1, grid_size)
    top = torch.floor(top_draw * (grid_size - height + 1))
    left = torch.floor(left_draw * (grid_size - width + 1))

    cells = torch.arange(grid_size, device=keys.device, dtype=torch.float32)
    rows = (cells >= top[..., None]) & (cells < (top + height)[..., None])  # (n, blocks, grid)
    columns = (cells >= left[..., None]) & (cells < (left + width)[..., None])
    blocks = rows[..., :, None] & columns[..., None, :]  # (n, blocks, grid, grid)
    unions = blocks.to(torch.uint8).cummax(dim=1).values.reshape(-1, MASK_BLOCKS, n_patches)
    sizes = unions.sum(dim=-1)  # (n, blocks), non-decreasing along the blocks
    fits = sizes <= target[:, None]
    n_kept = fits.sum(dim=1, keepdim=True)  # the longest prefix within the target
    chosen = (n_kept - 1).clamp(min=0)[..., None].expand(-1, 1, n_patches)
    mask = unions.gather(1, chosen).squeeze(1).bool() & (n_kept > 0)
    return mask.reshape(batch, n_crops, n_patches)


@dataclass(frozen=True)
class MaskSettings:
    """iBOT masking of the global crops on a ``grid_size x grid_size`` patch grid."""

    grid_size: int
    ratio_range: tuple[float, float] = (0.1, 0.5)
    probability: float = 0.5

    def masks(self, keys: torch.Tensor, n_crops: int = 2) -> torch.Tensor:
        """``(batch, n_crops, grid_size**2)`` bool masks for images with these keys."""
        return block_masks(keys, n_crops, self.grid_size, self.ratio_range, self.probability)

    def batch_masks(self, keys: torch.Tensor) -> dict[str, torch.Tensor | int]:
        """What a batch carries for iBOT: ``masks`` of its two global crops and their ``mask_slots`` budget."""
        return {"masks": self.masks(keys), "mask_slots": self.slot_budget(2 * len(keys))}

    def slot_budget(self, n_crops: int) -> int:
        """Static number of iBOT patch slots for ``n_crops`` global crops (``mask_slots`` of the model).

        The mean plus 5 standard deviations of the masked-patch count of ``n_crops`` crops, from
        the count distribution of this masking, never more than every crop's maximum: a third
        of the per-crop bound at DINO's settings, and a batch exceeds it about once in three
        million (its last masked patches then leave the iBOT loss for that step).
        """
        mean, std = _masked_count_moments(self.grid_size, tuple(self.ratio_range), self.probability)
        budget = math.ceil(n_crops * mean + 5 * math.sqrt(n_crops) * std)
        per_crop = max_masked_patches(self.grid_size**2, self.ratio_range[1])
        return max(1, min(n_crops * per_crop, budget))


@functools.lru_cache(maxsize=32)
def _masked_count_moments(grid_size: int, ratio_range: tuple[float, float], probability: float) -> tuple[float, float]:
    """Mean and standard deviation of the masked patches of one crop, over 4,096 simulated crops."""
    keys = sample_keys(0x5EED, 0, torch.arange(2048))
    counts = block_masks(keys, 2, grid_size, ratio_range, probability).sum(-1).double().flatten()
    return float(counts.mean()), float(counts.std())
