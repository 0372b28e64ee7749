"""Decode a source once into ``uint8`` tensors, cached on disk, ready to live on the accelerator.

Every image goes onto a square ``(3, S, S)`` canvas in its top-left corner, scaled down (never
up) so its longer side fits ``S`` (``S``: the canvas size asked for, or the largest image's side if
smaller); its real ``(height, width)`` is kept in ``extents``, so the
crops of :class:`MultiCropAugmentation` never see the padding and aspect ratios survive. The
result is cached as safetensors under ``$HF_KOLEO_CACHE/decoded/`` keyed by the source's files
(path, size, modification time) and ``S``: the next run, and every other process of this run,
loads it in a second instead of decoding again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .images import UndecodableImage, read_image
from .records import describe_record, iter_records
from .sources import cache_dir, load_source, resolve_data_files

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
_CHUNK = 512


@dataclass
class DecodedImages:
    """A whole source in memory: ``images`` ``(N, 3, S, S)`` uint8, ``extents`` ``(N, 2)`` int64
    ``(height, width)``, ``labels`` ``(N,)`` int64 (-1 where unknown), and the source's name."""

    images: torch.Tensor
    extents: torch.Tensor
    labels: torch.Tensor
    n_corrupt: int = 0
    name: str = "source"

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> DecodedImages:
        return DecodedImages(
            self.images.to(device), self.extents.to(device), self.labels.to(device), self.n_corrupt, self.name
        )


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> ``(h, w, 3)`` uint8 pixels, scaled down (never up) so the longer side fits ``size``."""
    if max(image.size) > size:
        scale = size / max(image.size)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def stack_canvases(images: list[np.ndarray], side: int) -> np.ndarray:
    """``(N, 3, side, side)`` uint8: each ``(h, w, 3)`` image in the top-left corner, zeros elsewhere."""
    canvases = np.zeros((len(images), 3, side, side), dtype=np.uint8)
    for canvas, pixels in zip(canvases, images):
        canvas[:, : pixels.shape[0], : pixels.shape[1]] = pixels.transpose(2, 0, 1)
    return canvases


def to_canvas(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB image -> ``(3, size, size)`` uint8 canvas (image top-left, zeros elsewhere) and its extent."""
    pixels = fit_image(image, size)
    return stack_canvases([pixels], size)[0], (pixels.shape[0], pixels.shape[1])


def decode_record(record: dict, size: int) -> tuple[np.ndarray, int] | str:
    """``(pixels (h, w, 3) fitting size, label)`` of one ``{"image", "label"}`` record, or why it does
    not decode."""
    try:
        image = read_image(record["image"])
    except UndecodableImage as error:
        return str(error)
    label = record.get("label")
    return fit_image(image, size), -1 if label is None else int(label)


class SkippedRecords:
    """Warnings about the undecodable records of one source that cannot flood the console.

    The first ``first`` get one line each, naming the record (file, tar member / row / path) and
    the reason; after them a running count at 10, 20, 50, 100, 200, 500, ... with the latest one.
    """

    def __init__(self, name: str, first: int = 5) -> None:
        self.name = name
        self.first = first
        self.count = 0
        self._next_count = 10

    def add(self, record: dict, reason: str) -> None:
        self.count += 1
        if self.count <= self.first:
            logger.warning("data source %r: skipping undecodable %s: %s", self.name, describe_record(record), reason)
            if self.count == self.first:
                logger.warning("data source %r: further undecodable records are counted, not listed", self.name)
        elif self.count >= self._next_count:
            logger.warning(
                "data source %r: %d undecodable records skipped so far (latest: %s: %s)",
                self.name,
                self.count,
                describe_record(record),
                reason,
            )
            while self._next_count <= self.count:
                digits = len(str(self._next_count)) - 1
                lead = self._next_count // 10**digits
                self._next_count = {1: 2, 2: 5, 5: 10}[lead] * 10**digits


