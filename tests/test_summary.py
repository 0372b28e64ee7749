import json
import subprocess
import sys

from data_fixtures import write_parquet
from test_training import ROOT, TINY_RUN

from hf_koleo.training.summary import format_summary, unique_prototype_table

REPORT = {
    "config": {"num_prototypes": 32, "eps": 0.025, "n_images": 8},
    "teacher/cls": {"eps": 0.025, "unique_curve": {"0.001": 32, "0.025": 20, "0.4": 3}, "utilisation": 0.5},
    "student/cls": {"eps": 0.025, "unique_curve": {"0.001": 31, "0.025": 18, "0.4": 2}},
}
SUMMARY = {
    "steps": 4,
    "images_seen": 16,
    "images_per_second": 12.345,
    "corrupt_records": 1,
    "checkpoint": "/runs/a/checkpoints/checkpoint-00000004",
    "backbone": "/runs/a/backbone",
    "report_path": "/runs/a/prototype_report.json",
    "prototype_report": REPORT,
}


def test_unique_prototype_table_has_one_row_per_eps_and_one_column_per_head():
    rows = unique_prototype_table(REPORT).splitlines()
    assert rows[0].split() == ["eps", "teacher/cls", "student/cls"]
    assert [row.split() for row in rows[1:]] == [["0.001", "32", "31"], ["0.025*", "20", "18"], ["0.4", "3", "2"]]


def test_summary_names_the_numbers_and_paths_and_leaves_the_report_out():
    text = format_summary(SUMMARY)
    assert text.splitlines()[0] == ("pretraining done: 4 steps, 16 images seen, 12.3 img/s, 1 corrupt records skipped")
    for path in ("checkpoint-00000004", "/runs/a/backbone", "/runs/a/prototype_report.json"):
        assert path in text
    assert "unique prototypes of 32" in text and "utilisation" not in text and len(text.splitlines()) < 15


def test_pretrain_script_ends_with_the_short_summary(tmp_path):
    data = write_parquet(tmp_path / "train.parquet", 48)
    command = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *TINY_RUN]
    command += ["--data", str(data), "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    # a 4-step run on 32 prototypes uses one: the collapse alarm's line closes the summary, after the table
    lines = [line for line in lines if not line.startswith("collapse alarm, ")]
    assert lines[0].startswith("pretraining done: 4 steps, 16 images seen,") and "img/s" in lines[0]
    assert f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'checkpoint-00000004'}" in result.stdout
    assert str(tmp_path / "run" / "backbone") in result.stdout
    assert str(tmp_path / "run" / "prototype_report.json") in result.stdout
    assert lines[-1].split()[0] == "0.4" and len(lines) < 20  # the eps table ends it; no report JSON
    json.loads((tmp_path / "run" / "prototype_report.json").read_text())
    # The console beside the bar: one line per statistics step and per checkpoint, no other library's chatter.
    log_lines = [line for line in result.stderr.splitlines() if " INFO " in line or " WARNING " in line]
    statistics = [line for line in log_lines if "· unique@0.025 teacher" in line]
    assert [line.split("INFO hf_koleo.training.trainer: ")[1].split(" ·")[0] for line in statistics] == [
        "step 2",
        "step 4",
    ]
    assert " · used " in statistics[0] and "NN-distance median" in statistics[0] and "{" not in statistics[0]
    assert sum("checkpoint " in line for line in log_lines) == 2
    assert all(" hf_koleo." in line for line in log_lines), log_lines
    assert "Writing model shards" not in result.stderr and "Loading weights" not in result.stderr


def test_log_level_debug_shows_the_libraries_and_the_full_statistics(tmp_path, monkeypatch, caplog):
    from hf_koleo.console import configure_logging
    from hf_koleo.training.arguments import parse_pretraining_args
    from hf_koleo.training.trainer import pretrain

    data = write_parquet(tmp_path / "train.parquet", 48)
    arguments, model_config = parse_pretraining_args(
        [*TINY_RUN, "--data", str(data), "--output_dir", str(tmp_path / "run"), "--log_level", "debug"]
    )
    configure_logging(arguments.log_level)
    try:
        with caplog.at_level("DEBUG"):
            pretrain(arguments, model_config)
    finally:
        configure_logging("info")
    assert "step 2 prototypes: {" in caplog.text  # the whole dictionary
    assert any(record.name.startswith("accelerate") for record in caplog.records)  # its checkpoint lines
