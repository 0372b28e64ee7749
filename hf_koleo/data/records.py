"""Read a source's records shard after shard, each tagged with where it comes from.

:func:`iter_records` gives the same records in the same order as iterating the whole source, each
with :data:`ORIGIN` ``(file, index)``: the file of its shard (a local path or an ``hf://`` URL) and
its row in that file, so a record that does not decode can be named (:func:`describe_record`:
``a.tar member x.png``, ``b.parquet row 7``, an image's path). Reading one shard at a time also lets
a damaged shard be named: a tar shard that ends early is warned about and left, a parquet file that
cannot be read raises a ``ValueError`` naming it.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import datasets
import pyarrow as pa

from .sources import connection_errors_name_the_source

logger = logging.getLogger(__name__)

# Key that :func:`iter_records` adds to each record: ``(file of its shard or None, index in that file)``.
ORIGIN = "__origin__"


def _shard_file(part) -> str | None:
    """The one file a single-shard ``IterableDataset`` reads (None when unknown or several).

    ``datasets`` keeps it in the generator arguments of the innermost examples iterable
    (``files`` for parquet and folders, ``tar_paths`` for webdataset); it has no public accessor.
    """
    iterable = getattr(part, "_ex_iterable", None)
    while iterable is not None:
        kwargs = getattr(iterable, "kwargs", None)
        if isinstance(kwargs, dict):
            files = kwargs.get("files", kwargs.get("tar_paths"))
            if isinstance(files, list) and files and all(isinstance(file, str) for file in files):
                return files[0] if len(set(files)) == 1 else None
            return None
        iterable = getattr(iterable, "ex_iterable", None)
    return None


def _parts(source) -> Iterator[tuple[object, str | None, int, int]]:
    """``(part, file, step, offset)`` for each shard of ``source`` in order: its records are the
    ``offset + k * step``-th of ``file``.

    Reading shard after shard gives the same records in the same order as reading the whole
    source. A source split by node with whole shards (``split_dataset_by_node``'s "shards") would be
    split again shard by shard, so it is read whole (:func:`..stream.shard_source` never makes one).
    """
    if not isinstance(source, datasets.IterableDataset):
        yield source, None, 1, 0  # a list of records, a map-style Dataset
        return
    distributed = getattr(source, "_distributed", None)
    step, offset = (distributed.world_size, distributed.rank) if distributed is not None else (1, 0)
    n_shards = source.num_shards
    if n_shards <= 1 or (distributed is not None and distributed.strategy != "examples"):
        yield source, _shard_file(source), step, offset
        return
    for index in range(n_shards):
        part = source.shard(num_shards=n_shards, index=index, contiguous=True)
        yield part, _shard_file(part), step, offset


def _part_records(part, batch_size: int = 256) -> Iterator[dict]:
    """Every record of ``part`` as a new dict; ``iter`` rather than ``__iter__``, which would split the
    shards among DataLoader workers by itself (the stream chooses each worker's shards)."""
    if not hasattr(part, "iter"):
        for record in part:
            yield dict(record)
        return
    for columns in part.iter(batch_size=batch_size):
        names = list(columns)
        for values in zip(*(columns[name] for name in names)):
            yield dict(zip(names, values))


def iter_records(source, name: str) -> Iterator[dict]:
    """Every record of ``source``, each tagged with its :data:`ORIGIN` ``(file, index)``.

    A transport failure is raised as :class:`SourceConnectionError` (see :func:`guard_records`); a
    tar shard that ends early is warned about, by name, and the stream goes on with the next shard;
    a parquet shard that cannot be read raises a ``ValueError`` naming it.
    """
    for part, file, step, offset in _parts(source):
        count, batch_size = 0, 256
        while batch_size:
            try:
                with connection_errors_name_the_source(name):
                    for record in islice(_part_records(part, batch_size), count, None):
                        record[ORIGIN] = (file, offset + count * step)
                        count += 1
                        yield record
                batch_size = 0
            except tarfile.TarError as error:
                if batch_size > 1:  # the records before the damage were in the batch that failed: read them
                    batch_size = 1
                    continue
                logger.warning(
                    "data source %r: tar shard %s ends early or is damaged after %d records (%s): skipping the rest",
                    name,
                    file or "(unknown file)",
                    count,
                    error,
                )
                batch_size = 0
            except pa.ArrowInvalid as error:
                raise ValueError(f"data source {name!r}: cannot read {file or 'one of its files'}: {error}") from error


def describe_record(record: dict) -> str:
    """Where a record comes from, for messages: ``a.tar member x.png``, ``b.parquet row 7``, a path."""
    file, index = record.get(ORIGIN, (None, None))
    image = record.get("image")
    member = image.get("path") if isinstance(image, dict) else None
    if file is None:
        return str(member) if member else "a record" if index is None else f"record {index}"
    if member and ".tar" in Path(file).name:
        return f"{file} member {member}"
    return f"{file} row {index}" + (f" ({member})" if member and member != file else "")
