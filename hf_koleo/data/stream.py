"""Decoded batches from a source too large for memory: workers decode disjoint shards, crops happen on the device.

Every process streams its own split of the source (:func:`shard_source`). With ``W`` DataLoader
workers, worker ``w`` reads only the shards ``i`` with ``i % W == w`` (``IterableDataset.shard``):
no record is read by two workers. A worker reads its records pass after pass, each pass shuffled
with a buffer seeded by ``(seed, pass, worker)``, decodes them onto canvases (see :mod:`decoded`)
and yields batches of exactly ``batch_size`` ``uint8`` images with one random key per record; the
trainer cuts the views on the accelerator. An undecodable record is skipped, named in a warning
(rate-limited, :class:`SkippedRecords`) and counted in its batch's ``n_corrupt``, and the batch is
filled from the next records. Records at the end of a pass that cannot fill a batch are dropped
(undecodable ones among them count with the next batch); the next pass draws new keys.

Positions. The DataLoader returns the workers' batches round-robin, so the ``g``-th batch delivered
is logical worker ``g % W``'s. The position after it is ``[0, g + 1]`` as long as every worker's
batches were whole groups of ``batch_size`` records (no record failed to decode): resuming, each
worker skips its first groups without decoding them. Once a worker has met an undecodable record
it is ``[0, g + 1, c_0, ..., c_{W-1}]``, ``c_w`` the records logical worker ``w`` has consumed
over all passes (-1 for a worker still on whole groups): resuming, that worker skips that many
records, again without decoding them. :func:`advance_position` folds each delivered batch into the
position (in the main process: a worker knows only its own count). Worker roles are rotated on
resume so the DataLoader's first worker plays the one whose turn is next. A worker that meets
``max_corrupt_batches * batch_size`` undecodable records in a row, or a pass that cannot fill one
batch, stops with an error naming the source.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from .counter_rng import MASK32
from .decoded import DecodedRows, SkippedRecords
from .records import describe_record, iter_records

logger = logging.getLogger(__name__)


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
    """Keep this process's split of the source.

    Whole shards (``strategy`` "shards", or "auto" when ``world_size`` divides the shard count): shard
    ``i`` goes to process ``i % world_size``, as with ``split_dataset_by_node``, but split now with
    ``IterableDataset.shard`` so every shard can still be read (and named) one at a time. Otherwise
    every process reads all shards and keeps one record in ``world_size`` of each
    (``split_dataset_by_node``'s "examples").
    """
    if world_size <= 1:
        return source
    n_shards = getattr(source, "num_shards", None) or 1
    if strategy == "shards" or (strategy == "auto" and n_shards % world_size == 0):
        if n_shards < world_size:
            raise ValueError(
                f"data source has {n_shards} shard(s), fewer than the {world_size} processes: "
                "use split_strategy 'examples' or more shards"
            )
        return source.shard(num_shards=world_size, index=rank, contiguous=False)
    return split_dataset_by_node(source, rank=rank, world_size=world_size, strategy="examples")


def parse_position(position: Sequence[int], n_workers: int) -> tuple[int, list[int]]:
    """``(batches delivered, records consumed by each logical worker or -1)`` of a stream position.

    ``[0, g]`` (and a position saved with another number of workers) gives -1 for every worker:
    skip whole groups of ``batch_size`` records.
    """
    delivered = int(position[1]) if len(position) > 1 else 0
    consumed = [int(count) for count in position[2:]]
    return delivered, consumed if len(consumed) == n_workers else [-1] * n_workers


def advance_position(position: Sequence[int], batch: dict[str, Any], n_workers: int) -> list[int]:
    """The position after ``batch``, the :class:`CanvasStream` batch delivered after ``position``."""
    _, consumed = parse_position(position, n_workers)
    consumed[batch["worker"]] = batch["consumed"]
    counts = consumed if any(count >= 0 for count in consumed) else []
    return [0, batch["delivered"], *counts]


def usable_workers(source, num_workers: int) -> int:
    """Workers that each get at least one shard of ``source`` (never more than its shard count)."""
    n_shards = getattr(source, "num_shards", None) or 1
    return min(num_workers, n_shards)


class CanvasStream(torch.utils.data.IterableDataset):
    """Endless stream of decoded batches (passes over the data follow each other).

    Each yielded batch is a dict: ``images`` ``(B, 3, S, S)`` uint8 canvases, ``extents``
    ``(B, 2)``, ``keys`` ``(B,)`` int64, ``labels`` ``(B,)`` (-1 where unknown), ``n_corrupt``
    (undecodable records skipped to fill it), and for :func:`advance_position`: ``worker`` (the
    logical worker that made it), ``consumed`` (records that worker has consumed, -1 while all its
    batches were whole groups) and ``delivered`` (batches delivered once this one is).
    """

    def __init__(
        self,
        source,
        canvas_size: int,
        batch_size: int,
        seed: int = 0,
        position: Sequence[int] = (0, 0),
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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        physical_id, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        delivered, consumed = parse_position(self.position, n_workers)
        if len(self.position) > 2 and len(self.position) != 2 + n_workers and physical_id == 0:
            logger.warning(
                "data source %r: the position %s was saved with %d DataLoader workers, this run has %d: "
                "resuming by whole batches, not exactly where the run stopped",
                self.name,
                list(self.position),
                len(self.position) - 2,
                n_workers,
            )
        # The DataLoader always starts with worker 0: after ``delivered`` batches, worker 0 plays
        # the part (shards, shuffling, turn) of the worker whose batch comes next.
        worker_id = (physical_id + delivered) % n_workers
        source = self.source
        if n_workers > 1:
            source = source.shard(num_shards=n_workers, index=worker_id, contiguous=False)
        reader = _WorkerReader(self, source, worker_id, n_workers > 1)
        made = max(0, -(-(delivered - worker_id) // n_workers))  # this worker's batches among the first ``delivered``
        if consumed[worker_id] >= 0:
            reader.skip_records(consumed[worker_id])
        else:
            reader.skip_groups(made)
        for index, batch in enumerate(reader.batches(), start=made):
            batch["worker"] = worker_id
            batch["consumed"] = -1 if reader.whole_groups else reader.consumed
            batch["delivered"] = index * n_workers + worker_id + 1
            yield batch


class _WorkerReader:
    """One logical worker's records, pass after pass, made into full batches; counts what it consumed."""

    def __init__(self, stream: CanvasStream, source, worker_id: int, several_workers: bool) -> None:
        self.stream = stream
        self.source = source
        self.worker_id = worker_id
        self.share = "this process and DataLoader worker" if several_workers else "this process"
        self.skipped = SkippedRecords(stream.name)
        self.consumed = 0  # records taken, over all passes
        self.whole_groups = True  # no record has failed to decode: every batch was a group of batch_size
        self.pending_corrupt = 0  # undecodable records of a dropped pass tail, counted with the next batch
        self.corrupt_run = 0
        self.latest = ""  # the last undecodable record and why, for errors
        self.epoch = -1
        self._next_pass()

    def _next_pass(self) -> None:
        self.epoch += 1
        self.pass_records = 0
        self.pass_batches = 0
        self.pass_whole = True  # read from its first record (not entered half-way by a resume)
        records = iter_records(self.source, self.stream.name)
        if self.stream.shuffle_buffer > 1:
            generator = np.random.default_rng([self.stream.seed, self.epoch, self.worker_id])
            records = buffer_shuffle(records, self.stream.shuffle_buffer, generator)
        self._records = records

    def _take(self, count: int) -> list[dict]:
        """Up to ``count`` records of this pass: fewer when it ends."""
        taken = list(islice(self._records, count))
        self.consumed += len(taken)
        self.pass_records += len(taken)
        return taken

    def _pass_is_over(self) -> None:
        if self.pass_records == 0:
            raise ValueError(f"data source {self.stream.name!r} has no records for {self.share}")
        self._next_pass()

    def skip_records(self, count: int) -> None:
        """Resume after ``count`` consumed records, without decoding them."""
        self.whole_groups = False
        while count > 0:
            asked = min(count, 4096)
            taken = sum(1 for _ in islice(self._records, asked))
            self.consumed += taken
            self.pass_records += taken
            self.pass_whole = self.pass_whole and taken == 0
            count -= taken
            if taken < asked:
                self._pass_is_over()

    def skip_groups(self, groups: int) -> None:
        """Resume after ``groups`` whole batches of ``batch_size`` records, without decoding them."""
        size = self.stream.batch_size
        while groups > 0:
            taken = len(self._take(size))
            if taken == size:
                groups -= 1
                self.pass_batches += 1
                continue
            if self.pass_batches == 0:
                raise ValueError(self._too_few(self.pass_records, None))
            self._pass_is_over()

    def batches(self) -> Iterator[dict[str, Any]]:
        while True:
            batch = self._fill()
            if batch is not None:
                yield batch

    def _fill(self) -> dict[str, Any] | None:
        """The next full batch of this pass, or None when the pass ends first (the next one begins)."""
        size, canvas = self.stream.batch_size, self.stream.canvas_size
        records: list[dict] = []
        rows = DecodedRows()
        while len(rows.kept) < size:
            need = size - len(rows.kept)
            chunk = self._take(need)
            if len(chunk) < need:
                self._end_pass(rows, chunk)
                return None
            decoded = DecodedRows.decode(chunk, canvas)
            self._note_failures(chunk, decoded)
            records += chunk
            rows.extend(decoded)
        self.pass_batches += 1
        images, extents, labels = rows.tensors(canvas)
        keys = [record_key(self.stream.seed, self.epoch, records[index]["image"]) for index in rows.kept]
        batch = {
            "images": images,
            "extents": extents,
            "keys": torch.tensor(keys, dtype=torch.int64),
            "labels": labels,
            "n_corrupt": rows.n_corrupt + self.pending_corrupt,
        }
        self.pending_corrupt = 0
        return batch

    def _note_failures(self, chunk: list[dict], decoded: DecodedRows) -> None:
        failed = dict(decoded.failures)
        for index in range(len(chunk)):
            if index not in failed:
                self.corrupt_run = 0
                continue
            self.whole_groups = False
            self.corrupt_run += 1
            self.skipped.add(chunk[index], failed[index])
            self.latest = f"{describe_record(chunk[index])}: {failed[index]}"
            if self.corrupt_run >= self.stream.max_corrupt_batches * self.stream.batch_size:
                raise ValueError(
                    f"data source {self.stream.name!r}: {self.corrupt_run} records in a row could not be decoded "
                    f"as images (latest: {self.latest}); check the image column and the files"
                )

    def _end_pass(self, rows: DecodedRows, tail: list[dict]) -> None:
        """The pass ended before the batch was full: drop what was gathered, check the pass gave a batch."""
        self.pending_corrupt += rows.n_corrupt
        if self.pass_batches == 0 and self.pass_whole and self.pass_records:
            tail_rows = DecodedRows.decode(tail, self.stream.canvas_size)  # only to say how many decode
            for index, reason in tail_rows.failures:
                self.latest = f"{describe_record(tail[index])}: {reason}"
            raise ValueError(self._too_few(self.pass_records, len(rows.kept) + len(tail_rows.kept)))
        self._pass_is_over()

    def _too_few(self, n_records: int, n_decodable: int | None) -> str:
        name, size = self.stream.name, self.stream.batch_size
        if n_decodable == 0:
            return (
                f"data source {name!r}: all {n_records} of its records for {self.share} could not be decoded as "
                f"images (latest: {self.latest}); check the image column and the files"
            )
        if n_records < size:
            return (
                f"data source {name!r} has fewer records ({n_records}) than one batch ({size}) for {self.share}: "
                "lower the batch size or add data"
            )
        return (
            f"data source {name!r} has only {n_decodable} decodable records of {n_records} for {self.share}, "
            f"fewer than one batch ({size}): lower the batch size or add data"
        )
