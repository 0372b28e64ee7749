"""Frozen features of any transformers vision backbone (or raw pixels), cached in safetensors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..backbone_export import check_weight_files
from ..data.images import decode_image
from ..data.sources import cache_dir, load_source, looks_like_path, resolve_data_files

logger = logging.getLogger(__name__)
PIXELS = "pixels"


@dataclass
class FeatureSet:
    """``cls`` ``(n, d)``, ``patch_mean`` ``(n, d)`` (None for pixels) and ``labels`` ``(n,)``."""

    cls: torch.Tensor
    patch_mean: torch.Tensor | None
    labels: torch.Tensor
    skipped: int = 0

    def probe_features(self) -> torch.Tensor:
        """CLS ⊕ mean of patch tokens (DINO's linear-probe input), or the pixels."""
        return self.cls if self.patch_mean is None else torch.cat([self.cls, self.patch_mean], dim=1)


def _path_fingerprint(path: Path) -> list:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _fingerprint(name: str) -> list:
    """What identifies a model or data source's content: file sizes and times, or the name."""
    path = Path(name).expanduser()
    if path.exists():
        return _path_fingerprint(path)
    if name == PIXELS:
        return [name]
    try:
        _, kwargs = resolve_data_files(name)
    except (FileNotFoundError, ValueError):
        return [name]
    files = kwargs.get("data_files") or []
    return [item for file in files for item in _path_fingerprint(Path(file))] or [name]


def feature_cache_path(model: str, data: str, limit: int | None, pixel_size: int | None) -> Path:
    key = json.dumps([model, _fingerprint(model), data, _fingerprint(data), limit, pixel_size], default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir() / "features" / f"{digest}.safetensors"


def _pixels(images, size: int) -> torch.Tensor:
    rows = []
    for image in images:
        resized = image.resize((size, size)) if image.size != (size, size) else image
        rows.append(torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).float() / 255.0)
    return torch.stack(rows)


def default_device() -> str:
    """The accelerator when one is present (``cuda``, ``mps``, ...), else ``cpu``."""
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator().type
    return "cpu"


def check_model(model: str, allow_pickle: bool = False) -> None:
    """Fail before any work on a model that cannot load: a missing folder or pickle-only weights.

    Args:
        model: ``"pixels"``, a local model folder or a Hub id.
        allow_pickle: accept a folder that holds only ``pytorch_model.bin`` (pickle runs code when loaded).
    """
    if model == PIXELS:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        check_weight_files(path, allow_pickle)
    elif path.exists():
        raise ValueError(f"model {model!r} is a file: give a model folder, a Hub model id or 'pixels'")
    elif looks_like_path(model):
        raise FileNotFoundError(
            f"model {model!r} does not exist: no such folder {str(path.absolute())!r} (a Hub model id is owner/name)"
        )


def _load_backbone(model: str, device: str, allow_pickle: bool = False):
    from transformers import AutoImageProcessor, AutoModel

    from .. import KoLeoDinoConfig  # noqa: F401 - registers koleo_dino with the Auto classes

    # Without allow_pickle only safetensors load (a Hub repo with only pytorch_model.bin is refused too).
    use_safetensors = None if allow_pickle else True
    backbone = AutoModel.from_pretrained(model, use_safetensors=use_safetensors).to(device).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{model} has no image processor (preprocessor_config.json); export it with scripts/export.py"
        ) from error
    return backbone, processor


@torch.no_grad()
def extract_features(
    model: str,
    data: str,
    batch_size: int = 64,
    limit: int | None = None,
    device: str = "cpu",
    pixel_size: int | None = None,
    use_cache: bool = True,
    progress: bool = True,
    allow_pickle: bool = False,
) -> FeatureSet:
    """Features of the first ``limit`` (all if None) decodable images of ``data``.

    Args:
        model: a folder or Hub id loadable with ``AutoModel`` + ``AutoImageProcessor``, or
            ``"pixels"`` (raw RGB pixels in [0, 1], resized to ``pixel_size``, default the size of
            the first image).
        data: a data source name (see :func:`hf_koleo.data.sources.load_source`).
        use_cache: reuse / write ``$HF_KOLEO_CACHE/features/<key>.safetensors``; the key covers the
            model and data (names and file sizes/times), ``limit`` and ``pixel_size``.
        allow_pickle: load a model that has only pickle weights (``pytorch_model.bin``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (None for every image), got {limit}")
    check_model(model, allow_pickle)
    cache_path = feature_cache_path(model, data, limit, pixel_size)
    if use_cache and cache_path.exists():
        tensors = load_file(str(cache_path))
        logger.info("features of %s on %s read from %s", model, data, cache_path)
        return FeatureSet(tensors["cls"], tensors.get("patch_mean"), tensors["labels"], int(tensors["skipped"]))
    backbone, processor = (None, None) if model == PIXELS else _load_backbone(model, device, allow_pickle)
    cls_rows, patch_rows, labels, skipped, batch = [], [], [], 0, []

    def flush() -> None:
        images = [image for image, _ in batch]
        labels.extend(label for _, label in batch)
        if backbone is None:
            cls_rows.append(_pixels(images, pixel_size))
        else:
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
            output = backbone(pixel_values=pixel_values)
            tokens = output.last_hidden_state
            if tokens.dim() == 3:
                cls_rows.append(tokens[:, 0].float().cpu())
                patch_rows.append(tokens[:, 1:].mean(dim=1).float().cpu())
            else:
                cls_rows.append(output.pooler_output.flatten(1).float().cpu())
        batch.clear()

    bar = tqdm(desc=f"features {Path(model).name or model} / {data}", unit="img", disable=not progress, total=limit)
    for record in load_source(data):
        if limit is not None and len(labels) + len(batch) >= limit:
            break
        image = decode_image(record["image"])
        if image is None:
            skipped += 1
            continue
        pixel_size = pixel_size or image.size[0]
        label = record.get("label")
        batch.append((image, -1 if label is None else int(label)))
        if len(batch) == batch_size:
            flush()
            bar.update(batch_size)
    if batch:
        bar.update(len(batch))
        flush()
    bar.close()
    if not labels:
        raise ValueError(f"no decodable images in {data}")
    features = FeatureSet(
        torch.cat(cls_rows), torch.cat(patch_rows) if patch_rows else None, torch.tensor(labels), skipped
    )
    if use_cache:
        tensors = {"cls": features.cls, "labels": features.labels, "skipped": torch.tensor(skipped)}
        if features.patch_mean is not None:
            tensors["patch_mean"] = features.patch_mean
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        staging = cache_path.with_suffix(f".tmp-{os.getpid()}")
        save_file(tensors, str(staging), metadata={"model": model, "data": data})
        os.replace(staging, cache_path)
    return features
