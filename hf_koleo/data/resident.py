"""Batches cut from images that live on the accelerator: no DataLoader, no worker, no host copy.

The epoch's order is a seeded permutation shared by every process; global batch ``b`` is the
permutation's ``b``-th slice of ``batch_size * world_size`` indices and process ``r`` takes the
``r``-th part of it, so ``P`` processes at batch ``B`` see exactly the images (and, views being
a function of ``(seed, epoch, index)``, exactly the views) of one process at batch ``P * B``.
The last incomplete global batch of an epoch is dropped. A position ``(epoch, batch_index)``
resumes exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from .augment import MultiCropAugmentation
from .counter_rng import hash32_int, sample_keys
from .decoded import DecodedImages
from .masking import MaskSettings


class ResidentBatches:
    """Endless multi-crop batches from a :class:`DecodedImages` on ``device``.

    Each batch is a dict: ``global_crops`` ``(B, 2, 3, G, G)`` and ``local_crops`` (float,
    normalised), ``masks`` ``(B, 2, n_patches)`` bool when masking is on, ``labels`` ``(B,)``,
    ``indices`` ``(B,)`` (rows of the decoded source), ``n_corrupt`` (0: undecodable records were
    dropped when decoding) and ``position``: the ``(epoch, batch_index)`` to resume from after it.
    """

    def __init__(
        self,
        decoded: DecodedImages,
        augmentation: MultiCropAugmentation,
        batch_size: int,
        seed: int = 0,
        masking: MaskSettings | None = None,
        position: tuple[int, int] = (0, 0),
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        global_batch = batch_size * world_size
        if len(decoded) < global_batch:
            raise ValueError(
                f"data source {decoded.name!r} has fewer images ({len(decoded)}) than one global batch "
                f"({batch_size} x {world_size} processes): lower the batch size or add data"
            )
        self.data = decoded.to(device)
        self.augmentation = augmentation
        self.batch_size, self.seed, self.masking = batch_size, seed, masking
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.batches_per_epoch = len(decoded) // global_batch
        self.position = tuple(position)
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of all rows, on the device (drawn on the CPU: the same on any device)."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(hash32_int(hash32_int(self.seed) ^ epoch))
            permutation = torch.randperm(len(self.data), generator=generator)
            if self.device.type == "cuda":
                permutation = permutation.pin_memory()
            self._order = (epoch, permutation.to(self.device, non_blocking=True))
        return self._order[1]

    def views(self, indices: torch.Tensor, epoch: int) -> dict[str, Any]:
        """Every view of the rows ``indices`` in ``epoch`` (what :meth:`next_batch` returns)."""
        keys = sample_keys(self.seed, epoch, indices)
        batch: dict[str, Any] = self.augmentation(self.data.images[indices], self.data.extents[indices], keys)
        if self.masking is not None:
            batch.update(self.masking.batch_masks(keys))
        batch.update(labels=self.data.labels[indices], indices=indices, n_corrupt=0)
        return batch

    def next_batch(self) -> dict[str, Any]:
        epoch, batch_index = self.position
        if batch_index >= self.batches_per_epoch:
            epoch, batch_index = epoch + 1, 0
        start = (batch_index * self.world_size + self.rank) * self.batch_size
        indices = self.order(epoch)[start : start + self.batch_size]
        batch = self.views(indices, epoch)
        self.position = (epoch, batch_index + 1)
        batch["position"] = self.position
        return batch
