"""SIGTERM / SIGINT: the step finishes, a checkpoint is saved, the lock goes, the exit status says which."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_RUN
from test_training import run, student_parameters

from hf_koleo.training import run_setup, trainer
from hf_koleo.training.checkpoint import list_checkpoints
from hf_koleo.training.interrupt import AFTER_THE_LOOP, RunInterrupted, StopRequest, stop_on_signals
from hf_koleo.training.lock import LOCK_FILE
from hf_koleo.training.summary import format_summary


def signal_during_step(monkeypatch, signum: int, at_step: int, times: int = 1) -> None:
    """Make the process send itself ``signum`` (``times`` times) while it trains step ``at_step`` (0-based)."""
    original = trainer.train_step

    def train_step(accelerator, model, optimizer, batch, values, step, *args):
        if step == at_step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return original(accelerator, model, optimizer, batch, values, step, *args)

    monkeypatch.setattr(trainer, "train_step", train_step)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint_that_resumes_exactly(
    data_path, tmp_path, monkeypatch, signum, exit_code
):
    run(data_path, tmp_path / "straight", "--save_every", "100")
    handler_before = signal.getsignal(signal.SIGTERM)
    signal_during_step(monkeypatch, signum, at_step=1)
    stopped = run(data_path, tmp_path / "run", "--save_every", "100")
    monkeypatch.undo()
    name = signal.Signals(signum).name
    assert stopped["stopped"] == name and stopped["exit_code"] == exit_code and stopped["steps"] == 2
    assert format_summary(stopped).startswith(f"pretraining stopped by {name} at step 2 of 4")
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["checkpoint-00000002"]
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handlers are put back
    run(data_path, tmp_path / "run", "--save_every", "100", "--resume")
    straight = student_parameters(list_checkpoints(tmp_path / "straight")[-1])
    resumed = student_parameters(list_checkpoints(tmp_path / "run")[-1])
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_a_second_ctrl_c_stops_at_once(data_path, tmp_path, monkeypatch):
    signal_during_step(monkeypatch, signal.SIGINT, at_step=1, times=2)
    with pytest.raises(RunInterrupted) as interrupted:
        run(data_path, tmp_path / "run", "--save_every", "100")
    assert interrupted.value.exit_code == 130
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_signal_before_the_first_step_ends_the_run_at_once_and_releases_the_lock(data_path, tmp_path, monkeypatch):
    def interrupted_pipeline(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the set-up")

    monkeypatch.setattr(run_setup, "build_pipeline", interrupted_pipeline)
    with pytest.raises(RunInterrupted, match="interrupted by SIGTERM") as interrupted:
        run(data_path, tmp_path / "run")
    assert interrupted.value.exit_code == 143
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_stop_request_defers_the_first_signal_only_while_the_loop_runs():
    request = StopRequest()
    with pytest.raises(RunInterrupted):
        request.handle(signal.SIGTERM)
    request = StopRequest()
    request.deferring = True
    request.handle(signal.SIGTERM)
    request.handle(signal.SIGTERM)  # a scheduler repeating itself: still the step boundary
    assert request.name == "SIGTERM"
    with pytest.raises(RunInterrupted):
        request.handle(signal.SIGINT)  # Ctrl-C after a stop was asked: now
    handler_before = signal.getsignal(signal.SIGINT)
    with stop_on_signals() as installed:
        assert signal.getsignal(signal.SIGINT) == installed.handle
    assert signal.getsignal(signal.SIGINT) is handler_before


SIGNAL_AT_STEP_2 = """
import os, runpy, signal, sys
from hf_koleo.training import trainer

original = trainer.train_step
signum = signal.Signals[os.environ.get("TEST_SIGNAL", "SIGINT")]

def train_step(accelerator, model, optimizer, batch, values, step, *args):
    if step == 1:
        if os.environ.get("TEST_SIGNAL_GROUP"):  # as a scheduler or a terminal does: the whole group
            os.killpg(os.getpgid(0), signum)
        else:
            os.kill(os.getpid(), signum)
    return original(accelerator, model, optimizer, batch, values, step, *args)

