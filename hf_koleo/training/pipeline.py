"""The data side of the loop: a source becomes batches of views on the accelerator.

Two paths, one class each, one augmentation (:func:`build_pipeline` picks the path):

* :class:`ResidentPipeline` (sources that fit ``in_memory_budget_gb``): decoded once (cached on
  disk), kept on the accelerator, every view cut there (:class:`ResidentBatches`); no DataLoader.
* :class:`StreamedPipeline` (anything else, and Hub ids): DataLoader workers decode disjoint shards
  into ``uint8`` canvases (:class:`CanvasStream`); the views are cut on the accelerator.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any

import torch
from accelerate import Accelerator

from ..configuration_koleo_dino import KoLeoDinoConfig
from ..data.augment import IDENTITY_PARAMETERS, MultiCropAugmentation, crop_and_resize
from ..data.decoded import DecodedImages, cache_key, decode_records, load_decoded
from ..data.masking import MaskSettings
from ..data.resident import ResidentBatches
from ..data.sources import count_records, load_source
from ..data.stream import CanvasStream, advance_position, parse_position, shard_source, usable_workers
from .arguments import PretrainingArguments
from .checkpoint import TrainerState
from .interrupt import ignore_stop_signals

logger = logging.getLogger(__name__)


def _patch_size(model_config: KoLeoDinoConfig) -> int:
    patch = model_config.backbone_config.patch_size
    return patch[0] if isinstance(patch, (list, tuple)) else patch


def canvas_size(arguments: PretrainingArguments) -> int:
    """The side images are decoded to: ``canvas_size``, or the global crops' side."""
    return arguments.canvas_size or arguments.global_crops_size


def fits_in_memory(arguments: PretrainingArguments, canvas_size: int) -> bool:
    """Whether ``arguments.data`` takes the resident path (see ``in_memory``)."""
    if arguments.in_memory != "auto":
        return arguments.in_memory == "yes"
    if cache_key(arguments.data, canvas_size) is None:
        return False  # Hub ids stream
    n_images = count_records(arguments.data)
    if n_images is None:
        return False
    return n_images * 3 * canvas_size**2 <= arguments.in_memory_budget_gb * 2**30


class Pipeline:
    """What both data paths share: the multi-crop augmentation, the masks, the canvas; batches of views
    on the accelerator, ready for ``KoLeoDinoForPreTraining.forward``."""

    resident: bool = False

    def __init__(
        self, arguments: PretrainingArguments, model_config: KoLeoDinoConfig, accelerator: Accelerator
    ) -> None:
        patch = _patch_size(model_config)
        sizes = ("global_crops_size", "local_crops_size") if arguments.local_crops_number else ("global_crops_size",)
        for name in sizes:  # without local crops their size is never used
            if getattr(arguments, name) % patch:
                raise ValueError(f"{name}={getattr(arguments, name)} must be a multiple of the patch size {patch}")
        self.arguments = arguments
        self.device = accelerator.device
        self.augmentation = MultiCropAugmentation(arguments).place_constants(self.device)
        self.canvas_size = canvas_size(arguments)
        self.masking = None
        if model_config.ibot_loss_weight > 0:
            self.masking = MaskSettings(
                arguments.global_crops_size // patch,
                tuple(model_config.mask_ratio_min_max),
                model_config.mask_probability,
            )
            self.masking.slot_budget(2 * arguments.per_device_batch_size)  # simulated (and cached) before the loop
        self.dataset_size = 0

    def next_batch(self, state: TrainerState) -> dict[str, Any]:
        """The next batch of views on the device; advances ``state.position``."""
        raise NotImplementedError

    def report_images(self, count: int) -> torch.Tensor:
        """``(n, 3, S, S)`` normalised centre crops of the first ``count`` images of the source."""
        return centre_views(
            self.augmentation, self._first_images(count).to(self.device), self.arguments.global_crops_size
        )

    def _first_images(self, count: int) -> DecodedImages:
        raise NotImplementedError

    def replay(self, captured: dict[str, torch.Tensor], position: list[int] | None) -> dict[str, torch.Tensor]:
        """The views of a past batch from what :class:`~hf_koleo.training.trainer.NonFiniteGuard` kept
        of it (its images' rows or keys) and the position after it; empty where this path cannot cut
        them again: a stream keeps no images (its diagnostic holds the records' view keys, labels and
        the stream positions before and after the batch: a stream read from the first yields it again)."""
        return {}

    def corrupt_records(self, state: TrainerState, accelerator: Accelerator) -> int:
        """Undecodable records skipped so far, over all processes (called by every process)."""
        raise NotImplementedError

    def exact_position(self, position: list[int]) -> bool:
        """Whether a saved position counts the records each worker read, so that resuming it does not
        depend on the batch size (a resident position counts batches)."""
        return False


