"""hf_koleo: DINO-family self-supervised ViT pretraining with KoLeo-proto regularisation."""

from transformers import AutoConfig, AutoModel

from .configuration_koleo_dino import KoLeoDinoConfig
from .losses import (
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    koleo_proto_loss,
    masked_patch_slots,
    nearest_neighbours,
    sinkhorn_knopp,
)
from .modeling_koleo_dino import DINOHead, KoLeoDinoForPreTraining, KoLeoDinoModel, KoLeoDinoPreTrainingOutput
from .prototypes import (
    count_unique_prototypes,
    marginal_entropy,
    nearest_neighbour_distances,
    prototype_report,
    prototype_statistics,
    unique_prototype_curve,
    utilisation,
)

AutoConfig.register(KoLeoDinoConfig.model_type, KoLeoDinoConfig, exist_ok=True)
AutoModel.register(KoLeoDinoConfig, KoLeoDinoModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "DINOHead",
    "KoLeoDinoConfig",
    "KoLeoDinoForPreTraining",
    "KoLeoDinoModel",
    "KoLeoDinoPreTrainingOutput",
    "count_unique_prototypes",
    "dino_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "koleo_proto_loss",
    "marginal_entropy",
    "masked_patch_slots",
    "nearest_neighbour_distances",
    "nearest_neighbours",
    "prototype_report",
    "prototype_statistics",
    "sinkhorn_knopp",
    "unique_prototype_curve",
    "utilisation",
]