@dataclass
class DecodedRows:
    """Records decoded so far: pixels, ``(h, w)`` extents, labels, which records decoded (their
    indices among the ``n_records`` read) and why the others did not (``(index, reason)``)."""

    pixels: list[np.ndarray] = field(default_factory=list)
    extents: list[tuple[int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    n_records: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)

    @property
    def n_corrupt(self) -> int:
        return self.n_records - len(self.kept)

    @classmethod
    def decode(cls, records: list[dict], size: int, pool: ThreadPoolExecutor | None = None) -> DecodedRows:
        """Decode ``records`` (in ``pool`` when given: PIL releases the GIL); undecodable ones are left out."""
        results = (pool.map if pool is not None else map)(lambda record: decode_record(record, size), records)
        rows = cls(n_records=len(records))
        for index, decoded in enumerate(results):
            if isinstance(decoded, str):
                rows.failures.append((index, decoded))
            else:
                rows.pixels.append(decoded[0])
                rows.extents.append(decoded[0].shape[:2])
                rows.labels.append(decoded[1])
                rows.kept.append(index)
        return rows

    def extend(self, other: DecodedRows) -> None:
        self.pixels += other.pixels
        self.extents += other.extents
        self.labels += other.labels
        self.kept += [self.n_records + index for index in other.kept]
        self.failures += [(self.n_records + index, reason) for index, reason in other.failures]
        self.n_records += other.n_records

    def tensors(self, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images (N, 3, side, side), extents (N, 2), labels (N,))``."""
        return (
            torch.from_numpy(stack_canvases(self.pixels, side)),
            torch.tensor(self.extents, dtype=torch.int64).reshape(-1, 2),
            torch.tensor(self.labels, dtype=torch.int64),
        )


def decode_records(records, size: int, name: str = "source", num_threads: int | None = None) -> DecodedImages:
    """Decode every record (dicts with ``image`` and optionally ``label``); undecodable ones are skipped.

    Images are scaled down to fit ``size``; the canvases are as large as the largest image, never
    larger than ``size`` (28 px Fashion-MNIST stays 28 px even for 224 px crops). PIL releases the
    GIL while decoding, so a thread pool uses every core.

    Raises:
        ValueError: when no record decodes.
    """
    rows = DecodedRows()
    skipped = SkippedRecords(name)
    latest = ""

    def decode_chunk(chunk: list[dict]) -> None:
        nonlocal latest
        decoded = DecodedRows.decode(chunk, size, pool)
        for index, reason in decoded.failures:
            skipped.add(chunk[index], reason)
            latest = f" (latest: {describe_record(chunk[index])}: {reason})"
        rows.extend(decoded)

    with ThreadPoolExecutor(max_workers=num_threads or os.cpu_count() or 1) as pool:
        chunk: list[dict] = []
        for record in records:
            chunk.append(record)
            if len(chunk) >= _CHUNK:
                decode_chunk(chunk)
                chunk = []
        decode_chunk(chunk)
    if not rows.kept:
        raise ValueError(
            f"data source {name!r}: none of its {rows.n_corrupt} records could be decoded as an image{latest}"
        )
    if rows.n_corrupt:
        logger.warning("data source %r: skipped %d undecodable records of %d", name, rows.n_corrupt, rows.n_records)
    side = max(max(extent) for extent in rows.extents)
    return DecodedImages(*rows.tensors(side), rows.n_corrupt, name)


def cache_key(name: str, size: int) -> str | None:
    """A key that changes when the source's files change; None for sources with no local files."""
    try:
        builder, kwargs = resolve_data_files(name)
    except (FileNotFoundError, ValueError):
        return None
    if "data_files" in kwargs:
        files = [Path(path) for path in kwargs["data_files"]]
    elif "data_dir" in kwargs:
        files = sorted(path for path in Path(kwargs["data_dir"]).rglob("*") if path.is_file())
    else:
        return None  # a Hub id: no stable local identity
    description = {
        "format": CACHE_FORMAT,
        "builder": builder,
        "size": size,
        "files": [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files],
    }
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()[:24]


def load_decoded(name: str, size: int, use_cache: bool = True) -> DecodedImages:
    """The whole source ``name`` decoded onto ``size`` canvases, from the disk cache when possible."""
    key = cache_key(name, size) if use_cache else None
    path = None if key is None else cache_dir() / "decoded" / f"{key}.safetensors"
    if path is not None and path.exists():
        try:
            tensors = load_file(str(path))
            metadata = json.loads((path.with_suffix(".json")).read_text())
            return DecodedImages(tensors["images"], tensors["extents"], tensors["labels"], metadata["n_corrupt"], name)
        except (OSError, ValueError, KeyError, SafetensorError) as error:  # a damaged cache is rebuilt, not fatal
            logger.warning("decoded cache %s is unreadable (%s): decoding %r again", path, error, name)
    decoded = decode_records(iter_records(load_source(name), name), size, name)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tensors = {"images": decoded.images, "extents": decoded.extents, "labels": decoded.labels}
        save_file(tensors, str(staging))
        path.with_suffix(".json").write_text(json.dumps({"source": name, "size": size, "n_corrupt": decoded.n_corrupt}))
        os.replace(staging, path)  # readers see the whole file or none
        logger.info("decoded %d images of %r into %s", len(decoded), name, path)
    return decoded
