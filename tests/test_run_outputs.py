"""One run per output folder, one curve per metrics log, one model config per checkpoint chain."""

import json
import logging
from pathlib import Path

import pytest
from test_training import run

from hf_koleo.training.checkpoint import (
    CheckpointConfigError,
    TrainerState,
    config_differences,
    list_checkpoints,
    take_own_position,
)
from hf_koleo.training.run_outputs import OutputDirInUseError, claim_output_dir, cut_metrics


def metric_steps(output_dir: Path) -> list[int]:
    """The steps of the loss rows of ``metrics.jsonl``, in file order."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


def test_a_fresh_run_refuses_a_folder_holding_another_runs_outputs_and_changes_nothing(data_path, tmp_path):
    output_dir = tmp_path / "run"
    run(data_path, output_dir)
    before = {path: path.stat().st_mtime_ns for path in output_dir.rglob("*") if path.is_file()}
    with pytest.raises(OutputDirInUseError) as refused:
        run(data_path, output_dir, "--max_steps", "2")
    message = str(refused.value)
    assert message.startswith(f"--output_dir {output_dir} holds an earlier run's outputs (checkpoints/, metrics.jsonl")
    assert "backbone/" in message and "--resume latest" in message and "--overwrite_output_dir" in message
    assert "\n" not in message
    after = {path: path.stat().st_mtime_ns for path in output_dir.rglob("*") if path.is_file()}
    assert after == before


def test_overwrite_output_dir_starts_over_with_one_clean_log(data_path, tmp_path, caplog):
    output_dir = tmp_path / "run"
    run(data_path, output_dir, "--max_steps", "6", "--save_every", "3")
    caplog.set_level(logging.WARNING)
    summary = run(data_path, output_dir, "--overwrite_output_dir")
    assert "--overwrite_output_dir: removed the earlier run's checkpoints/" in caplog.text
    assert Path(summary["checkpoint"]).name == "checkpoint-00000004"
    assert [path.name for path in list_checkpoints(output_dir)] == ["checkpoint-00000002", "checkpoint-00000004"]
    assert metric_steps(output_dir) == [1, 2, 3, 4]


def test_overwrite_refuses_to_remove_a_tracker_folder_holding_other_files(data_path, tmp_path):
    output_dir = tmp_path / "run"
    run(data_path, output_dir)
    (output_dir / "hf_koleo").mkdir()
    (output_dir / "hf_koleo" / "events.out.tfevents.1.host").write_bytes(b"")
    (output_dir / "hf_koleo" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirInUseError, match=r"hf_koleo holds files a tracker did not write \(notes.txt\)"):
        run(data_path, output_dir, "--overwrite_output_dir")
    assert (output_dir / "hf_koleo" / "notes.txt").exists() and list_checkpoints(output_dir)


def test_with_overwrite_only_the_main_process_looks_at_the_folder(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    claim_output_dir(tmp_path, resume="", overwrite=True, is_main_process=False)  # another rank: leaves it
    assert (tmp_path / "metrics.jsonl").exists()
    claim_output_dir(tmp_path, resume="", overwrite=True, is_main_process=True)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_drops_the_killed_runs_rows_past_its_checkpoint(data_path, tmp_path, monkeypatch):
    import hf_koleo.training.trainer as trainer

    original_save = trainer.save_checkpoint

    def die_at_the_step_4_checkpoint(accelerator, output_dir, state, *args, **kwargs):
        if state.step == 4:
            raise KeyboardInterrupt("killed before the step-4 checkpoint")
        return original_save(accelerator, output_dir, state, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", die_at_the_step_4_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(data_path, tmp_path / "run")
    monkeypatch.undo()
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4]  # steps 3 and 4 were logged, never saved
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 1.0')  # a line cut short by the kill
    run(data_path, tmp_path / "run", "--resume")
    assert metric_steps(tmp_path / "run") == [1, 2, 3, 4]  # one curve: 3 and 4 from the resumed run


def test_cut_metrics_keeps_rows_up_to_the_step_and_drops_broken_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 3}\nnot json\n{"step": 2, "x": 1}\n{"loss": 1}\n')
    assert cut_metrics(tmp_path, 2) == 3
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2, "x": 1}\n'
    assert cut_metrics(tmp_path, 2) == 0 and cut_metrics(tmp_path / "missing", 2) == 0


def test_resume_with_another_model_config_names_the_fields(data_path, tmp_path):
    run(data_path, tmp_path / "run")
    with pytest.raises(CheckpointConfigError) as refused:
        run(data_path, tmp_path / "run", "--resume", "--model.backbone_config.hidden_size", "8")
    message = str(refused.value)
    assert "checkpoint-00000004 was saved with another model config" in message
    assert "backbone_config.hidden_size: 16 -> 8" in message and "cannot be loaded" not in message


def test_config_differences_are_dotted_and_ignore_how_the_config_was_saved():
    saved = {"num_prototypes": 32, "transformers_version": "5.0", "backbone_config": {"hidden_size": 16}, "a": [1, 2]}
    current = {"num_prototypes": 64, "transformers_version": "5.1", "backbone_config": {"hidden_size": 8}, "a": (1, 2)}
    assert config_differences(saved, current) == ["backbone_config.hidden_size: 16 -> 8", "num_prototypes: 32 -> 64"]


def test_resume_with_another_batch_size_warns_what_happens_to_the_data_position(data_path, tmp_path, caplog):
    run(data_path, tmp_path / "run", "--max_steps", "3", "--save_every", "3")
    caplog.set_level(logging.WARNING)
    summary = run(data_path, tmp_path / "run", "--resume", "--per_device_batch_size", "8", "--max_steps", "4")
    assert summary["steps"] == 4
    assert "the global batch is 8 images per step, the checkpoint's run used 4" in caplog.text
    effect = "goes on at image 24 of the epoch where the checkpoint's run stopped at image 12 (12 images are skipped)"
    assert effect in caplog.text


def test_a_run_stopped_in_set_up_leaves_no_outputs_that_block_the_next(data_path, tmp_path, monkeypatch):
    import hf_koleo.training.run_setup as run_setup

    def broken_pipeline(*args, **kwargs):
        raise ValueError("data source: no images")

    monkeypatch.setattr(run_setup, "build_pipeline", broken_pipeline)
    with pytest.raises(ValueError, match="no images"):
        run(data_path, tmp_path / "run")
    monkeypatch.undo()
    assert run(data_path, tmp_path / "run")["steps"] == 4


def test_each_process_takes_its_own_saved_position_or_the_batch_count_when_their_number_changed():
    per_process = [
        {"position": [0, 5, 9, 11], "corrupt_records": 2},
        {"position": [0, 5, -1, 10], "corrupt_records": 1},
    ]
    for rank in (0, 1):
        state = TrainerState(step=5, position=[0, 5, 9, 11], corrupt_records=2, per_process=per_process)
        take_own_position(state, rank, world_size=2)
        assert (state.position, state.corrupt_records) == (per_process[rank]["position"], (2, 1)[rank])
    for rank in (0, 1, 2):
        state = TrainerState(step=5, position=[0, 5, 9, 11], corrupt_records=2, per_process=per_process)
        take_own_position(state, rank, world_size=3)
        assert (state.position, state.corrupt_records) == ([0, 5], 3 if rank == 0 else 0)
    old = TrainerState(step=5, position=[0, 5, 9, 11])  # saved before positions were kept per process
    take_own_position(old, 1, world_size=2)
    assert old.position == [0, 5, 9, 11]


def test_a_checkpoint_records_every_process_position_and_the_per_device_batch(data_path, tmp_path, caplog):
    run(data_path, tmp_path / "run", "--max_steps", "3", "--save_every", "3")
    state = json.loads((list_checkpoints(tmp_path / "run")[-1] / "trainer_state.json").read_text())
    assert state["per_process"] == [{"position": state["position"], "corrupt_records": 0}]
    assert state["per_device_batch_size"] == 4 and state["global_batch_size"] == 4
    caplog.set_level(logging.WARNING)
    run(data_path, tmp_path / "run", "--resume", "--max_steps", "4", "--gradient_accumulation_steps", "2")
    assert "the global batch is 8 images per step, the checkpoint's run used 4: the data position is unaffected" in (
        caplog.text
    )
