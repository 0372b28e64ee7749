"""The data side of the loop: source -> split -> multi-crop stream -> DataLoader -> device augmentation."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from ..configuration_koleo_dino import KoLeoDinoConfig
from ..data.augment import IDENTITY_PARAMETERS, MultiCropAugmentation, centre_crop
from ..data.images import decode_image
from ..data.sources import count_records, load_source
from ..data.stream import MaskSettings, MultiCropStream, shard_source
from .arguments import PretrainingArguments
from .checkpoint import TrainerState


def _patch_size(model_config: KoLeoDinoConfig) -> int:
    patch = model_config.backbone_config.patch_size
    return patch[0] if isinstance(patch, (list, tuple)) else patch


class DataPipeline:
    """Batches on the accelerator, ready for ``KoLeoDinoForPreTraining.forward``."""

    def __init__(
        self,
        arguments: PretrainingArguments,
        model_config: KoLeoDinoConfig,
        accelerator: Accelerator,
        position: tuple[int, int] = (0, 0),
    ) -> None:
        patch = _patch_size(model_config)
        for name in ("global_crops_size", "local_crops_size"):
            if getattr(arguments, name) % patch:
                raise ValueError(f"{name}={getattr(arguments, name)} must be a multiple of the patch size {patch}")
        self.arguments = arguments
        self.accelerator = accelerator
        self.augmentation = MultiCropAugmentation(arguments)
        with accelerator.main_process_first():  # built-in sources are prepared once, by the main process
            self.source = load_source(arguments.data)
        self.dataset_size = arguments.dataset_size or count_records(arguments.data) or 0
        masking = None
        if model_config.ibot_loss_weight > 0:
            masking = MaskSettings(
                arguments.global_crops_size // patch,
                tuple(model_config.mask_ratio_min_max),
                model_config.mask_probability,
            )
        stream = MultiCropStream(
            shard_source(self.source, accelerator.process_index, accelerator.num_processes, arguments.split_strategy),
            self.augmentation,
            arguments.per_device_batch_size,
            arguments.seed,
            masking,
            position,
            arguments.shuffle_buffer,
        )
        self.loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=arguments.num_workers,
            pin_memory=accelerator.device.type == "cuda",
            # Worker seeds come from this generator, not the global RNG, so resuming does not shift it.
            generator=torch.Generator().manual_seed(arguments.seed),
        )
        self._iterator = iter(self.loader)

    def next_batch(self, state: TrainerState) -> dict[str, Any]:
        """The next non-empty batch, augmented on the device; advances ``state.position``."""
        while True:
            raw = next(self._iterator)
            state.position = list(raw["position"])
            state.corrupt_records += raw["n_corrupt"]
            if "global_crops" in raw:
                break
        device = self.accelerator.device
        batch = {
            "global_crops": self.augmentation.photometric(
                raw["global_crops"].to(device, non_blocking=True), raw["global_params"].to(device, non_blocking=True)
            ),
            "labels": raw["labels"],
        }
        if "local_crops" in raw:
            batch["local_crops"] = self.augmentation.photometric(
                raw["local_crops"].to(device, non_blocking=True), raw["local_params"].to(device, non_blocking=True)
            )
        if "masks" in raw:
            batch["masks"] = raw["masks"].to(device, non_blocking=True)
        return batch

    def report_images(self, count: int) -> torch.Tensor:
        """``(n, 3, S, S)`` normalised centre crops of the first ``count`` decodable source images."""
        images = []
        for record in self.source:
            if len(images) >= count:
                break
            image = decode_image(record["image"])
            if image is not None:
                images.append(centre_crop(image, self.arguments.global_crops_size))
        identity = torch.tensor([IDENTITY_PARAMETERS]).expand(len(images), -1)
        return self.augmentation.photometric(torch.stack(images), identity)
