"""The training step on the ``meta`` device: GPU-only bugs, caught on a CPU.

A tensor made on the host by default (an index, a constant, a label left behind) costs nothing on
a CPU and a copy plus a wait on a GPU. On ``torch.device("meta")`` every device tensor is a shape
without data, so the real data paths, the step, the EMA and the utilisation counts run in seconds
while :class:`HostSyncRecorder` records any operation that mixes host tensors with device ones,
copies between them without ``non_blocking``, or reads a device value (a meta tensor cannot be
read at all).
"""

import contextlib
import importlib

import pytest
import torch
from conftest import TINY_RUN
from data_fixtures import write_parquet

from hf_koleo.modeling_koleo_dino import KoLeoDinoForPreTraining
from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.checkpoint import TrainerState
from hf_koleo.training.host_sync import HostSyncRecorder
from hf_koleo.training.optimization import apply_schedules, build_optimizer, schedule_values
from hf_koleo.training.pipeline import ResidentPipeline, StreamedPipeline
from hf_koleo.training.trainer import NonFiniteGuard, train_step

META = torch.device("meta")


class MetaAccelerator:
    """What ``train_step`` and the data paths ask of an ``accelerate.Accelerator``, on the meta device."""

    device = META
    process_index, num_processes, is_main_process = 0, 1, True
    scaler, sync_gradients = None, True

    def main_process_first(self):
        return contextlib.nullcontext()

    def accumulate(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def unwrap_model(self, model):
        return model


@pytest.fixture
def fused_adamw_on_meta(monkeypatch):
    module = importlib.import_module("torch.optim.optimizer")  # torch.optim does not keep the name
    supported = module._get_fused_kernels_supported_devices()
    monkeypatch.setattr(module, "_get_fused_kernels_supported_devices", lambda: [*supported, "meta"])


@pytest.mark.parametrize("path", [ResidentPipeline, StreamedPipeline])
@pytest.mark.parametrize("search", ["exact", "candidates"])
def test_two_training_steps_on_the_meta_device_never_touch_the_host(tmp_path, fused_adamw_on_meta, path, search):
    data = write_parquet(tmp_path / "data.parquet", 48)
    in_memory = "yes" if path is ResidentPipeline else "no"
    arguments, model_config = parse_pretraining_args(
        [*TINY_RUN, "--data", str(data), "--output_dir", str(tmp_path / "run"), "--in_memory", in_memory]
        + ["--model.koleo_proto_search", search, "--model.koleo_proto_refresh_every", "3"]
        + ["--model.koleo_proto_update_every", "2"]  # step 0: full search, step 2: update
        + ["--model.koleo_proto_movers", "4", "--model.koleo_proto_repair", "4"]  # fixed shapes: no sync either
    )
    accelerator = MetaAccelerator()
    model = KoLeoDinoForPreTraining(model_config).to(META)
    optimizer = build_optimizer(model, arguments.weight_decay)
    pipeline = path(arguments, model_config, accelerator)
    assert type(pipeline) is path
    counts = torch.zeros(model_config.num_prototypes, dtype=torch.long, device=META)
    state, guard = TrainerState(), NonFiniteGuard()
    for step in range(3):  # the first step too: nothing is left to copy lazily
        values = schedule_values(arguments, step, 4, 12.0, 1e-3)
        apply_schedules(optimizer, values)
        with HostSyncRecorder(META) as recorder:
            batch = pipeline.next_batch(state)
            output = train_step(accelerator, model, optimizer, batch, values, step, 3.0, guard)
            assignments = output.teacher_cls_assignments.flatten()
            counts.index_add_(0, assignments, torch.ones_like(assignments))
            model.update_teacher(values.teacher_momentum)
        assert recorder.syncs == [], (step, recorder.syncs)
        assert batch["global_crops"].device == META and batch["labels"].device == META
    assert output.loss.device == META and guard.count.device == META


def test_crop_sizes_must_fit_the_patch_only_for_the_crops_a_run_makes(tmp_path):
    data = write_parquet(tmp_path / "data.parquet", 8)
    run = [*TINY_RUN, "--data", str(data), "--output_dir", str(tmp_path / "run"), "--in_memory", "yes"]
    patch_3 = ["--model.backbone_config.patch_size", "3", "--global_crops_size", "9"]  # local crops of 4: no fit
    arguments, model_config = parse_pretraining_args([*run, *patch_3, "--local_crops_number", "2"])
    with pytest.raises(ValueError, match="local_crops_size=4 must be a multiple of the patch size 3"):
        ResidentPipeline(arguments, model_config, MetaAccelerator())
    arguments, model_config = parse_pretraining_args([*run, *patch_3, "--local_crops_number", "0"])
    batch = ResidentPipeline(arguments, model_config, MetaAccelerator()).next_batch(TrainerState())
    assert "local_crops" not in batch and batch["global_crops"].shape[-2:] == (9, 9)