class ResidentPipeline(Pipeline):
    """Decoded once (cached on disk), kept on the accelerator, every view cut there; no DataLoader."""

    resident = True

    def __init__(
        self,
        arguments: PretrainingArguments,
        model_config: KoLeoDinoConfig,
        accelerator: Accelerator,
        position: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__(arguments, model_config, accelerator)
        with accelerator.main_process_first():  # the main process decodes and caches, the others load
            decoded = load_decoded(arguments.data, self.canvas_size)
        self.dataset_size = len(decoded)
        self.batches = ResidentBatches(
            decoded,
            self.augmentation,
            arguments.per_device_batch_size,
            arguments.seed,
            self.masking,
            position,
            accelerator.process_index,
            accelerator.num_processes,
            self.device,
        )
        logger.info(
            "data %r: %d images resident on %s (%.1f MiB)",
            arguments.data,
            len(decoded),
            self.device,
            decoded.images.numel() / 2**20,
        )

    def next_batch(self, state: TrainerState) -> dict[str, Any]:
        batch = self.batches.next_batch()
        state.position = list(batch["position"])
        return batch

    def _first_images(self, count: int) -> DecodedImages:
        data = self.batches.data
        return DecodedImages(data.images[:count], data.extents[:count], data.labels[:count])

    def replay(self, captured: dict[str, torch.Tensor], position: list[int] | None) -> dict[str, torch.Tensor]:
        if position is None or "indices" not in captured:
            return {}
        views = self.batches.views(captured["indices"], epoch=position[0])
        return {key: value for key, value in views.items() if torch.is_tensor(value)}

    def corrupt_records(self, state: TrainerState, accelerator: Accelerator) -> int:
        return self.batches.data.n_corrupt  # dropped once, when decoding, alike on every process


class StreamedPipeline(Pipeline):
    """DataLoader workers decode disjoint shards into ``uint8`` canvases; the views are cut on the accelerator."""

    def __init__(
        self,
        arguments: PretrainingArguments,
        model_config: KoLeoDinoConfig,
        accelerator: Accelerator,
        position: tuple[int, ...] = (0, 0),
    ) -> None:
        super().__init__(arguments, model_config, accelerator)
        with accelerator.main_process_first():  # built-in sources are prepared once, by the main process
            self.source = load_source(arguments.data)
        self.dataset_size = arguments.dataset_size or count_records(arguments.data) or 0
        shard = shard_source(
            self.source, accelerator.process_index, accelerator.num_processes, arguments.split_strategy
        )
        num_workers = usable_workers(shard, arguments.num_workers)
        if num_workers < arguments.num_workers:
            logger.warning(
                "data %r has %s shard(s) per process: using %d DataLoader workers instead of %d (a worker "
                "reads whole shards, never another worker's records)",
                arguments.data,
                getattr(shard, "num_shards", 1),
                num_workers,
                arguments.num_workers,
            )
        stream = CanvasStream(
            shard,
            self.canvas_size,
            arguments.per_device_batch_size,
            arguments.seed,
            position,
            arguments.shuffle_buffer,
            name=arguments.data,
        )
        self.loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            # Worker seeds come from this generator, not the global RNG, so resuming does not shift it.
            generator=torch.Generator().manual_seed(arguments.seed),
            worker_init_fn=ignore_stop_signals,  # a stop signal is the main process's to handle
        )
        self._iterator = iter(self.loader)

    @property
    def n_workers(self) -> int:
        """The stream's logical workers (the main process counts as one when there are no workers)."""
        return max(1, self.loader.num_workers)

    def next_batch(self, state: TrainerState) -> dict[str, Any]:
        raw = next(self._iterator)  # always batch_size images: undecodable records were replaced by the next ones
        state.position = advance_position(state.position, raw, self.n_workers)
        state.corrupt_records += raw["n_corrupt"]
        keys = raw["keys"].to(self.device, non_blocking=True)
        batch = self.augmentation(
            raw["images"].to(self.device, non_blocking=True), raw["extents"].to(self.device, non_blocking=True), keys
        )
        if self.masking is not None:
            batch.update(self.masking.batch_masks(keys))
        batch["labels"] = raw["labels"].to(self.device, non_blocking=True)
        batch["keys"] = keys  # each record's view key (what a diagnostic keeps of a stream's batch)
        batch["position"] = tuple(state.position)
        return batch

    def _first_images(self, count: int) -> DecodedImages:
        return decode_records(islice(self.source, count), self.canvas_size, self.arguments.data)

    def corrupt_records(self, state: TrainerState, accelerator: Accelerator) -> int:
        counts = torch.tensor([state.corrupt_records], device=accelerator.device)
        return int(accelerator.reduce(counts, "sum"))  # each process counts in its own shards

    def exact_position(self, position: list[int]) -> bool:
        _, consumed = parse_position(position, self.n_workers)
        return all(count >= 0 for count in consumed)


def build_pipeline(
    arguments: PretrainingArguments,
    model_config: KoLeoDinoConfig,
    accelerator: Accelerator,
    position: tuple[int, ...] = (0, 0),
) -> Pipeline:
    """The data path ``arguments`` call for (see :func:`fits_in_memory`), positioned at ``position``."""
    kind = ResidentPipeline if fits_in_memory(arguments, canvas_size(arguments)) else StreamedPipeline
    return kind(arguments, model_config, accelerator, position)


def centre_views(augmentation: MultiCropAugmentation, decoded: DecodedImages, size: int) -> torch.Tensor:
    """The evaluation view of decoded images: the largest centred square, resized, normalised."""
    extents = decoded.extents.float()
    side = extents.min(dim=1).values
    boxes = torch.stack(
        [
            torch.div(extents[:, 1] - side, 2, rounding_mode="floor"),
            torch.div(extents[:, 0] - side, 2, rounding_mode="floor"),
            side,
            side,
        ],
        dim=1,
    )[:, None]
    no_flip = torch.zeros(len(decoded), 1, dtype=torch.bool, device=boxes.device)
    crops = crop_and_resize(decoded.images.float() / 255.0, boxes, no_flip, size)[:, 0]
    identity = torch.tensor([IDENTITY_PARAMETERS], device=crops.device).expand(len(decoded), -1)
    return augmentation.photometric(crops, identity)


__all__ = ["Pipeline", "ResidentPipeline", "StreamedPipeline", "build_pipeline", "centre_views", "fits_in_memory"]
