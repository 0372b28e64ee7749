import socket
import sys
from pathlib import Path

import pytest
import torch

# ``experiments/`` is not installed with the package; plain ``pytest`` (unlike ``python -m pytest``) leaves
# the checkout off sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_fixtures import write_parquet

from hf_koleo import KoLeoDinoConfig

ROOT = Path(__file__).resolve().parents[1]
# `python ACCELERATE_CPU --num_processes N script ...`: accelerate's launcher, CPU, every default given.
ACCELERATE_CPU = (
    "-m",
    "accelerate.commands.launch",
    "--cpu",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
)
# A pretraining run small enough for a test: 4 steps of batch 4 on 8x8 crops, a 1-layer backbone, K = 32,
# iBOT and KoLeo-proto on, logs / prototype metrics / checkpoints every step or two.
TINY_RUN = [
    "--max_steps",
    "4",
    "--per_device_batch_size",
    "4",
    "--num_workers",
    "0",
    "--report_to",
    "none",
    "--global_crops_size",
    "8",
    "--local_crops_size",
    "4",
    "--local_crops_number",
    "2",
    "--warmup_epochs",
    "0",
    "--teacher_temperature_warmup_epochs",
    "0",
    "--freeze_last_layer_epochs",
    "0",
    "--base_lr",
    "0.05",
    "--log_every",
    "1",
    "--proto_every",
    "2",
    "--save_every",
    "2",
    "--keep_last",
    "5",
    "--report_images",
    "8",
    "--shuffle_buffer",
    "0",
    "--seed",
    "7",
    "--model.backbone_config",
    "{hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, mlp_ratio: 2, image_size: 8, patch_size: 4}",
    "--model.num_prototypes",
    "32",
    "--model.head_hidden_size",
    "16",
    "--model.head_bottleneck_size",
    "8",
    "--model.ibot_loss_weight",
    "1.0",
    "--model.mask_probability",
    "1.0",
    "--model.koleo_proto_weight",
    "0.1",
]

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


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    """48 tiny images in one parquet file (``data_fixtures.write_parquet``), shared by a test module."""
    return write_parquet(tmp_path_factory.mktemp("data") / "train.parquet", 48)


def free_port() -> int:
    """A loopback port nobody listens on now: two multi-process tests (or CI beside a session) never collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def one_thread():
    """Tiny matrices run faster on one thread, and much faster when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
