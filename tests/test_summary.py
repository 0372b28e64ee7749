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
    assert lines[0].startswith("pretraining done: 4 steps, 16 images seen,") and "img/s" in lines[0]
    assert f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'checkpoint-00000004'}" in result.stdout
    assert str(tmp_path / "run" / "backbone") in result.stdout
    assert str(tmp_path / "run" / "prototype_report.json") in result.stdout
    assert lines[-1].split()[0] == "0.4" and len(lines) < 20  # the eps table ends it; no report JSON
    json.loads((tmp_path / "run" / "prototype_report.json").read_text())
