"""Export the teacher backbone as a stock transformers checkpoint (no hf_koleo needed to load it)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import AutoImageProcessor

from .modeling_koleo_dino import KoLeoDinoForPreTraining

logger = logging.getLogger(__name__)

# The stock image processor each backbone type pairs with on the Hub.
PROCESSOR_TYPES = {"dinov2": "BitImageProcessor", "vit": "ViTImageProcessor"}


def build_image_processor(model_type: str, image_size: int, image_mean, image_std):
    """The stock processor for ``model_type``: resize the short side, centre-crop, normalise."""
    import importlib.util

    import transformers

    name = PROCESSOR_TYPES[model_type]
    # Without torchvision, transformers 5 serves the PIL backend of the same processor.
    if importlib.util.find_spec("torchvision") is None:
        name = f"{name}Pil"
    processor_class = getattr(transformers, name)
    settings = dict(
        do_resize=True,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_convert_rgb=True,
    )
    if model_type == "vit":  # ViTImageProcessor resizes to a fixed size
        settings["size"] = {"height": image_size, "width": image_size}
        settings.pop("do_center_crop")
        settings.pop("crop_size")
    else:
        settings["size"] = {"shortest_edge": image_size}
    return processor_class(**settings)


def export_backbone(
    model_or_path: KoLeoDinoForPreTraining | str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: int,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
) -> Path:
    """Write the teacher backbone as a stock ``Dinov2Model`` / ``ViTModel`` plus its image processor.

    ``AutoModel.from_pretrained(output_dir)`` then loads it with plain transformers.
    """
    model = (
        model_or_path
        if isinstance(model_or_path, KoLeoDinoForPreTraining)
        else KoLeoDinoForPreTraining.from_pretrained(model_or_path)
    )
    output_dir = Path(output_dir)
    backbone = model.teacher.backbone
    backbone.config.architectures = [type(backbone).__name__]
    backbone.save_pretrained(output_dir)
    processor = build_image_processor(backbone.config.model_type, image_size, image_mean, image_std)
    processor.save_pretrained(output_dir)
    logger.info("exported the teacher backbone to %s", output_dir)
    return output_dir


def load_image_processor(path: str | os.PathLike):
    return AutoImageProcessor.from_pretrained(path)
