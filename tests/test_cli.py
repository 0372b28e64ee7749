"""The scripts' error policy (hf_koleo/cli.py): a user's mistake is one line and exit code 2."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_koleo.cli import DEBUG_ENVIRONMENT, run_main
from hf_koleo.data.sources import resolve_data_files
from hf_koleo.training.arguments import parse_pretraining_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.setenv(DEBUG_ENVIRONMENT, "")  # records the variable, so a test that sets it is undone
    monkeypatch.delenv(DEBUG_ENVIRONMENT)


def run_script(name: str, *arguments: str, monkeypatch) -> int:
    """Run ``scripts/<name>.py`` in this process as ``__main__``; returns its exit code."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / f"{name}.py"), *arguments])
    monkeypatch.setenv(DEBUG_ENVIRONMENT, "")
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / f"{name}.py"), run_name="__main__")
    return exit_info.value.code


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value\n  for key x"),
        FileNotFoundError("config file a.yaml not found"),
        yaml.YAMLError("broken"),
        ConnectionError("cannot reach the Hub"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_user_error_is_one_line_on_stderr_with_exit_code_2(error, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tool.py"])

    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("tool.py: error: ")
    assert str(error).splitlines()[0] in stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tool.py"])

    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_main(main)


def test_debug_keeps_the_traceback_and_is_removed_from_the_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tool.py", "--debug", "--x", "1"])
    seen = []

    def main():
        seen.append(list(sys.argv))
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        run_main(main)
    assert seen == [["tool.py", "--x", "1"]] and os.environ[DEBUG_ENVIRONMENT] == "1"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_script_runs_its_main_under_the_error_policy(script):
    source = script.read_text()
    assert re.search(r"^from hf_koleo\.cli import .*\brun_main\b", source, re.MULTILINE)
    assert source.rstrip().endswith('if __name__ == "__main__":\n    run_main(main)')
    assert "except " not in source  # no script-local error handling left (sys.exit may pass on a signal's status)


CONFIG_CASES = {
    "broken_yaml": (b"max_steps: [1\n", r"broken_yaml.yaml is not valid YAML at line 2, column 1"),
    "binary": (bytes(range(256)), r"binary.yaml is not a UTF-8 text \(YAML\) file"),
    "model_list": (b"max_steps: 1\nmodel: [1, 2]\n", r"model_list.yaml: model must be a mapping .* got \[1, 2\]"),
    "backbone_int": (b"max_steps: 1\nmodel:\n  backbone_config: 5\n", r"backbone_config must be a mapping .* got 5"),
    "bad_int": (b"max_steps: many\n", r"argument --max_steps.*invalid int value: 'many'"),
    "top_list": (b"- 1\n- 2\n", r"top_list.yaml must hold a mapping of keys to values, got list"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_files_raise_value_error_naming_the_file_or_key(case, tmp_path):
    content, message = CONFIG_CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        parse_pretraining_args(["--config", str(path)])


def test_pretrain_script_reports_a_bad_config_in_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "broken.yaml"
    path.write_text("max_steps: [1\n")
    assert run_script("pretrain", "--config", str(path), monkeypatch=monkeypatch) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and f"pretrain.py: error: config file {path} is not valid YAML" in stderr


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        ("prepare_fashion_mnist", ["--output", "{tmp}/out", "--raw-dir", "{tmp}/no_raw"], "no_raw"),
        ("export", ["--checkpoint", "{tmp}/missing", "--output", "{tmp}/out"], "missing"),
    ],
    ids=["prepare_fashion_mnist", "export"],
)
def test_other_scripts_report_a_missing_file_in_one_line(script, arguments, message, tmp_path, capsys, monkeypatch):
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    assert run_script(script, *arguments, monkeypatch=monkeypatch) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and ": error: " in stderr and message in stderr


def test_a_real_process_exits_2_with_one_line_and_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "model_list.yaml"
    path.write_text("max_steps: 1\nmodel: [1, 2]\n")
    command = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", str(path)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop(DEBUG_ENVIRONMENT, None)
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines() == [
        f"pretrain.py: error: config file {path}: model must be a mapping of KoLeoDinoConfig keys, got [1, 2]"
    ]
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, env=environment, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ValueError" in debug.stderr


def test_a_relative_data_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("data/train", "data/train:test", "elsewhere/train.parquet", "./train"):
        with pytest.raises(FileNotFoundError, match=rf"data source '{name}' does not exist"):
            resolve_data_files(name)
    assert resolve_data_files("someone/some-images:validation") == (
        "someone/some-images",
        {"split_override": "validation"},
    )
