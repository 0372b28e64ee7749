"""The stock backbone a pretraining model hands over: the teacher as ``Dinov2Model`` / ``ViTModel`` + image processor.

Used by the trainer at the end of a run and by :mod:`hf_koleo.hub` for exports and pushes; it sits
below both so neither imports the other. :func:`check_weight_files` (refuse pickle-only folders) is
here too, below evaluation, which checks a model folder before loading it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from .modeling_koleo_dino import KoLeoDinoForPreTraining

logger = logging.getLogger(__name__)

# The stock image processor each backbone type pairs with on the Hub.
PROCESSOR_TYPES = {"dinov2": "BitImageProcessor", "vit": "ViTImageProcessor"}
# Weights a model folder may hold that load through pickle (which can run code).
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def build_image_processor(model_type: str, image_size: int, image_mean, image_std):
    """The stock processor for ``model_type``: resize the short side, centre-crop, normalise."""
    import transformers

    name = PROCESSOR_TYPES[model_type]
    # Without torchvision, transformers 5 serves the PIL backend of the same processor.
    if importlib.util.find_spec("torchvision") is None:
        name = f"{name}Pil"
    processor_class = getattr(transformers, name)
    settings: dict[str, Any] = dict(
        do_resize=True, do_normalize=True, image_mean=list(image_mean), image_std=list(image_std), do_convert_rgb=True
    )
    if model_type == "vit":  # ViTImageProcessor resizes to a fixed size
        settings["size"] = {"height": image_size, "width": image_size}
    else:
        settings.update(
            size={"shortest_edge": image_size},
            do_center_crop=True,
            crop_size={"height": image_size, "width": image_size},
        )
    return processor_class(**settings)


def export_backbone(
    model: KoLeoDinoForPreTraining,
    output_dir: str | os.PathLike,
    image_size: int,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
) -> Path:
    """Write the teacher backbone as a stock ``Dinov2Model`` / ``ViTModel`` plus its image processor."""
    output_dir = Path(output_dir)
    backbone = model.teacher.backbone
    backbone.config.architectures = [type(backbone).__name__]
    backbone.save_pretrained(output_dir, safe_serialization=True)
    build_image_processor(backbone.config.model_type, image_size, image_mean, image_std).save_pretrained(output_dir)
    logger.debug("exported the teacher backbone to %s", output_dir)
    return output_dir


def check_weight_files(path: str | os.PathLike, allow_pickle: bool = False) -> bool:
    """Whether the model folder ``path`` has safetensors weights; refuse a pickle-only one unless allowed.

    Pickle files can run arbitrary code when loaded, so they are refused unless the caller trusts them.

    Raises:
        ValueError: only ``pytorch_model.bin`` and ``allow_pickle`` is False.
        FileNotFoundError: no weights at all.
    """
    folder = Path(path)
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any((folder / name).exists() for name in PICKLE_WEIGHTS)
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ValueError(
            f"{folder} holds only pickle weights (pytorch_model.bin), which can execute code when loaded; "
            "convert them to safetensors or pass allow_pickle=True (--allow-pickle) if you trust the file"
        )
    if not has_safetensors and not has_pickle:
        raise FileNotFoundError(f"{folder} holds no model weights (model.safetensors)")
    return has_safetensors