trainer.train_step = train_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def signalled_script(tmp_path, data_path, *extra, **environment) -> subprocess.CompletedProcess:
    """``scripts/pretrain.py`` on the tiny run, in its own process group, signalled during step 2."""
    wrapper = tmp_path / "signal_at_step_2.py"
    wrapper.write_text(SIGNAL_AT_STEP_2)
    command = [sys.executable, str(wrapper), str(ROOT / "scripts" / "pretrain.py"), *TINY_RUN]
    command += ["--data", str(data_path), "--output_dir", str(tmp_path / "run"), "--save_every", "100", *extra]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **environment},
        start_new_session=True,  # a group of its own: the group signal reaches the script and its workers only
    )


def test_ctrl_c_in_the_script_exits_130_with_one_line_and_no_traceback(data_path, tmp_path):
    output_dir = tmp_path / "run"
    result = signalled_script(tmp_path, data_path)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    assert "SIGINT at step 2 of 4: checkpoint saved; --resume latest goes on" in result.stderr
    assert result.stdout.strip().startswith("pretraining stopped by SIGINT at step 2 of 4")
    assert [path.name for path in list_checkpoints(output_dir)] == ["checkpoint-00000002"]
    assert not (output_dir / LOCK_FILE).exists()


def test_a_signal_to_the_process_group_leaves_the_data_loader_workers_running_until_the_checkpoint(tmp_path):
    from data_fixtures import write_parquet

    for shard in range(2):
        write_parquet(tmp_path / "data" / f"part-{shard}.parquet", 16, start_seed=100 * shard)
    streamed = ["--in_memory", "no", "--num_workers", "2"]
    result = signalled_script(tmp_path, tmp_path / "data", *streamed, TEST_SIGNAL="SIGTERM", TEST_SIGNAL_GROUP="1")
    assert result.returncode == 143, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "DataLoader worker" not in result.stderr
    assert "SIGTERM at step 2 of 4: checkpoint saved; --resume latest goes on" in result.stderr
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["checkpoint-00000002"]


def test_data_loader_workers_keep_delivering_after_a_stop_signal(tmp_path):
    # A stop signal to the group reaches the workers too; with several processes the loop needs
    # batches until the next log step, so the workers must outlive it.
    from accelerate import Accelerator
    from data_fixtures import write_parquet

    from hf_koleo.training.arguments import parse_pretraining_args
    from hf_koleo.training.pipeline import build_pipeline

    for shard in range(2):
        write_parquet(tmp_path / "data" / f"part-{shard}.parquet", 8, start_seed=100 * shard)
    arguments, model_config = parse_pretraining_args(
        [*TINY_RUN, "--data", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run")]
        + ["--in_memory", "no", "--num_workers", "2"]
    )
    with stop_on_signals() as stop:
        data = build_pipeline(arguments, model_config, Accelerator(cpu=True))
        stop.deferring = True  # as in the trainer: the workers were started before
        state = trainer.TrainerState()
        data.next_batch(state)
        for worker in data._iterator._workers:
            os.kill(worker.pid, signal.SIGTERM)
        for _ in range(20):  # several passes: far beyond what was prefetched
            data.next_batch(state)
        assert all(worker.is_alive() for worker in data._iterator._workers)
        del data


def test_a_signal_after_the_loop_says_the_final_checkpoint_holds_the_run():
    request = StopRequest()
    request.deferring, request.outside = False, AFTER_THE_LOOP
    with pytest.raises(RunInterrupted, match="while exporting: --resume latest exports from the final checkpoint"):
        request.handle(signal.SIGTERM)


BEFORE_THE_LOOP = RunInterrupted(signal.SIGTERM, "before the first step: nothing to save")


@pytest.mark.parametrize(
    ("interruption", "exit_code", "line"),
    [
        (BEFORE_THE_LOOP, 143, "pretrain.py: interrupted by SIGTERM before the first step: nothing to save"),
        (KeyboardInterrupt(), 130, "pretrain.py: interrupted by SIGINT"),
    ],
)
def test_an_interruption_is_one_line_with_the_signals_exit_status(interruption, exit_code, line, capsys, monkeypatch):
    from hf_koleo.cli import run_main

    monkeypatch.setattr(sys, "argv", ["pretrain.py"])

    def main():
        raise interruption

    with pytest.raises(SystemExit) as exited:
        run_main(main)
    assert exited.value.code == exit_code and capsys.readouterr().err == line + "\n"
