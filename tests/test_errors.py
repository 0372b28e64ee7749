"""Mistakes that must end in one line naming the cause: unlabelled evaluation data, training
errors that mean bad input, errors of DataLoader workers and of several processes, messages that
pointed the wrong way."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ACCELERATE_CPU, free_port
from data_fixtures import png_bytes, write_parquet
from test_cli import run_script

from hf_koleo.cli import DEBUG_ENVIRONMENT, run_main
from hf_koleo.model_card import read_evaluation_files
from hf_koleo.training.checkpoint import CheckpointLoadError
from hf_koleo.training.launch import LAUNCHER_REPORTS_ERRORS, RANK_VARIABLES
from hf_koleo.training.lock import OutputDirLockedError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_process_no_debug(monkeypatch, tmp_path):
    """No traceback mode, no launcher around this process, a private feature cache."""
    for name in (DEBUG_ENVIRONMENT, LAUNCHER_REPORTS_ERRORS, "TORCHELASTIC_ERROR_FILE", "WORLD_SIZE", *RANK_VARIABLES):
        monkeypatch.setenv(name, "")  # records the variable, so the test's changes are undone
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "cache"))


def unlabelled_folder(path: Path, n_images: int = 6) -> Path:
    """Images straight in ``path``, no class subfolders: every label is unknown (-1)."""
    path.mkdir(parents=True)
    for index in range(n_images):
        (path / f"{index}.png").write_bytes(png_bytes(index, mode="RGB"))
    return path


def main_raising(error: BaseException):
    def main():
        raise error

    return main


def exit_code_and_stderr(main, capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["tool.py"])
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    return exit_info.value.code, capsys.readouterr().err


# --- evaluation on unlabelled data -------------------------------------------------------------------


@pytest.mark.parametrize("split", ["training", "test"])
def test_evaluation_refuses_unlabelled_data_naming_the_split_and_source(split, tmp_path, capsys, monkeypatch):
    labelled = str(write_parquet(tmp_path / "labelled.parquet", 12))
    unlabelled = str(unlabelled_folder(tmp_path / "unlabelled"))
    train, test = (unlabelled, labelled) if split == "training" else (labelled, unlabelled)
    result = tmp_path / "result.json"
    arguments = ["--model", "pixels", "--train-data", train, "--test-data", test, "--output", str(result)]
    assert run_script("evaluate", "knn", *arguments, monkeypatch=monkeypatch) == 2
    stderr = capsys.readouterr().err  # progress bars, then the error
    assert stderr.count("error") == 1, stderr
    assert stderr.splitlines()[-1].startswith(
        f"evaluate.py: error: {split} data {unlabelled!r}: its images have no labels"
    )
    assert not result.exists()  # no accuracy of 0.00 written for the model card to pick up


def test_partly_unlabelled_data_is_refused_with_the_count(tmp_path):
    from hf_koleo.evaluation import FeatureSet
    from hf_koleo.evaluation.run import check_labels

    features = FeatureSet(torch.zeros(4, 2), None, torch.tensor([0, -1, 1, -1]))
    with pytest.raises(ValueError, match="test data 'x': 2 of its 4 images have no labels"):
        check_labels(features, "x", "test")


def test_the_model_card_refuses_results_scored_against_unknown_labels(tmp_path):
    entry = {
        "task_type": "image-classification",
        "dataset_type": "unlabelled",
        "dataset_name": "unlabelled",
        "metric_type": "accuracy",
        "metric_name": "kNN top-1 (k=20)",
        "metric_value": 0.0,
    }
    knn = {"by_k": {"20": {"accuracy": 0.0, "per_class_accuracy": {"-1": 0.0}}}, "best_k": 20}
    record = {"model": "m", "data": {"train": "t", "test": "unlabelled"}, "protocols": {"knn": knn}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({**record, "model_index": [entry]}))
    with pytest.raises(ValueError, match=rf"evaluation results file {path} was computed on data with no labels"):
        read_evaluation_files([path])
    knn["by_k"]["20"]["per_class_accuracy"] = {"0": 50.0, "1": 100.0}
    path.write_text(json.dumps({**record, "model_index": [entry]}))
    assert read_evaluation_files([path])[0]["model"] == "m"


# --- training errors that mean bad input, DataLoader workers, ranks ----------------------------------


@pytest.mark.parametrize(
    "error",
    [
        OutputDirLockedError("output_dir out is in use by pid 7 on host (lock file out/.lock)"),
        CheckpointLoadError("--resume latest: no checkpoint could be loaded (a: OSError)"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_training_runtime_errors_that_mean_bad_input_are_one_line(error, capsys, monkeypatch):
    code, stderr = exit_code_and_stderr(main_raising(error), capsys, monkeypatch)
    assert code == 2 and stderr == f"tool.py: error: {error}\n"


class FailingRecords(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        try:
            raise OSError("the disk said no")
        except OSError as cause:
            raise ValueError(f"record {index} is broken\nsee the source") from cause


def test_an_error_of_a_dataloader_worker_is_its_original_message(capsys, monkeypatch):
    def main():
        next(iter(torch.utils.data.DataLoader(FailingRecords(), num_workers=1)))

    code, stderr = exit_code_and_stderr(main, capsys, monkeypatch)
    assert code == 2 and stderr == "tool.py: error: record 0 is broken; see the source\n"


def test_other_ranks_stay_silent_and_record_the_line_for_the_launcher(tmp_path, capsys, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    code, stderr = exit_code_and_stderr(main_raising(ValueError("bad value")), capsys, monkeypatch)
    assert code == 2 and stderr == ""
    assert json.loads(error_file.read_text())["message"]["message"] == "tool.py: error: bad value"
    monkeypatch.setenv("RANK", "0")
    assert exit_code_and_stderr(main_raising(ValueError("bad value")), capsys, monkeypatch) == (
        2,
        "tool.py: error: bad value\n",
    )
    monkeypatch.setenv(LAUNCHER_REPORTS_ERRORS, "1")  # inherited by a single process: it speaks for itself
    assert exit_code_and_stderr(main_raising(ValueError("bad value")), capsys, monkeypatch)[1] != ""
    monkeypatch.setenv("WORLD_SIZE", "2")  # a worker of our launcher: the launcher prints it instead
    assert exit_code_and_stderr(main_raising(ValueError("bad value")), capsys, monkeypatch) == (2, "")


RANKS_SCRIPT = """
import os, sys
from hf_koleo.cli import run_main

