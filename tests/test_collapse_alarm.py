import json
import logging
import math

import pytest
from conftest import ROOT, TINY_RUN

from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.collapse_alarm import UNIFORM_LOSS, UNIQUE_DROP, USED, CollapseAlarm
from hf_koleo.training.summary import format_summary
from hf_koleo.training.trainer import pretrain

PREFIX = "prototypes/teacher_cls"


def row(used=None, unique=None):
    metrics = {}
    if used is not None:
        metrics[f"{PREFIX}/used"] = used
    if unique is not None:
        metrics[f"{PREFIX}/unique@0.025"] = unique
    return metrics


def test_each_sign_raises_once_until_it_clears():
    alarm = CollapseAlarm(1000, used=0.01, unique_drop=0.1, loss_margin=0.01)
    assert alarm.check_prototypes(100, row(used=50, unique=1000)) == []
    assert [a["sign"] for a in alarm.check_prototypes(200, row(used=5, unique=950))] == [USED]  # 5 % drop: fine
    assert alarm.check_prototypes(300, row(used=3, unique=940)) == []  # still low: no second line
    raised = alarm.check_prototypes(400, row(used=20, unique=800))  # used cleared; 15 % fewer unique
    assert [a["sign"] for a in raised] == [UNIQUE_DROP] and "940 to 800" in raised[0]["message"]
    assert [a["sign"] for a in alarm.check_prototypes(500, row(used=2, unique=800))] == [USED]  # raised again
    assert [a["step"] for a in alarm.alarms] == [200, 400, 500]


def test_the_loss_sign_waits_for_the_warm_up_and_reads_ln_k():
    alarm = CollapseAlarm(4096, used=0.0, unique_drop=0.0, loss_margin=0.01)
    at_ln_k = math.log(4096) - 0.001
    assert alarm.check_loss(10, at_ln_k, after_warmup=False) == []  # a fresh head starts near ln K
    assert alarm.check_loss(20, 5.0, after_warmup=True) == []
    assert alarm.check_loss(30, float("nan"), after_warmup=True) == []  # the non-finite guard's job
    (raised,) = alarm.check_loss(40, at_ln_k, after_warmup=True)
    assert raised["sign"] == UNIFORM_LOSS and "uniform" in raised["message"]
    assert alarm.check_prototypes(50, row(used=1, unique=1)) == []  # thresholds 0: those signs are off


def test_restore_goes_on_from_a_resumed_runs_metrics():
    alarm = CollapseAlarm(1000, used=0.01, unique_drop=0.1, loss_margin=0.0)
    first = alarm.check_prototypes(100, row(used=1, unique=1000))
    rows = [
        {"step": 100, **row(used=1, unique=1000)},
        {"step": 100, **{f"collapse_alarm/{k}": v for k, v in first[0].items()}},
    ]
    resumed = CollapseAlarm(1000, used=0.01, unique_drop=0.1, loss_margin=0.0)
    resumed.restore(rows)
    assert resumed.alarms == alarm.alarms
    assert [a["sign"] for a in resumed.check_prototypes(200, row(used=50, unique=800))] == [UNIQUE_DROP]


@pytest.mark.parametrize("name", ["collapse_alarm_used", "collapse_alarm_unique_drop"])
def test_thresholds_are_shares(name):
    with pytest.raises(ValueError, match=f"{name} must be a share in \\[0, 1\\], got 1.5"):
        parse_pretraining_args(["--max_steps", "2", f"--{name}", "1.5"])


def test_a_run_warns_logs_and_summarises_its_alarm(data_path, tmp_path, caplog):
    # Every prototype used is impossible with 32 prototypes and 8 teacher views a step: the alarm fires
    # at the first statistics step, once, and is in the log, metrics.jsonl and the summary.
    arguments, model_config = parse_pretraining_args(
        [*TINY_RUN, "--data", str(data_path), "--output_dir", str(tmp_path / "run"), "--collapse_alarm_used", "1.0"]
    )
    with caplog.at_level(logging.WARNING, logger="hf_koleo"):
        summary = pretrain(arguments, model_config)
    warnings = [record.getMessage() for record in caplog.records if "collapse alarm" in record.getMessage()]
    assert len(warnings) == 1 and "collapse_alarm_used 100.00%" in warnings[0]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    alarm_rows = [r for r in rows if "collapse_alarm/sign" in r]
    assert [(r["step"], r["collapse_alarm/sign"]) for r in alarm_rows] == [
        (summary["collapse_alarms"][0]["step"], USED)
    ]
    assert "collapse alarm, step" in format_summary(summary)


def replay(record_path):
    """The default alarm over a committed run's per-epoch prototype statistics: the steps it fires at."""
    record = json.loads(record_path.read_text())
    history = record["result"]["prototype_history"]
    arguments, _ = parse_pretraining_args(["--max_steps", "2"])
    alarm = CollapseAlarm.from_arguments(arguments, record["result"]["settings"]["model"]["num_prototypes"])
    return [(a["step"], a["sign"]) for row in history for a in alarm.check_prototypes(row["step"], row)]


def test_the_defaults_stay_quiet_on_the_projects_healthy_runs_and_fire_on_its_collapse():
    healthy = sorted((ROOT / "docs" / "koleo_search" / "runs").glob("*.json"))
    healthy += sorted((ROOT / "docs" / "cpu_recipe" / "runs").glob("fashion_mnist_val-*.json"))
    assert len(healthy) >= 10
    for path in healthy:  # as few as 3 of 16,384 prototypes used, nothing merging
        assert replay(path) == [], path.name
    # the CPU recipe's 34 epochs: 4,096 unique until epoch 10, 3,860 at 11, 3,203 at 12, 233 at the end
    collapse = replay(ROOT / "docs" / "cpu_recipe" / "runs" / "recipe-batch_64_momentum_0.99_local_0-34ep-seed0.json")
    assert collapse[0] == (9372, UNIQUE_DROP)


def test_one_prototype_for_every_image_is_collapse_at_any_k():
    alarm = CollapseAlarm(256, used=0.0001, unique_drop=0.0, loss_margin=0.0)  # 0.0001 x 256 < 1: share alone never
    assert alarm.check_prototypes(100, row(used=2)) == []
    assert [a["sign"] for a in alarm.check_prototypes(200, row(used=1))] == [USED]
