"""DINO multi-crop augmentation, split where it runs best.

* :meth:`MultiCropAugmentation.sample` (DataLoader workers, per image): random resized crops and
  flips with PIL, and the *random parameters* of every photometric operation, all drawn from a
  generator seeded by the sample itself, so the views of an image do not depend on worker count,
  process count or resumption.
* :meth:`MultiCropAugmentation.photometric` (main process, batched, on the accelerator when there
  is one): colour jitter, grayscale, Gaussian blur, solarisation and normalisation applied to a
  whole batch of crops at once from those parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Columns of the per-crop photometric parameter rows.
BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAYSCALE, BLUR_SIGMA, SOLARIZE = range(7)
N_PHOTOMETRIC = 7
# A parameter row that leaves a crop unchanged (only normalised by ``photometric``).
IDENTITY_PARAMETERS = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
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


def random_resized_crop_box(
    width: int, height: int, scale: list[float], ratio: list[float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)`` as torchvision's RandomResizedCrop draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(draws[2] * (width - crop_width + 1))
            top = int(draws[3] * (height - crop_height + 1))
            return left, top, crop_width, crop_height
    # Fallback: the largest centred crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` uint8 tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def centre_crop(image: Image.Image, size: int) -> torch.Tensor:
    """The largest centred square, resized to ``size`` (the evaluation view): ``(3, size, size)`` uint8."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return to_uint8_tensor(
        image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    )


class MultiCropAugmentation:
    """DINO's multi-crop views: 2 global crops (teacher and student) and N local crops (student)."""

    def __init__(self, config: MultiCropConfig) -> None:
        config.check_augmentation()
        self.config = config

    def _uniform(self, generator: torch.Generator, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

    def _photometric_parameters(self, crop_kind: int, generator: torch.Generator) -> list[float]:
        """Random parameters of one crop; ``crop_kind`` 0/1 = global crop 1/2, 2 = local."""
        config = self.config
        row = list(IDENTITY_PARAMETERS)
        if self._uniform(generator, 0, 1) < config.jitter_probability:
            row[BRIGHTNESS] = self._uniform(generator, max(0.0, 1 - config.brightness), 1 + config.brightness)
            row[CONTRAST] = self._uniform(generator, max(0.0, 1 - config.contrast), 1 + config.contrast)
            row[SATURATION] = self._uniform(generator, max(0.0, 1 - config.saturation), 1 + config.saturation)
            row[HUE] = self._uniform(generator, -config.hue, config.hue)
        row[GRAYSCALE] = float(self._uniform(generator, 0, 1) < config.grayscale_probability)
        if self._uniform(generator, 0, 1) < config.blur_probability[crop_kind]:
            row[BLUR_SIGMA] = self._uniform(generator, *config.blur_sigma)
        row[SOLARIZE] = float(self._uniform(generator, 0, 1) < config.solarize_probability[crop_kind])
        return row

    def _crop(self, image: Image.Image, size: int, scale: list[float], generator: torch.Generator) -> torch.Tensor:
        left, top, width, height = random_resized_crop_box(
            image.width, image.height, scale, self.config.crop_aspect_ratio, generator
        )
        crop = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
        pixels = to_uint8_tensor(crop)
        if self._uniform(generator, 0, 1) < self.config.flip_probability:
            pixels = pixels.flip(-1)
        return pixels

    def sample(self, image: Image.Image, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Crops of one RGB image and their photometric parameters.

        Returns:
            ``global_crops`` ``(2, 3, S, S)`` uint8, ``global_params`` ``(2, 7)``, and when
            ``local_crops_number > 0`` ``local_crops`` ``(N, 3, s, s)`` uint8 and
            ``local_params`` ``(N, 7)``.
        """
        config = self.config
        views = {
            "global_crops": torch.stack(
                [self._crop(image, config.global_crops_size, config.global_crops_scale, generator) for _ in range(2)]
            ),
            "global_params": torch.tensor([self._photometric_parameters(kind, generator) for kind in (0, 1)]),
        }
        if config.local_crops_number > 0:
            views["local_crops"] = torch.stack(
                [
                    self._crop(image, config.local_crops_size, config.local_crops_scale, generator)
                    for _ in range(config.local_crops_number)
                ]
            )
            views["local_params"] = torch.tensor(
                [self._photometric_parameters(2, generator) for _ in range(config.local_crops_number)]
            )
        return views

    def photometric(self, crops: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """Apply per-crop photometric parameters to a batch and normalise.

        Args:
            crops: ``(..., 3, H, W)`` uint8 (or float in [0, 1]).
            parameters: ``(..., 7)`` rows from :meth:`sample`.

        Returns:
            ``(..., 3, H, W)`` float32, normalised with ``image_mean`` / ``image_std``.
        """
        leading = crops.shape[:-3]
        pixels = crops.reshape(-1, *crops.shape[-3:])
        pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
        rows = parameters.reshape(-1, N_PHOTOMETRIC).to(device=pixels.device, dtype=torch.float32)
        per_image = rows[:, :, None, None]  # (n, 7, 1, 1)
        pixels = (pixels * per_image[:, BRIGHTNESS : BRIGHTNESS + 1]).clamp(0, 1)
        mean_luma = _luma(pixels).mean(dim=(-3, -2, -1), keepdim=True)
        pixels = ((pixels - mean_luma) * per_image[:, CONTRAST : CONTRAST + 1] + mean_luma).clamp(0, 1)
        luma = _luma(pixels)
        pixels = ((pixels - luma) * per_image[:, SATURATION : SATURATION + 1] + luma).clamp(0, 1)
        pixels = _rotate_hue(pixels, rows[:, HUE]).clamp(0, 1)
        gray = per_image[:, GRAYSCALE : GRAYSCALE + 1]
        pixels = pixels * (1 - gray) + _luma(pixels) * gray
        pixels = _gaussian_blur(pixels, rows[:, BLUR_SIGMA], self.config.blur_sigma[1])
        solarize = per_image[:, SOLARIZE : SOLARIZE + 1].bool() & (pixels >= 0.5)
        pixels = torch.where(solarize, 1.0 - pixels, pixels)
        mean = torch.tensor(self.config.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std, device=pixels.device).view(1, 3, 1, 1)
        return ((pixels - mean) / std).reshape(*leading, *pixels.shape[1:])


def _luma(pixels: torch.Tensor) -> torch.Tensor:
    """``(n, 3, H, W) -> (n, 1, H, W)`` ITU-R 601 luma."""
    weights = torch.tensor(_LUMA, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels * weights).sum(dim=1, keepdim=True)


def _rotate_hue(pixels: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma plane of YIQ by ``2 * pi * hue`` per image (``hue`` in [-0.5, 0.5])."""
    angle = 2 * math.pi * hue
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(len(hue), 3, 3, device=pixels.device, dtype=pixels.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    to_yiq = _RGB_TO_YIQ.to(device=pixels.device, dtype=pixels.dtype)
    transform = torch.linalg.inv(to_yiq) @ rotation @ to_yiq  # (n, 3, 3)
    return torch.einsum("nij,njhw->nihw", transform, pixels)


def _gaussian_blur(pixels: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image; sigma 0 leaves the image unchanged."""
    n_images, channels, height, width = pixels.shape
    radius = min(int(math.ceil(3 * max_sigma)), height - 1, width - 1)
    if radius < 1 or not bool((sigma > 0).any()):
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
