"""Batches of multi-crop views from a streamed dataset: deterministic, resumable, worker-safe.

Every process iterates its own split of the source (``datasets.distributed.split_dataset_by_node``).
Records are grouped into batches in stream order; with ``W`` DataLoader workers, worker ``w``
decodes and augments the batches whose running number is ``w`` modulo ``W`` and only counts the
others, so the DataLoader's round-robin returns them in stream order whatever ``W`` and however
many shards the source has. Records are shuffled with a buffer seeded by ``(seed, epoch)``.
A position ``(epoch, batch_index)`` resumes the stream exactly.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from .augment import MultiCropAugmentation
from .images import decode_image
from .masking import sample_crop_masks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskSettings:
    """iBOT masking of the global crops on a ``grid_size x grid_size`` patch grid."""

    grid_size: int
    ratio_range: tuple[float, float] = (0.1, 0.5)
    probability: float = 0.5


def _records(source) -> Iterator[dict]:
    """Every record of ``source``, also inside a DataLoader worker.

    ``IterableDataset.__iter__`` hands each worker a subset of shards; ``iter(batch_size)`` does
    not, which is what the batch-level worker split of :class:`MultiCropStream` needs.
    """
    if not hasattr(source, "iter"):
        yield from source
        return
    for columns in source.iter(batch_size=256):
        names = list(columns)
        for values in zip(*(columns[name] for name in names)):
            yield dict(zip(names, values))


def buffer_shuffle(records: Iterator[dict], buffer_size: int, generator: np.random.Generator) -> Iterator[dict]:
    """Approximate shuffling with a ``buffer_size`` reservoir (as ``IterableDataset.shuffle`` does).

    Done here rather than with ``datasets``' shuffle, whose parquet path sleeps 5 s at the end of
    every pass (a guard for apache/arrow#45214), a stall at every epoch boundary.
    """
    buffer: list[dict] = []
    for record in records:
        if len(buffer) < buffer_size:
            buffer.append(record)
            continue
        index = int(generator.integers(buffer_size))
        yield buffer[index]
        buffer[index] = record
    generator.shuffle(buffer)
    yield from buffer


def sample_seed(seed: int, epoch: int, image: Any) -> int:
    """A 63-bit seed from the run seed, the epoch and the record's own bytes (or path)."""
    digest = hashlib.blake2b(digest_size=8, key=f"{seed}:{epoch}".encode())
    if isinstance(image, dict):
        payload = image.get("bytes") or str(image.get("path")).encode()
    else:
        payload = bytes(image) if isinstance(image, (bytes, bytearray)) else repr(image).encode()
    digest.update(payload)
    return int.from_bytes(digest.digest(), "little") >> 1


def shard_source(source, rank: int, world_size: int, strategy: str = "auto"):
    """Keep this process's split of the source (``split_dataset_by_node``)."""
    if world_size > 1:
        source = split_dataset_by_node(source, rank=rank, world_size=world_size, strategy=strategy)
    return source


class MultiCropStream(torch.utils.data.IterableDataset):
    """Endless stream of multi-crop batches (epochs follow each other; ``set_epoch`` reshuffles).

    Each yielded batch is a dict: ``global_crops`` ``(B, 2, 3, S, S)`` uint8, ``global_params``
    ``(B, 2, 7)``, optionally ``local_crops`` / ``local_params``, ``masks`` ``(B, 2, n_patches)``
    bool (when masking is on), ``labels`` ``(B,)`` (-1 where unknown), ``n_corrupt`` (records
    of this batch skipped as undecodable) and ``position``: the ``(epoch, batch_index)`` to
    resume from *after* this batch (a list once through a DataLoader). ``B`` may be smaller than
    ``batch_size`` (or 0) when records were corrupt.
    """

    def __init__(
        self,
        source,
        augmentation: MultiCropAugmentation,
        batch_size: int,
        seed: int = 0,
        masking: MaskSettings | None = None,
        position: tuple[int, int] = (0, 0),
        shuffle_buffer: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.augmentation = augmentation
        self.batch_size = batch_size
        self.seed = seed
        self.masking = masking
        self.position = tuple(position)
        self.shuffle_buffer = shuffle_buffer

    def _raw_batches(self) -> Iterator[tuple[int, int, list[dict]]]:
        epoch, start_batch = self.position
        while True:
            if hasattr(self.source, "set_epoch"):
                self.source.set_epoch(epoch)
            records: list[dict] = []
            batch_index = 0
            stream = _records(self.source)
            if self.shuffle_buffer > 1:
                stream = buffer_shuffle(stream, self.shuffle_buffer, np.random.default_rng([self.seed, epoch]))
            for record in stream:
                records.append(record)
                if len(records) < self.batch_size:
                    continue
                if batch_index >= start_batch:
                    yield epoch, batch_index, records
                batch_index += 1
                records = []
            if batch_index == 0:
                raise ValueError(
                    f"the data source has fewer records ({len(records)}) than one batch ({self.batch_size}) "
                    "for this process: lower the batch size or add data"
                )
            epoch, start_batch = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        for running_number, (epoch, batch_index, records) in enumerate(self._raw_batches()):
            if running_number % n_workers == worker_id:
                yield self.build_batch(records, epoch, batch_index)

    def build_batch(self, records: list[dict], epoch: int, batch_index: int) -> dict[str, Any]:
        samples, labels, n_corrupt = [], [], 0
        for record in records:
            image = decode_image(record["image"])
            if image is None:
                n_corrupt += 1
                continue
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, record["image"]))
            views = self.augmentation.sample(image, generator)
            if self.masking is not None:
                settings = self.masking
                views["masks"] = sample_crop_masks(
                    views["global_crops"].shape[0],
                    settings.grid_size,
                    settings.grid_size,
                    settings.ratio_range,
                    settings.probability,
                    generator,
                )
            samples.append(views)
            label = record.get("label")
            labels.append(-1 if label is None else int(label))
        if n_corrupt:
            logger.warning("epoch %d batch %d: skipped %d undecodable records", epoch, batch_index, n_corrupt)
        batch: dict[str, Any] = {
            "labels": torch.tensor(labels, dtype=torch.long),
            "n_corrupt": n_corrupt,
            "position": (epoch, batch_index + 1),
        }
        keys = samples[0].keys() if samples else ()
        for key in keys:
            batch[key] = torch.stack([sample[key] for sample in samples])
        return batch
