"""Decoded batches from a source too large for memory: workers decode disjoint shards, crops happen on the device.

Every process streams its own split of the source (``datasets.distributed.split_dataset_by_node``).
With ``W`` DataLoader workers, worker ``w`` reads only the shards ``i`` with ``i % W == w``
(``IterableDataset.shard``): no record is read by two workers. A worker groups ``batch_size``
records, decodes them onto canvases (see :mod:`decoded`) and yields ``uint8`` images with one
random key per record; the trainer cuts the views on the accelerator. The DataLoader returns
the workers' batches round-robin, so the ``g``-th batch delivered is worker ``g % W``'s
``g // W``-th: a position ``(0, g)`` resumes exactly (same ``W``), each worker skipping the
records of its first batches without decoding them (and worker roles rotated so the DataLoader's
first worker plays the one whose turn is next).

Records are shuffled per worker with a buffer seeded by ``(seed, pass, worker)``. Undecodable
records are dropped and counted, so a batch may hold fewer images; a worker that meets
``max_corrupt_batches`` batches in a row with no decodable record stops with an error naming the
source.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from .counter_rng import MASK32
from .decoded import DecodedRows
from .sources import guard_records

logger = logging.getLogger(__name__)


def _records(source) -> Iterator[dict]:
    """Every record of ``source``, also inside a DataLoader worker.

    ``IterableDataset.__iter__`` would re-split the shards among the workers by itself;
    ``iter(batch_size)`` does not: this module chooses each worker's shards explicitly.
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


def record_key(seed: int, epoch: int, image: Any) -> int:
    """A 32-bit random key from the run seed, the pass and the record's own bytes (or path)."""
    digest = hashlib.blake2b(digest_size=8, key=f"{seed}:{epoch}".encode())
    if isinstance(image, dict):
        payload = image.get("bytes") or str(image.get("path")).encode()
    else:
        payload = bytes(image) if isinstance(image, (bytes, bytearray)) else repr(image).encode()
    digest.update(payload)
    return int.from_bytes(digest.digest(), "little") & MASK32


def shard_source(source, rank: int, world_size: int, strategy: str = "auto"):
    """Keep this process's split of the source (``split_dataset_by_node``)."""
    if world_size > 1:
        source = split_dataset_by_node(source, rank=rank, world_size=world_size, strategy=strategy)
    return source


def usable_workers(source, num_workers: int) -> int:
    """Workers that each get at least one shard of ``source`` (never more than its shard count)."""
    n_shards = getattr(source, "num_shards", None) or 1
    return min(num_workers, n_shards)


class CanvasStream(torch.utils.data.IterableDataset):
    """Endless stream of decoded batches (passes over the data follow each other).

    Each yielded batch is a dict: ``images`` ``(B, 3, S, S)`` uint8 canvases, ``extents``
    ``(B, 2)``, ``keys`` ``(B,)`` int64, ``labels`` ``(B,)`` (-1 where unknown), ``n_corrupt``
    (records of this batch dropped as undecodable; ``B`` is smaller by that much) and
    ``position`` ``(0, g)``: resume from here after this batch.
    """

    def __init__(
        self,
        source,
        canvas_size: int,
        batch_size: int,
        seed: int = 0,
        position: tuple[int, int] = (0, 0),
        shuffle_buffer: int = 0,
        name: str = "source",
        max_corrupt_batches: int = 20,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.canvas_size = canvas_size
        self.batch_size = batch_size
        self.seed = seed
        self.position = tuple(position)
        self.shuffle_buffer = shuffle_buffer
        self.name = name
        self.max_corrupt_batches = max_corrupt_batches

    def _raw_batches(self, source, worker_id: int) -> Iterator[tuple[int, list[dict]]]:
        """``(pass, records)`` groups of ``batch_size`` records of this worker's shards, forever."""
        epoch = 0
        while True:
            records: list[dict] = []
            n_batches = 0
            stream = guard_records(_records(source), self.name)  # a lost Hub connection names the source
            if self.shuffle_buffer > 1:
                stream = buffer_shuffle(
                    stream, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, worker_id])
                )
            for record in stream:
                records.append(record)
                if len(records) == self.batch_size:
                    yield epoch, records
                    n_batches += 1
                    records = []
            if n_batches == 0:
                raise ValueError(
                    f"data source {self.name!r} has fewer records ({len(records)}) than one batch "
                    f"({self.batch_size}) for this process and worker: lower the batch size or add data"
                )
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        physical_id, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        delivered = self.position[1]
        # The DataLoader always starts with worker 0: after ``delivered`` batches, worker 0 plays
        # the part (shards, shuffling, turn) of the worker whose batch comes next.
        worker_id = (physical_id + delivered) % n_workers
        source = self.source
        if n_workers > 1:
            source = source.shard(num_shards=n_workers, index=worker_id, contiguous=False)
        corrupt_run = 0
        for local_index, (epoch, records) in enumerate(self._raw_batches(source, worker_id)):
            running = local_index * n_workers + worker_id
            if running < delivered:
                continue  # resuming: these batches were consumed before the checkpoint
            batch = self.decode_batch(records, epoch)
            corrupt_run = corrupt_run + 1 if batch["images"].shape[0] == 0 else 0
            if corrupt_run >= self.max_corrupt_batches:
                raise ValueError(
                    f"data source {self.name!r}: {corrupt_run * self.batch_size} records in a row could not be "
                    "decoded as images; check the image column and the files"
                )
            batch["position"] = (0, running + 1)
            yield batch

    def decode_batch(self, records: list[dict], epoch: int) -> dict[str, Any]:
        rows = DecodedRows.decode(records, self.canvas_size)
        if rows.n_corrupt:
            logger.warning("data source %r: skipped %d undecodable records", self.name, rows.n_corrupt)
        images, extents, labels = rows.tensors(self.canvas_size)
        keys = [record_key(self.seed, epoch, records[index]["image"]) for index in rows.kept]
        return {
            "images": images,
            "extents": extents,
            "keys": torch.tensor(keys, dtype=torch.int64),
            "labels": labels,
            "n_corrupt": rows.n_corrupt,
        }