def main():
    if sys.argv[1] == "user_error":  # every rank: the first recorded line is printed, once
        raise ValueError("bad value\\nsame on every rank")
    if os.environ["RANK"] == "1":
        raise KeyError("a bug of rank 1")

run_main(main)
"""

LAUNCH_BOTH = """
import sys
from hf_koleo.training.launch import run_cpu_processes

script, port = sys.argv[1:]
for case in ("user_error", "bug"):
    print(f"== {case}", file=sys.stderr, flush=True)
    print(f"exit {run_cpu_processes(script, [case], 2, port)}", file=sys.stderr, flush=True)
"""


def test_our_launcher_prints_a_user_error_once_and_a_crash_of_another_rank_with_its_traceback(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", LAUNCH_BOTH, str(script), str(free_port())]
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    user_error, bug = completed.stderr.split("== bug\n")
    assert user_error.splitlines() == ["== user_error", "ranks.py: error: bad value; same on every rank", "exit 2"]
    assert "KeyError: 'a bug of rank 1'" in bug  # rank 1 writes to a log file; its traceback is shown as it failed
    assert "rank      : 1 (local_rank: 1)" in bug and bug.rstrip().endswith("exit 1")
    assert "Sending process" not in completed.stderr and "ChildFailedError" not in completed.stderr


def test_accelerate_launch_on_two_cpu_processes_reports_a_config_mistake_in_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 1\nlearning_rate: 0.1\n")
    command = [
        *(sys.executable, *ACCELERATE_CPU, "--quiet", "--num_processes", "2", "--main_process_port", str(free_port())),
        *(str(ROOT / "scripts" / "pretrain.py"), "--config", str(config), "--output_dir", str(tmp_path / "run")),
    ]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    (line,) = completed.stderr.splitlines()  # one line from two processes, no launcher report
    assert line.startswith(f"pretrain.py: error: config file {config}: unknown option(s) ['learning_rate']; valid")
    assert completed.returncode == 1  # accelerate's own status for any failure of its child (2 here)


# --- messages that pointed the wrong way -------------------------------------------------------------

MISTAKES = {
    "config_is_a_folder": (["pretrain", "--config", "{tmp}"], "config file {tmp} is a folder; --config needs a YAML"),
    "unknown_yaml_key": (
        ["pretrain", "--config", "{tmp}/run.yaml"],
        "config file {tmp}/run.yaml: unknown option(s) ['learning_rate']; valid keys:",
    ),
    "output_dir_is_a_file": (
        ["pretrain", "--max_steps", "1", "--output_dir", "{tmp}/run.yaml"],
        "--output_dir {tmp}/run.yaml is a file",
    ),
    "output_dir_under_a_file": (
        ["pretrain", "--max_steps", "1", "--output_dir", "{tmp}/run.yaml/run"],
        "--output_dir {tmp}/run.yaml/run: {tmp}/run.yaml is a file, not a folder",
    ),
    "limit_train_0": (
        ["evaluate", "knn", "--model", "pixels", "--train-data", "demo", "--test-data", "demo", "--limit-train", "0"],
        "--limit-train must be an integer >= 1 (leave it out to use every image), got 0",
    ),
    "batch_size_0": (
        ["evaluate", "knn", "--model", "pixels", "--train-data", "demo", "--test-data", "demo", "--batch-size", "0"],
        "--batch-size must be an integer >= 1, got 0",
    ),
    "dry_run_inside_the_checkpoint": (
        ["push_to_hub", "--checkpoint", "{tmp}", "--repo-id", "tester/x", "--dry-run", "{tmp}/preview"],
        "--dry-run {tmp}/preview is inside the checkpoint folder",
    ),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_is_one_line_that_names_the_option_or_file(case, tmp_path, capsys, monkeypatch):
    (tmp_path / "run.yaml").write_text("max_steps: 1\nlearning_rate: 0.1\n")
    (script, *arguments), message = MISTAKES[case]
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    if script == "evaluate":
        arguments += ["--output", str(tmp_path / "result.json")]
    assert run_script(script, *arguments, monkeypatch=monkeypatch) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and f"{script}.py: error: {message.format(tmp=tmp_path)}" in stderr, stderr


def test_resume_from_a_checkpoint_without_model_safetensors_names_that_file(tmp_path):
    from accelerate import Accelerator

    from hf_koleo.training.checkpoint import load_checkpoint

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    accelerator.save_state(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as error_info:
        load_checkpoint(accelerator, tmp_path)
    assert "model.safetensors" in str(error_info.value) and "pytorch_model.bin" not in str(error_info.value)
