"""Faults and bad input, one row each: provoke the fault, assert what the user gets instead.

A row is a function ``case(fault: Fault)``; the next fault found is one more entry in ``FAULTS``.
"""

import errno
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
from data_fixtures import write_parquet, write_webdataset
from test_hub_streaming import SMALL_RETRY_BUDGET, serve_dataset
from test_hub_streaming import pretrain as pretrain_from_hub
from test_training import ROOT, TINY_RUN, run, student_parameters

from hf_koleo.training import trainer
from hf_koleo.training.checkpoint import CheckpointSaveError, list_checkpoints
from hf_koleo.training.lock import LOCK_FILE, OutputDirLockedError, output_dir_lock


@dataclass
class Fault:
    """What a row may use: a fresh folder, pytest's monkeypatch and log capture, tiny training data."""

    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    caplog: pytest.LogCaptureFixture

    @cached_property
    def data(self) -> Path:
        return write_parquet(self.tmp_path / "data" / "train.parquet", 48)


# A rank other than the main one reaches save_state late: the interleaving that lost its RNG state.
DELAYED_RANK_SCRIPT = """
import runpy, sys, time
from accelerate import Accelerator

save_state = Accelerator.save_state

def late_save_state(self, *args, **kwargs):
    if not self.is_main_process:
        time.sleep(0.5)
    return save_state(self, *args, **kwargs)

Accelerator.save_state = late_save_state
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def checkpoints_race_when_another_rank_writes_late(fault: Fault):
    wrapper = fault.tmp_path / "late_rank.py"
    wrapper.write_text(DELAYED_RANK_SCRIPT)
    output_dir = fault.tmp_path / "run"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *(str(wrapper), str(ROOT / "scripts" / "pretrain.py"), *TINY_RUN),
        *("--data", str(fault.data), "--output_dir", str(output_dir), "--split_strategy", "examples"),
        *("--save_every", "1", "--keep_last", "10", "--proto_every", "100", "--report_images", "4"),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(path.name for path in (output_dir / "checkpoints").iterdir())
    assert names == [f"checkpoint-{step:08d}" for step in range(1, 5)]  # no .tmp-* left behind
    for path in list_checkpoints(output_dir):
        assert (path / "random_states_0.pkl").exists() and (path / "random_states_1.pkl").exists(), path


def disk_full_during_a_checkpoint_removes_the_partial_folder(fault: Fault):
    import accelerate.checkpointing

    write = accelerate.checkpointing.save

    def disk_fills_at_the_second_optimizer_write(obj, path, **kwargs):
        if "00000004" in str(path) and str(path).endswith("optimizer.bin"):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(obj, path, **kwargs)

    fault.monkeypatch.setattr(accelerate.checkpointing, "save", disk_fills_at_the_second_optimizer_write)
    with pytest.raises(CheckpointSaveError, match=r"checkpoint-00000004: the disk is full.*tmp-checkpoint-00000004"):
        run(fault.data, fault.tmp_path / "run")
    fault.monkeypatch.undo()
    assert [path.name for path in (fault.tmp_path / "run" / "checkpoints").iterdir()] == ["checkpoint-00000002"]
    assert run(fault.data, fault.tmp_path / "run", "--resume")["steps"] == 4


def resume_falls_back_past_a_truncated_newest_checkpoint(fault: Fault):
    run(fault.data, fault.tmp_path / "straight")
    run(fault.data, fault.tmp_path / "run")
    newest = list_checkpoints(fault.tmp_path / "run")[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (newest / "optimizer.bin").unlink()
    run(fault.data, fault.tmp_path / "run", "--resume")
    assert "checkpoint-00000004 cannot be loaded" in fault.caplog.text
    assert "fell back to" in fault.caplog.text and "checkpoint-00000002" in fault.caplog.text
    straight = student_parameters(list_checkpoints(fault.tmp_path / "straight")[-1])
    resumed = student_parameters(list_checkpoints(fault.tmp_path / "run")[-1])
    assert all(straight[key].equal(resumed[key]) for key in straight)


def second_run_on_one_output_dir_is_refused(fault: Fault):
    output_dir = fault.tmp_path / "run"
    with output_dir_lock(output_dir):
        with pytest.raises(OutputDirLockedError, match=rf"{output_dir} is in use by pid {os.getpid()} on "):
            run(fault.data, output_dir)
    assert not (output_dir / "checkpoints").exists()
    run(fault.data, output_dir)
    assert not (output_dir / LOCK_FILE).exists()


def stale_lock_of_a_dead_run_is_taken_over(fault: Fault):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    output_dir = fault.tmp_path / "run"
    output_dir.mkdir()
    pid = int(dead.stdout)
    (output_dir / LOCK_FILE).write_text(f'{{"pid": {pid}, "host": "{socket.gethostname()}", "started": "x"}}')
    assert run(fault.data, output_dir)["steps"] == 4
    assert f"took over the lock {output_dir / LOCK_FILE} of process {pid}" in fault.caplog.text
    assert not (output_dir / LOCK_FILE).exists()


def lock_of_a_run_on_another_host_is_never_taken_over(fault: Fault):
    output_dir = fault.tmp_path / "run"
    output_dir.mkdir()
    (output_dir / LOCK_FILE).write_text('{"pid": 1, "host": "elsewhere-7", "started": "x"}')
    with pytest.raises(OutputDirLockedError, match="pid 1 on elsewhere-7"):
        run(fault.data, output_dir)


def run_that_fails_releases_its_lock(fault: Fault):
    lock = fault.tmp_path / "run" / LOCK_FILE
    held = []

    def crash(*args, **kwargs):
        held.append(lock.exists())
        raise KeyboardInterrupt("killed at the first checkpoint")

    fault.monkeypatch.setattr(trainer, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        run(fault.data, fault.tmp_path / "run")
    assert held == [True] and not lock.exists()


def one_truncated_png_in_webdataset_shards_is_skipped_and_counted(fault: Fault):
    tar = write_webdataset(fault.tmp_path / "wds" / "train-0000.tar", n_images=20, truncated=(3,))
    fault.monkeypatch.setenv("HF_KOLEO_CACHE", str(fault.tmp_path / "cache"))
    for in_memory in ("no", "yes"):  # streamed (CanvasStream) and resident (load_decoded)
        summary = run(tar, fault.tmp_path / f"run-{in_memory}", "--in_memory", in_memory)
        assert summary["steps"] == 4 and summary["corrupt_records"] >= 1, summary
    assert "image file is truncated" in fault.caplog.text or "undecodable" in fault.caplog.text


def hub_dataset_whose_connection_keeps_dropping_stops_pretraining_with_one_line(fault: Fault):
    server, state, endpoint = serve_dataset(fault.tmp_path, fault.monkeypatch)
    try:
        state.cut_downloads = 10**6  # every parquet download closes its socket half way
        (fault.tmp_path / "budget.py").write_text(SMALL_RETRY_BUDGET)
        result = pretrain_from_hub(fault.tmp_path / "run", wrapper=str(fault.tmp_path / "budget.py"), timeout=60)
    finally:
        server.shutdown()
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("pretrain.py: error: data source 'tester/tiny-images': the connection to the Hub at ")
    assert f"{endpoint} (HF_ENDPOINT) kept failing" in error


FAULTS = [
    checkpoints_race_when_another_rank_writes_late,
    disk_full_during_a_checkpoint_removes_the_partial_folder,
    resume_falls_back_past_a_truncated_newest_checkpoint,
    second_run_on_one_output_dir_is_refused,
    stale_lock_of_a_dead_run_is_taken_over,
    lock_of_a_run_on_another_host_is_never_taken_over,
    run_that_fails_releases_its_lock,
    one_truncated_png_in_webdataset_shards_is_skipped_and_counted,
    hub_dataset_whose_connection_keeps_dropping_stops_pretraining_with_one_line,
]


@pytest.mark.parametrize("case", FAULTS, ids=[case.__name__ for case in FAULTS])
def test_fault(case, tmp_path, monkeypatch, caplog):
    caplog.set_level("WARNING")
    case(Fault(tmp_path, monkeypatch, caplog))
