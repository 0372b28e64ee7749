"""The frozen "backbones" of the head-only DINO experiment (:mod:`experiments.frozen_head`): the head's inputs.

* :class:`PixelViews`: raw pixels, ``(S * S)``-d flattened grayscale views cut on the fly
  (random resized crop, flip, brightness) with the library's batched crop kernels;
* :class:`FeatureBankViews`: a trained backbone (any ``AutoModel`` folder, e.g. an exported
  ``Dinov2Model``), run once over ``n_views`` augmented views per image
  (:func:`build_backbone_views`, cached on disk); each step takes two different cached views of an image.

:func:`backbone_views` builds either once per process, for every run on that backbone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hf_koleo.data.augment import CROP_ATTEMPTS, crop_and_resize, random_resized_boxes
from hf_koleo.data.counter_rng import sample_keys, uniforms
from hf_koleo.data.decoded import load_decoded
from hf_koleo.data.sources import cache_dir

logger = logging.getLogger(__name__)


# Fashion-MNIST pixel statistics (those of configs/fashion_mnist.yaml), to centre the raw pixels.
PIXEL_MEAN, PIXEL_STD = 0.286, 0.353
# Uniforms per view: the crop box attempts, a flip coin and a brightness factor.
_DRAWS_PER_VIEW = 4 * CROP_ATTEMPTS + 2


@dataclass
class ViewAugmentation:
    """The views both backbones see: random resized crop, horizontal flip, brightness."""

    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    brightness: float = 0.4

    def __call__(self, images: torch.Tensor, extents: torch.Tensor, keys: torch.Tensor, n_views: int, size: int):
        """``n_views`` views of each image, a pure function of its key.

        Args:
            images: ``(batch, C, S, S)`` uint8 canvases.
            extents: ``(batch, 2)`` image ``(height, width)`` on its canvas.
            keys: ``(batch,)`` int64 keys from :func:`sample_keys`.
            n_views: views per image.
            size: output side.

        Returns:
            ``(batch, n_views, C, size, size)`` float in [0, 1].
        """
        batch = images.shape[0]
        draws = uniforms(keys, n_views * _DRAWS_PER_VIEW, "global_crops").reshape(batch, n_views, -1)
        boxes = random_resized_boxes(
            draws[..., : 4 * CROP_ATTEMPTS].reshape(batch * n_views, -1),
            extents.repeat_interleave(n_views, dim=0),
            list(self.crop_scale),
            list(self.crop_ratio),
        ).reshape(batch, n_views, 4)
        flips = draws[..., 4 * CROP_ATTEMPTS] < self.flip_probability
        crops = crop_and_resize(images.float() / 255.0, boxes, flips, size, extents)
        factor = 1.0 - self.brightness + 2.0 * self.brightness * draws[..., 4 * CROP_ATTEMPTS + 1]
        return (crops * factor[..., None, None, None]).clamp(0.0, 1.0)


class Views(Protocol):
    """What the head trains on: ``n_images`` images, each giving ``dim``-d inputs."""

    n_images: int
    dim: int
    labels: torch.Tensor | None  # (n_images,) class ids, for the cluster metrics (None: unlabelled)

    def views(self, indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``(batch, 2, dim)``: two augmented views of each indexed image."""

    def clean(self, indices: torch.Tensor) -> torch.Tensor:
        """``(batch, dim)``: the un-augmented image (for arg-max utilisation)."""


