import contextlib

import pytest
import torch
from conftest import TINY_RUN
from data_fixtures import write_parquet

from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.checkpoint import TrainerState
from hf_koleo.training.host_sync import HostSyncRecorder
from hf_koleo.training.optimization import apply_schedules, schedule_values
from hf_koleo.training.run_setup import build_run
from hf_koleo.training.trainer import NonFiniteGuard, train_step


def test_the_recorder_sees_host_reads_and_host_to_device_copies():
    values = torch.arange(6.0)
    with HostSyncRecorder() as recorder:
        values.sum().item()
        values[values > 2]
        values.nonzero()
        torch.tensor([1.0, 2.0])
        torch.repeat_interleave(torch.tensor([1, 2]))
        values.clamp(min=1).max()  # stays on the device: not recorded
    names = [name for name, _ in recorder.syncs]
    assert names.count("aten::_local_scalar_dense") == 1 and "aten::nonzero" in names and "aten::index" in names
    assert "aten::lift_fresh" in names and "aten::repeat_interleave" in names
    assert all("test_host_sync.py" in where for _, where in recorder.syncs)


def test_the_recorder_sees_blocking_copies_and_host_tensors_in_device_operations():
    device_values = torch.zeros(4, device="meta")  # stands in for a GPU: no data, every op has a kernel
    host_index, host_scalar = torch.tensor([0, 2]), torch.tensor(2.0)
    with HostSyncRecorder() as recorder:
        host_index.to("meta")  # blocking host-to-device copy
        host_index.to("meta", non_blocking=True)  # the host runs on: not recorded
        device_values[host_index]  # the index is copied first
        device_values * host_scalar  # a 0-d host scalar is an argument, not a copy: not recorded
        with contextlib.suppress(NotImplementedError):  # recorded before it runs; a meta tensor has no data
            device_values.to("cpu")
    names = [name for name, _ in recorder.syncs]
    assert names == [
        "aten::_to_copy (host-to-device copy)",
        "aten::index (mixed host and device)",
        "aten::_to_copy (device-to-host copy)",
    ], names


def tiny_setup(tmp_path, *extra):
    path = write_parquet(tmp_path / "data.parquet", 48)
    arguments, model_config = parse_pretraining_args(
        [*TINY_RUN, "--data", str(path), "--output_dir", str(tmp_path / "run"), *extra]
    )
    run = build_run(arguments, model_config, resume=False)  # as pretraining builds it
    values = schedule_values(arguments, 0, 4, 12.0, 1e-3)
    apply_schedules(run.optimizer, values)
    return run.accelerator, run.model, run.optimizer, run.data, values


@pytest.mark.parametrize("centring", ["ema", "sinkhorn_knopp"])
def test_a_whole_training_step_never_waits_for_the_device(tmp_path, centring):
    accelerator, model, optimizer, data, values = tiny_setup(tmp_path, "--model.centring", centring)
    state, guard = TrainerState(), NonFiniteGuard()
    for step in range(3):  # the first step too: the augmentation's constants went to the device before
        with HostSyncRecorder() as recorder:
            batch = data.next_batch(state)  # crops, colours and iBOT masks on the device
            output = train_step(accelerator, model, optimizer, batch, values, step, 3.0, guard)
            accelerator.unwrap_model(model).update_teacher(0.99)
        assert recorder.syncs == [], (step, recorder.syncs)
    assert output.ibot_loss > 0 and output.koleo_proto_loss != 0 and int(guard.count) == 0


def test_a_non_finite_step_is_skipped_on_the_device_and_counted(tmp_path):
    accelerator, model, optimizer, data, values = tiny_setup(tmp_path)
    state, guard = TrainerState(), NonFiniteGuard()
    first = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    train_step(accelerator, model, optimizer, data.next_batch(state), values, 0, 3.0, guard)
    assert any(not torch.equal(p, first[n]) for n, p in model.named_parameters())
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    poisoned = data.next_batch(state)
    poisoned["global_crops"] = poisoned["global_crops"] * float("nan")
    with HostSyncRecorder() as recorder:
        train_step(accelerator, model, optimizer, poisoned, values, 1, 3.0, guard)
    assert recorder.syncs == []
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert int(guard.count) == 1 and int(guard.first_step) == 1
    # Only the images' keys, rows and labels are kept (no batch of views cloned every step) ...
    assert set(guard.batch) == {"indices", "labels"}  # a resident batch: rows of the source (a stream: view keys)
    offending = guard.offending_batch()
    assert offending == {"step": 1, "position_before": [0, 1], "position_after": [0, 2]}
    assert torch.equal(guard.batch["indices"], poisoned["indices"])
    # ... from which the data path cuts the offending batch's views again.
    replayed = data.replay(guard.batch, offending["position_after"])
    clean = data.batches.views(poisoned["indices"], epoch=0)
    assert torch.equal(replayed["global_crops"], clean["global_crops"])
    assert torch.equal(replayed["local_crops"], clean["local_crops"])
    train_step(accelerator, model, optimizer, data.next_batch(state), values, 2, 3.0, guard)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # training goes on
    assert int(guard.count) == 1 and int(guard.first_step) == 1
