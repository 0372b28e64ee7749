import sys
from pathlib import Path

import pytest
import torch

# ``experiments/`` is not installed with the package; plain ``pytest`` (unlike ``python -m pytest``) leaves
# the checkout off sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_koleo import KoLeoDinoConfig

TINY_BACKBONE = {
    "model_type": "dinov2",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mlp_ratio": 2,
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,
}


def tiny_config(**overrides) -> KoLeoDinoConfig:
    settings = {
        "backbone_config": dict(TINY_BACKBONE),
        "num_prototypes": 64,
        "head_hidden_size": 48,
        "head_bottleneck_size": 16,
    }
    settings.update(overrides)
    return KoLeoDinoConfig(**settings)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
