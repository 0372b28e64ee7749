"""DINO multi-crop augmentation as a few batched tensor operations, on the accelerator when there is one.

:class:`MultiCropAugmentation` turns a batch of ``uint8`` images (stored once, decoded once) and
one random *key* per image into every view DINO needs: random resized crops with flips for the
two global and N local crops (one ``grid_sample`` call per crop size for the whole batch), then
colour jitter, grayscale, Gaussian blur, solarisation and normalisation. All randomness comes
from :mod:`counter_rng`, so the views of an image are a pure function of ``(seed, epoch, image)``:
the same whatever the batch, process count, worker count, device or resumption.

Images are stored on a square canvas (``(3, S, S)``) with their real ``(height, width)`` extent
in the top-left corner, so images of different shapes share one tensor and crops never see the
padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .counter_rng import uniforms

# Columns of the per-crop photometric parameter rows.
BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAYSCALE, BLUR_SIGMA, SOLARIZE = range(7)
N_PHOTOMETRIC = 7
# A parameter row that leaves a crop unchanged (only normalised by ``photometric``).
IDENTITY_PARAMETERS = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
# Uniforms per crop: jitter coin, 4 jitter factors, grayscale coin, blur coin, sigma, solarise coin.
N_PHOTOMETRIC_DRAWS = 9
# Random resized crop tries before falling back to a centred crop (as torchvision).
CROP_ATTEMPTS = 10
_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@dataclass
class MultiCropConfig:
    """Multi-crop augmentation settings (DINO defaults)."""

    global_crops_size: int = field(default=224, metadata={"help": "Side of the global crops (pixels)."})
    global_crops_scale: list[float] = field(
        default_factory=lambda: [0.25, 1.0], metadata={"help": "Area range of global crops."}
    )
    local_crops_number: int = field(default=8, metadata={"help": "Local crops per image (0 disables)."})
    local_crops_size: int = field(default=96, metadata={"help": "Side of the local crops (pixels)."})
    local_crops_scale: list[float] = field(
        default_factory=lambda: [0.05, 0.25], metadata={"help": "Area range of local crops."}
    )
    crop_aspect_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_probability: float = 0.5
    jitter_probability: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_probability: float = 0.2
    blur_probability: list[float] = field(
        default_factory=lambda: [1.0, 0.1, 0.5], metadata={"help": "Blur probability: global 1, global 2, locals."}
    )
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_probability: list[float] = field(
        default_factory=lambda: [0.0, 0.2, 0.0], metadata={"help": "Solarisation probability: global 1, 2, locals."}
    )
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def check_augmentation(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        for name in ("global_crops_scale", "local_crops_scale", "crop_aspect_ratio", "blur_sigma"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                raise ValueError(f"{name} must be two numbers 0 < low <= high, got {low_high}")
        for name in ("global_crops_scale", "local_crops_scale"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"{name} is a fraction of the image area and must be <= 1, got {getattr(self, name)}")
        for name in ("global_crops_size", "local_crops_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {self.local_crops_number}")
        for name in ("flip_probability", "jitter_probability", "grayscale_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("blur_probability", "solarize_probability"):
            values = getattr(self, name)
            if len(values) != 3 or not all(0 <= value <= 1 for value in values):
                raise ValueError(f"{name} must be three probabilities (global 1, global 2, locals), got {values}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)}")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be > 0, got {self.image_std}")


def random_resized_boxes(
    draws: torch.Tensor, extents: torch.Tensor, scale: list[float], ratio: list[float]
) -> torch.Tensor:
    """Crop boxes as torchvision's ``RandomResizedCrop`` draws them, for many crops at once.

    Args:
        draws: ``(n, 4 * CROP_ATTEMPTS)`` uniforms in [0, 1).
        extents: ``(n, 2)`` image ``(height, width)`` in pixels.
        scale, ratio: area fraction and aspect-ratio ranges.

    Returns:
        ``(n, 4)`` float ``(left, top, width, height)`` in whole pixels, inside the extent: the
        first of ``CROP_ATTEMPTS`` tries that fits, else the largest centred crop within the
        ratio range (torchvision's fallback).
    """
    attempts = CROP_ATTEMPTS
    height, width = extents[:, 0:1].float(), extents[:, 1:2].float()
    area_draw, ratio_draw, left_draw, top_draw = draws.float().split(attempts, dim=1)
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * area_draw)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * ratio_draw)
    crop_width = torch.round(torch.sqrt(target_area * aspect))
    crop_height = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_width > 0) & (crop_width <= width) & (crop_height > 0) & (crop_height <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt (0 if none)
    crop_width, crop_height = crop_width.gather(1, first), crop_height.gather(1, first)
    left = torch.floor(left_draw.gather(1, first) * (width - crop_width + 1))
    top = torch.floor(top_draw.gather(1, first) * (height - crop_height + 1))
    # Fallback: the largest centred crop within the ratio range.
    image_ratio = width / height
    fallback_width = torch.where(image_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_height = torch.where(image_ratio < ratio[0], torch.round(width / ratio[0]), height)
    fallback = torch.cat(
        [
            torch.div(width - fallback_width, 2, rounding_mode="floor"),
            torch.div(height - fallback_height, 2, rounding_mode="floor"),
            fallback_width,
            fallback_height,
        ],
        dim=1,
    )
    boxes = torch.cat([left, top, crop_width, crop_height], dim=1)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)


def crop_and_resize(
    images: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    extents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cut ``n_crops`` boxes out of every image and resize them to ``size`` (bilinear), in one call.

    Args:
        images: ``(batch, C, H, W)`` float.
        boxes: ``(batch, n_crops, 4)`` ``(left, top, width, height)`` in pixels of ``images``.
        flips: ``(batch, n_crops)`` bool, mirror the crop horizontally.
        size: output side.
        extents: optional ``(batch, 2)`` ``(height, width)`` of the image on its canvas: samples
            are clamped to it, so the padding beyond never bleeds into a crop's edge.

    Returns:
        ``(batch, n_crops, C, size, size)``.
    """
    batch, channels, height, width = images.shape
    n_crops = boxes.shape[1]
    left, top, box_width, box_height = boxes.float().unbind(-1)
    # affine_grid maps output coordinates in [-1, 1] onto the box in normalised input coordinates.
    scale_x = torch.where(flips, -box_width / width, box_width / width)
    zeros = torch.zeros_like(scale_x)
    theta = torch.stack(
        [
            torch.stack([scale_x, zeros, (2 * left + box_width) / width - 1], dim=-1),
            torch.stack([zeros, box_height / height, (2 * top + box_height) / height - 1], dim=-1),
        ],
        dim=-2,
    ).reshape(batch * n_crops, 2, 3)
    grid = F.affine_grid(theta, [batch * n_crops, channels, size, size], align_corners=False)
    # All crops of an image stacked along the grid's height: one grid_sample, no copy of the images.
    grid = grid.reshape(batch, n_crops * size, size, 2)
    if extents is not None:
        # The centre of the image's last row / column, in normalised canvas coordinates.
        extent_height, extent_width = extents.float().unbind(-1)
        limit = torch.stack([(2 * extent_width - 1) / width - 1, (2 * extent_height - 1) / height - 1], dim=-1)
        grid = torch.minimum(grid, limit[:, None, None, :])
    crops = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return crops.reshape(batch, channels, n_crops, size, size).transpose(1, 2)


class MultiCropAugmentation:
    """DINO's multi-crop views: 2 global crops (teacher and student) and N local crops (student)."""

    def __init__(self, config: MultiCropConfig) -> None:
        config.check_augmentation()
        self.config = config
        self._constants: dict[tuple[str, torch.device], torch.Tensor] = {}

    CONSTANTS = ("mean", "std", "luma", "rgb_to_yiq", "yiq_to_rgb")

    def place_constants(self, device: torch.device | str) -> MultiCropAugmentation:
        """Copy the small constant tensors to ``device`` now, before training: a host-to-device copy
        waits for the host, so the loop's first batch should not make it."""
        device = torch.device(device)
        if device.index is None and device.type not in ("cpu", "meta"):
            # "cuda" (what accelerate names a single GPU) is the tensors' "cuda:0": key on the latter.
            device = torch.empty(0, device=device).device
        for name in self.CONSTANTS:
            self._constant(name, device)
        return self

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        """Small constant tensors, copied to each device once (see :meth:`place_constants`); ``device``
        is a tensor's (indexed: ``cuda:0``)."""
        key = (name, device)
        if key not in self._constants:
            values = {
                "mean": self.config.image_mean,
                "std": self.config.image_std,
                "luma": _LUMA,
                "rgb_to_yiq": _RGB_TO_YIQ,
                "yiq_to_rgb": torch.linalg.inv(_RGB_TO_YIQ),
            }[name]
            self._constants[key] = torch.as_tensor(values, dtype=torch.float32).to(device)
        return self._constants[key]

    def photometric_parameters(self, draws: torch.Tensor, crop_kinds: tuple[int, ...]) -> torch.Tensor:
        """Photometric parameter rows from uniforms, for every crop of a batch at once.

        Args:
            draws: ``(batch, n_crops, N_PHOTOMETRIC_DRAWS)`` uniforms in [0, 1).
            crop_kinds: per crop, 0 / 1 = global crop 1 / 2, 2 = local (blur and solarisation
                probabilities differ, as in DINO).

        Returns:
            ``(batch, n_crops, 7)`` rows (columns ``BRIGHTNESS`` ... ``SOLARIZE``).
        """
        config = self.config
        jitter = draws[..., 0] < config.jitter_probability

        def jittered(draw: torch.Tensor, low: float, high: float, identity: float) -> torch.Tensor:
            return torch.where(jitter, low + (high - low) * draw, torch.full_like(draw, identity))

        def per_crop(probabilities: list[float]) -> torch.Tensor:
            # (n_crops,) thresholds built on the device from Python numbers (no host-to-device copy).
            thresholds = torch.full((len(crop_kinds),), probabilities[2], device=draws.device)
            position = torch.arange(len(crop_kinds), device=draws.device)
            for crop, kind in enumerate(crop_kinds):
                if kind < 2:
                    thresholds = torch.where(position == crop, probabilities[kind], thresholds)
            return thresholds

        blur = draws[..., 6] < per_crop(config.blur_probability)
        sigma_low, sigma_high = config.blur_sigma
        sigma = torch.where(blur, sigma_low + (sigma_high - sigma_low) * draws[..., 7], torch.zeros_like(draws[..., 7]))
        columns = [
            jittered(draws[..., 1], max(0.0, 1 - config.brightness), 1 + config.brightness, 1.0),
            jittered(draws[..., 2], max(0.0, 1 - config.contrast), 1 + config.contrast, 1.0),
            jittered(draws[..., 3], max(0.0, 1 - config.saturation), 1 + config.saturation, 1.0),
            jittered(draws[..., 4], -config.hue, config.hue, 0.0),
            (draws[..., 5] < config.grayscale_probability).float(),
            sigma,
            (draws[..., 8] < per_crop(config.solarize_probability)).float(),
        ]
        return torch.stack(columns, dim=-1)

    def _views(
        self, images: torch.Tensor, extents: torch.Tensor, keys: torch.Tensor, kind: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops ``(batch, n, 3, s, s)`` in [0, 1] and their parameters ``(batch, n, 7)``."""
        config = self.config
        if kind == "global_crops":
            n_crops, size, scale, crop_kinds = 2, config.global_crops_size, config.global_crops_scale, (0, 1)
        else:
            n_crops, size, scale = config.local_crops_number, config.local_crops_size, config.local_crops_scale
            crop_kinds = (2,) * n_crops
        batch = images.shape[0]
        per_crop = 4 * CROP_ATTEMPTS + 1 + N_PHOTOMETRIC_DRAWS
        draws = uniforms(keys, n_crops * per_crop, kind).reshape(batch, n_crops, per_crop)
        box_draws = draws[..., : 4 * CROP_ATTEMPTS].reshape(batch * n_crops, -1)
        crop_extents = extents.repeat_interleave(n_crops, dim=0)
        boxes = random_resized_boxes(box_draws, crop_extents, scale, config.crop_aspect_ratio)
        flips = draws[..., 4 * CROP_ATTEMPTS] < config.flip_probability
        crops = crop_and_resize(images, boxes.reshape(batch, n_crops, 4), flips, size, extents)
        parameters = self.photometric_parameters(draws[..., 4 * CROP_ATTEMPTS + 1 :], crop_kinds)
        return crops, parameters

    def __call__(self, images: torch.Tensor, extents: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every view of a batch, normalised, on the device of ``images``.

        Args:
            images: ``(batch, 3, S, S)`` uint8 canvases.
            extents: ``(batch, 2)`` ``(height, width)`` of each image on its canvas.
            keys: ``(batch,)`` int64 keys from :func:`counter_rng.sample_keys` (or a stream's
                per-record keys).

        Returns:
            ``global_crops`` ``(batch, 2, 3, G, G)`` and, when ``local_crops_number > 0``,
            ``local_crops`` ``(batch, N, 3, L, L)``, float32, normalised.
        """
        pixels = images.float() * (1.0 / 255.0)
        extents = extents.to(pixels.device)
        views = {}
        kinds = ("global_crops", "local_crops") if self.config.local_crops_number > 0 else ("global_crops",)
        for kind in kinds:
            crops, parameters = self._views(pixels, extents, keys, kind)
            views[kind] = self.photometric(crops, parameters)
        return views

    def photometric(self, crops: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """Apply per-crop photometric parameters to a batch and normalise.

        Args:
            crops: ``(..., 3, H, W)`` uint8 (or float in [0, 1]).
            parameters: ``(..., 7)`` rows from :meth:`photometric_parameters`.

        Returns:
            ``(..., 3, H, W)`` float32, normalised with ``image_mean`` / ``image_std``.
        """
        leading = crops.shape[:-3]
        pixels = crops.reshape(-1, *crops.shape[-3:])
        pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        device = pixels.device
        rows = parameters.reshape(-1, N_PHOTOMETRIC).to(device=device, dtype=torch.float32)
        per_image = rows[:, :, None, None]  # (n, 7, 1, 1)
        luma_weights = self._constant("luma", device).view(1, 3, 1, 1)
        pixels = (pixels * per_image[:, BRIGHTNESS : BRIGHTNESS + 1]).clamp(0, 1)
        mean_luma = _luma(pixels, luma_weights).mean(dim=(-3, -2, -1), keepdim=True)
        pixels = ((pixels - mean_luma) * per_image[:, CONTRAST : CONTRAST + 1] + mean_luma).clamp(0, 1)
        luma = _luma(pixels, luma_weights)
        pixels = ((pixels - luma) * per_image[:, SATURATION : SATURATION + 1] + luma).clamp(0, 1)
        pixels = _rotate_hue(
            pixels, rows[:, HUE], self._constant("rgb_to_yiq", device), self._constant("yiq_to_rgb", device)
        ).clamp(0, 1)
        gray = per_image[:, GRAYSCALE : GRAYSCALE + 1]
        pixels = pixels * (1 - gray) + _luma(pixels, luma_weights) * gray
        pixels = _gaussian_blur(pixels, rows[:, BLUR_SIGMA], self.config.blur_sigma[1])
        solarize = per_image[:, SOLARIZE : SOLARIZE + 1].bool() & (pixels >= 0.5)
        pixels = torch.where(solarize, 1.0 - pixels, pixels)
        mean = self._constant("mean", device).view(1, 3, 1, 1)
        std = self._constant("std", device).view(1, 3, 1, 1)
        return ((pixels - mean) / std).reshape(*leading, *pixels.shape[1:])


def _luma(pixels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(n, 3, H, W) -> (n, 1, H, W)`` ITU-R 601 luma (``weights`` ``(1, 3, 1, 1)``)."""
    return (pixels * weights).sum(dim=1, keepdim=True)


def _rotate_hue(
    pixels: torch.Tensor, hue: torch.Tensor, rgb_to_yiq: torch.Tensor, yiq_to_rgb: torch.Tensor
) -> torch.Tensor:
    """Rotate the chroma plane of YIQ by ``2 * pi * hue`` per image (``hue`` in [-0.5, 0.5])."""
    angle = 2 * math.pi * hue
    cos, sin = angle.cos(), angle.sin()
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack(
        [torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1), torch.stack([zero, sin, cos], -1)], -2
    )
    transform = yiq_to_rgb @ rotation @ rgb_to_yiq  # (n, 3, 3)
    return torch.einsum("nij,njhw->nihw", transform, pixels)


def _gaussian_blur(pixels: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image; sigma 0 leaves the image unchanged.

    Always convolves (no data-dependent shortcut: checking whether any sigma is > 0 would read
    a device value on the host)."""
    n_images, channels, height, width = pixels.shape
    radius = min(int(math.ceil(3 * max_sigma)), height - 1, width - 1)
    if radius < 1:
        return pixels
    offsets = torch.arange(-radius, radius + 1, device=pixels.device, dtype=pixels.dtype)
    safe_sigma = sigma.clamp(min=1e-3)[:, None]
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * safe_sigma**2))
    identity = (offsets == 0).to(pixels.dtype)[None].expand_as(kernel)
    kernel = torch.where(sigma[:, None] > 0, kernel / kernel.sum(dim=1, keepdim=True), identity)
    kernel = kernel.repeat_interleave(channels, dim=0)  # (n * 3, k)
    grouped = pixels.reshape(1, n_images * channels, height, width)
    grouped = F.pad(grouped, (radius, radius, radius, radius), mode="reflect")
    grouped = F.conv2d(grouped, kernel[:, None, None, :], groups=n_images * channels)
    grouped = F.conv2d(grouped, kernel[:, None, :, None], groups=n_images * channels)
    return grouped.reshape(n_images, channels, height, width)
