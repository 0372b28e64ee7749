import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_koleo.training import checkpoint
from hf_koleo.training.checkpoint import (
    CheckpointLoadError,
    CheckpointSaveError,
    TrainerState,
    list_checkpoints,
    load_resume_checkpoint,
    resolve_resume,
    save_checkpoint,
)


class ModelConfig:
    def save_pretrained(self, folder):
        Path(folder, "config.json").write_text("{}")


class MainProcess:
    """The main process of a two-process run, as ``save_checkpoint`` sees it through Accelerate.

    The other rank is slow: its ``random_states_1.pkl`` lands only when the main process next
    waits for it (``wait_for_everyone`` or a collective), as a delayed rank's write would.
    ``other_rank_fails`` makes the other rank report a failed write instead.
    """

    is_main_process = True
    process_index, num_processes = 0, 2
    device = torch.device("cpu")

    def __init__(self, other_rank_fails: bool = False):
        self.other_rank_fails = other_rank_fails
        self.pending: list[Path] = []
        self.loaded: list[Path] = []

    def save_state(self, folder, safe_serialization=True):
        save_file({"weight": torch.ones(3)}, str(Path(folder, "model.safetensors")))
        torch.save({"seed": 0}, Path(folder, "random_states_0.pkl"))
        self.pending.append(Path(folder))

    def _other_rank_catches_up(self):
        for folder in self.pending:
            torch.save({"seed": 1}, folder / "random_states_1.pkl")  # fails if the folder was renamed
        self.pending.clear()

    def wait_for_everyone(self):
        self._other_rank_catches_up()

    def gather(self, tensor):
        self._other_rank_catches_up()
        other = torch.zeros_like(tensor) if self.other_rank_fails else tensor
        return torch.cat([tensor, other])

    def load_state(self, folder):
        load_file(str(Path(folder, "model.safetensors")))  # a truncated file raises, as in Accelerate
        self.loaded.append(Path(folder))


def save(accelerator, output_dir, step, keep_last=5):
    return save_checkpoint(accelerator, output_dir, TrainerState(step=step), ModelConfig(), keep_last)


def test_rename_waits_for_the_other_ranks_random_state(tmp_path):
    path = save(MainProcess(), tmp_path, step=2)
    assert (path / "random_states_0.pkl").exists() and (path / "random_states_1.pkl").exists()
    assert [folder.name for folder in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-00000002"]


def test_disk_full_removes_the_partial_folder_and_says_so(tmp_path, monkeypatch):
    accelerator = MainProcess()
    save(accelerator, tmp_path, step=2)

    def disk_full(folder, safe_serialization=True):
        Path(folder, "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder, "optimizer.bin")))

    monkeypatch.setattr(accelerator, "save_state", disk_full)
    with pytest.raises(CheckpointSaveError, match=r"disk is full.*\.tmp-checkpoint-00000004") as raised:
        save(accelerator, tmp_path, step=4)
    assert raised.value.errno == errno.ENOSPC
    assert [folder.name for folder in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-00000002"]


def test_torch_save_failing_on_a_full_disk_is_reported_as_disk_full(tmp_path, monkeypatch):
    accelerator = MainProcess()

    def torch_save_on_full_disk(folder, safe_serialization=True):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(accelerator, "save_state", torch_save_on_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(CheckpointSaveError, match="disk is full"):
        save(accelerator, tmp_path, step=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_another_ranks_failed_write_fails_the_save_everywhere(tmp_path):
    with pytest.raises(CheckpointSaveError, match="another process failed writing"):
        save(MainProcess(other_rank_fails=True), tmp_path, step=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_resume_latest_falls_back_past_a_truncated_checkpoint(tmp_path, caplog):
    accelerator = MainProcess()
    for step in (2, 4, 6):
        save(accelerator, tmp_path, step=step)
    newest = list_checkpoints(tmp_path)[-1]
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:20])
    assert resolve_resume(tmp_path, "latest") == newest
    state, path = load_resume_checkpoint(accelerator, tmp_path, "latest")
    assert (state.step, path.name) == (4, "checkpoint-00000004")
    assert accelerator.loaded == [path]
    assert "checkpoint-00000006 cannot be loaded" in caplog.text and "fell back to" in caplog.text


def test_resume_latest_with_no_loadable_checkpoint_names_each(tmp_path):
    accelerator = MainProcess()
    for step in (2, 4):
        save(accelerator, tmp_path, step=step)
    (list_checkpoints(tmp_path)[0] / "model.safetensors").unlink()
    (list_checkpoints(tmp_path)[1] / checkpoint.STATE_FILE).write_text(json.dumps({"step": "x", "bad": 1}))
    with pytest.raises(CheckpointLoadError, match=r"checkpoint-00000004: TypeError.*checkpoint-00000002: "):
        load_resume_checkpoint(accelerator, tmp_path, "latest")


def test_resume_without_checkpoints_or_request_starts_fresh(tmp_path):
    assert load_resume_checkpoint(MainProcess(), tmp_path, "latest") == (TrainerState(), None)
    assert load_resume_checkpoint(MainProcess(), tmp_path, "") == (TrainerState(), None)