@dataclass
class PixelViews:
    """Raw pixels as the frozen backbone: flattened, centred grayscale crops at the image's own size."""

    images: torch.Tensor  # (N, 1, S, S) uint8
    extents: torch.Tensor  # (N, 2)
    labels: torch.Tensor | None = None
    augmentation: ViewAugmentation = field(default_factory=ViewAugmentation)

    @property
    def n_images(self) -> int:
        return self.images.shape[0]

    @property
    def dim(self) -> int:
        return self.images.shape[-1] * self.images.shape[-2]

    def views(self, indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        crops = self.augmentation(self.images[indices], self.extents[indices], keys, 2, self.images.shape[-1])
        return (crops.flatten(2) - PIXEL_MEAN) / PIXEL_STD

    def clean(self, indices: torch.Tensor) -> torch.Tensor:
        return (self.images[indices].flatten(1).float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


@dataclass
class FeatureBankViews:
    """Cached features of ``V`` augmented views per image; a step draws two different ones."""

    bank: torch.Tensor  # (N, V, D)
    clean_features: torch.Tensor  # (N, D)
    labels: torch.Tensor | None = None

    @property
    def n_images(self) -> int:
        return self.bank.shape[0]

    @property
    def dim(self) -> int:
        return self.bank.shape[-1]

    def views(self, indices: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        n_views = self.bank.shape[1]
        draws = uniforms(keys, 2, "global_crops")
        first = (draws[:, 0] * n_views).long()
        second = (first + 1 + (draws[:, 1] * (n_views - 1)).long()) % n_views  # never the first
        return self.bank[indices[:, None], torch.stack([first, second], dim=1)]

    def clean(self, indices: torch.Tensor) -> torch.Tensor:
        return self.clean_features[indices]


def load_pixel_views(source: str, limit: int | None = None) -> PixelViews:
    """The first ``limit`` images of a data source (e.g. ``fashion_mnist:train``) as :class:`PixelViews`."""
    decoded = load_decoded(source, 28)
    stop = len(decoded) if limit is None else min(limit, len(decoded))
    return PixelViews(decoded.images[:stop, :1].contiguous(), decoded.extents[:stop], decoded.labels[:stop])


def _model_fingerprint(model_dir: Path) -> list:
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model_dir.iterdir()) if p.is_file()]


def _processor_geometry(processor) -> tuple[int, list[float], list[float]]:
    """Input side, mean and std the backbone was trained with, from its image processor."""
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        size = processor.crop_size["height"]
    else:
        size = processor.size.get("height") or processor.size["shortest_edge"]
    return int(size), list(processor.image_mean), list(processor.image_std)


@torch.no_grad()
def build_backbone_views(
    model_dir: str | Path,
    source: str,
    n_images: int,
    n_views: int,
    seed: int = 0,
    batch_size: int = 256,
    use_cache: bool = True,
) -> FeatureBankViews:
    """Run a frozen backbone once over ``n_views`` augmented views and the clean view of each image.

    Views come from the 28 px canvases with :class:`ViewAugmentation`, resized to the backbone's
    input side and normalised with its image processor's mean and std; the feature is the CLS
    token of ``last_hidden_state`` (as ``hf_koleo.evaluation.features`` takes it). The clean view
    is the whole image resized the same way (bilinear, no crop). Cached under
    ``$HF_KOLEO_CACHE/frozen_head/`` keyed by the model files and every argument.

    Returns:
        :class:`FeatureBankViews` with ``bank`` ``(n_images, n_views, hidden)``.
    """
    from transformers import AutoImageProcessor, AutoModel

    model_dir = Path(model_dir)
    augmentation = ViewAugmentation()
    key = json.dumps([_model_fingerprint(model_dir), source, n_images, n_views, seed, asdict(augmentation)])
    cache_path = cache_dir() / "frozen_head" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    if use_cache and cache_path.exists():
        tensors = load_file(str(cache_path))
        n_cached = tensors["bank"].shape[0]
        return FeatureBankViews(tensors["bank"], tensors["clean"], load_decoded(source, 28).labels[:n_cached])
    backbone = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval()
    size, mean, std = _processor_geometry(AutoImageProcessor.from_pretrained(model_dir))
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    decoded = load_decoded(source, 28)
    n_images = min(n_images, len(decoded))
    full_boxes = torch.cat([torch.zeros(n_images, 2), decoded.extents[:n_images].flip(1).float()], dim=1)

    def embed(pixels: torch.Tensor) -> torch.Tensor:  # (n, 3, size, size) in [0, 1] -> (n, hidden)
        return backbone(pixel_values=(pixels - mean_t) / std_t).last_hidden_state[:, 0].float()

    banks, cleans = [], []
    for start in range(0, n_images, batch_size):
        indices = torch.arange(start, min(start + batch_size, n_images))
        images, extents = decoded.images[indices], decoded.extents[indices]
        views = augmentation(images, extents, sample_keys(seed, 0, indices), n_views, size)
        banks.append(embed(views.flatten(0, 1)).reshape(len(indices), n_views, -1))
        whole = crop_and_resize(
            images.float() / 255.0, full_boxes[indices, None], torch.zeros(len(indices), 1, dtype=torch.bool), size
        )
        cleans.append(embed(whole[:, 0]))
        logger.info("backbone views: %d / %d images", indices[-1] + 1, n_images)
    bank_views = FeatureBankViews(torch.cat(banks), torch.cat(cleans), decoded.labels[:n_images])
    if use_cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        staging = cache_path.with_name(cache_path.name + ".tmp")
        save_file({"bank": bank_views.bank, "clean": bank_views.clean_features}, str(staging))
        staging.replace(cache_path)
    return bank_views


# Views are built once per process and backbone (a feature bank takes minutes), for every run on it.
_VIEWS: dict[str, tuple[Views, dict[str, Any]]] = {}


def backbone_views(backbone: dict[str, Any]) -> tuple[Views, dict[str, Any]]:
    """The views of a frozen backbone and a description of them, built once per process.

    ``backbone``: ``model`` (``"pixels"``, or a folder ``AutoModel`` loads with its image processor),
    ``data`` (a source), ``n_images`` (default: all for pixels), ``n_views`` (cached views per image,
    models only), ``cache`` (default true), ``description``.
    """
    key = json.dumps(backbone, sort_keys=True)
    if key not in _VIEWS:
        start = time.perf_counter()
        if backbone["model"] == "pixels":
            views: Views = load_pixel_views(backbone["data"], limit=backbone.get("n_images"))
        else:
            if not Path(backbone["model"]).is_dir():
                raise FileNotFoundError(
                    f"backbone {backbone['model']!r} is not a folder (export one with scripts/pretrain.py)"
                )
            views = build_backbone_views(
                backbone["model"],
                backbone["data"],
                n_images=backbone["n_images"],
                n_views=backbone["n_views"],
                use_cache=backbone.get("cache", True),
            )
        info = {
            "description": backbone.get("description", backbone["model"]),
            "dim": views.dim,
            "n_images": views.n_images,
            "mean_cosine_to_mean": feature_concentration(views.clean(torch.arange(min(views.n_images, 4096)))),
            "setup_seconds": time.perf_counter() - start,
        }
        _VIEWS[key] = (views, info)
    return _VIEWS[key]


def feature_concentration(features: torch.Tensor) -> float:
    """Mean cosine between ``(n, d)`` features and their mean: 1 when they all point one way."""
    unit = F.normalize(features.float(), dim=1)
    return float((unit @ F.normalize(unit.mean(dim=0), dim=0)).mean())
