"""iBOT / BEiT block-wise masking of patch grids."""

from __future__ import annotations

import math

import torch


def block_mask(
    grid_height: int,
    grid_width: int,
    n_masked: int,
    generator: torch.Generator,
    min_block_patches: int = 4,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10,
) -> torch.Tensor:
    """Mask about ``n_masked`` patches with random rectangles (BEiT's block-wise masking).

    Returns:
        ``(grid_height, grid_width)`` bool, True where masked; never more than ``n_masked`` True.
    """
    mask = torch.zeros(grid_height, grid_width, dtype=torch.bool)
    log_aspect = (math.log(aspect_range[0]), math.log(aspect_range[1]))

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    while int(mask.sum()) < n_masked:
        remaining = n_masked - int(mask.sum())
        added = 0
        for _ in range(max_attempts):
            target = uniform(min(min_block_patches, remaining), remaining)
            aspect = math.exp(uniform(*log_aspect))
            height = int(round(math.sqrt(target * aspect)))
            width = int(round(math.sqrt(target / aspect)))
            if 0 < height <= grid_height and 0 < width <= grid_width:
                top = int(torch.randint(0, grid_height - height + 1, (), generator=generator))
                left = int(torch.randint(0, grid_width - width + 1, (), generator=generator))
                block = mask[top : top + height, left : left + width]
                new = int((~block).sum())
                if 0 < new <= remaining:
                    block.fill_(True)
                    added = new
                    break
        if added == 0:
            break
    return mask


def sample_crop_masks(
    n_crops: int,
    grid_height: int,
    grid_width: int,
    ratio_range: tuple[float, float],
    probability: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Masks for the global crops of one image: each is masked with ``probability``.

    The mask ratio of a masked crop is drawn uniformly from ``ratio_range``.

    Returns:
        ``(n_crops, grid_height * grid_width)`` bool.
    """
    masks = torch.zeros(n_crops, grid_height * grid_width, dtype=torch.bool)
    n_patches = grid_height * grid_width
    for crop in range(n_crops):
        if float(torch.rand((), generator=generator)) >= probability:
            continue
        ratio = ratio_range[0] + (ratio_range[1] - ratio_range[0]) * float(torch.rand((), generator=generator))
        n_masked = int(round(ratio * n_patches))
        masks[crop] = block_mask(grid_height, grid_width, n_masked, generator).flatten()
    return masks
