"""The GPU study (experiments/gpu_study.py, gpu_study_report.py): plan, resumable chunks, verdicts."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import experiments.gpu_study as gpu_study
from experiments.gpu_study import load_gpu_study_config, plan_runs, record_status, run_chunk, run_settings
from experiments.gpu_study_report import claims, load_results, render_markdown, results_json
from hf_koleo.prototypes import DEFAULT_EPS_VALUES
from hf_koleo.training.arguments import arguments_from_settings

CONFIG = ROOT / "configs" / "study_gpu.yaml"


def test_full_plan_runs_the_recipe_then_the_main_comparison_then_the_rest_each_once():
    config = load_gpu_study_config(CONFIG)
    runs = plan_runs(config)
    names = [run.name for run in runs]
    assert len(names) == len(set(names))
    assert [run.stage for run in runs[:4]] == ["recipe"] * 4
    assert names[4:8] == [
        "fashion_mnist-K16384-baseline-seed0",
        "fashion_mnist-K16384-koleo_proto-seed0",
        "fashion_mnist_lt-K16384-baseline-seed0",
        "fashion_mnist_lt-K16384-koleo_proto-seed0",
    ]
    assert {run.num_prototypes for run in runs} == {4096, 16384, 65536}
    assert {run.method for run in runs if run.stage == "sinkhorn"} == {"baseline_sinkhorn"}
    # every run's settings parse, and carry what the run is about
    for run in runs:
        arguments, model = arguments_from_settings(run_settings(config, run, Path("/tmp/x")), source=run.name)
        assert model.num_prototypes == run.num_prototypes and arguments.seed == run.seed
        assert arguments.epochs >= (50 if run.stage == "recipe" else 100)
        assert arguments.proto_every_epochs == 1 and arguments.resume == "latest"
        if run.stage != "recipe":
            assert arguments.data.startswith("fashion_mnist:train")  # never the test split
            assert model.koleo_proto_weight == (0.1 if run.method == "koleo_proto" else 0.0)
            assert model.centring == ("sinkhorn_knopp" if run.method == "baseline_sinkhorn" else "ema")
        else:
            assert arguments.data == "fashion_mnist:fit"
            assert config["datasets"][run.dataset]["test"] == "fashion_mnist:val"


def test_a_stage_naming_an_unknown_method_is_refused(tmp_path):
    text = CONFIG.read_text().replace("methods: [baseline_sinkhorn]", "methods: [baseline_sinkorn]")
    (tmp_path / "study.yaml").write_text(text)
    (tmp_path / "fashion_mnist_gpu.yaml").write_text((ROOT / "configs" / "fashion_mnist_gpu.yaml").read_text())
    with pytest.raises(ValueError, match="unknown methods \\['baseline_sinkorn'\\]"):
        load_gpu_study_config(tmp_path / "study.yaml")


def _small_quick_config():
    config = load_gpu_study_config(CONFIG, quick=True)
    config["stages"] = [
        {"name": "main", "datasets": ["fashion_mnist"], "methods": ["baseline", "koleo_proto"], "num_prototypes": [32],
         "seeds": [0], "keep_backbone": True},
    ]  # fmt: skip
    return config


def test_a_chunk_cut_by_the_budget_resumes_in_the_next_and_each_run_leaves_one_small_record(
    tmp_path, monkeypatch, one_thread
):
    config = _small_quick_config()
    calls = []
    real_pretrain = gpu_study.pretrain

    def out_of_time_first(arguments, model_config):
        calls.append(arguments.output_dir)
        if len(calls) == 1:
            arguments = dataclasses.replace(arguments, max_time=1e-9)  # the budget ends at the first log step
        return real_pretrain(arguments, model_config)

    monkeypatch.setattr(gpu_study, "pretrain", out_of_time_first)
    first = run_chunk(config, tmp_path / "work", tmp_path / "runs", 600, backbone_dir=tmp_path / "backbones")
    baseline, koleo = "fashion_mnist-K32-baseline-seed0", "fashion_mnist-K32-koleo_proto-seed0"
    assert first == {"finished": [], "interrupted": baseline, "pending": [baseline, koleo]}
    assert not list((tmp_path / "runs").glob("*.json"))

    second = run_chunk(config, tmp_path / "work", tmp_path / "runs", 600, backbone_dir=tmp_path / "backbones")
    assert second == {"finished": [baseline, koleo], "interrupted": None, "pending": []}
    record = json.loads((tmp_path / "runs" / f"{baseline}.json").read_text())
    assert record["pretraining"]["chunks"] == 2 and record["pretraining"]["steps"] == 4
    assert [row["step"] for row in record["prototype_history"]] == [2, 4]  # steps 1 and 2..4 joined, no repeat
    assert [round(epoch * 3000 / 8) for epoch, _ in record["losses"]] == [1, 2, 3, 4]
    assert record["final_prototypes"]["teacher/cls"]["unique_curve"]["0.025"] <= 32
    assert set(record["evaluation"]) >= {"knn_top1", "knn_balanced", "linear_top1", "linear_balanced", "shot5"}
    assert record["settings"]["model"]["koleo_proto_weight"] == 0.0 and record["device"] == "CPU"
    assert (tmp_path / "runs" / "pixels-fashion_mnist.json").exists()
    export = tmp_path / "backbones" / baseline  # the release folder, made where the checkpoint is
    assert (export / "model.safetensors").exists() and (export / "preprocessor_config.json").exists()
    card = (export / "README.md").read_text()
    assert "model-index" in card and "demo:test" in card and "koleo" in card.lower()
    assert sum(path.stat().st_size for path in (tmp_path / "runs").glob("*.json")) < 200_000

    # a third chunk has nothing left to do, and the script renders the report from the records
    assert run_chunk(config, tmp_path / "work", tmp_path / "runs", 600) == {
        "finished": [], "interrupted": None, "pending": []
    }  # fmt: skip
    (run,) = [run for run in plan_runs(config) if run.name == koleo]
    assert record_status(config, run, tmp_path / "runs") == "done"
    config["methods"]["koleo_proto"]["model"]["koleo_proto_weight"] = 0.2  # the config moved on: not rerun, flagged
    assert record_status(config, run, tmp_path / "runs") == "stale"
    assert run_chunk(config, tmp_path / "work", tmp_path / "runs", 600)["finished"] == []
    # deleting the stale result reruns it from scratch: the old checkpoint is not resumed under new settings
    (tmp_path / "runs" / f"{koleo}.json").unlink()
    assert run_chunk(config, tmp_path / "work", tmp_path / "runs", 600)["finished"] == [koleo]
    rerun = json.loads((tmp_path / "runs" / f"{koleo}.json").read_text())
    assert rerun["pretraining"]["chunks"] == 1 and rerun["settings"]["model"]["koleo_proto_weight"] == 0.2
    assert record_status(config, run, tmp_path / "runs") == "done"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_study.py"), "report", "--quick", "--results_dir",
         str(tmp_path / "runs"), "--output", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json"),
         "--figures", str(tmp_path / "fig")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    markdown = (tmp_path / "r.md").read_text()
    # the shipped quick config gives KoLeo-proto weight 0.1: the 0.2 result is stale there and left out
    assert "| 32 | baseline | 1 |" in markdown and "| 32 | koleo_proto |" not in markdown
    assert f"Left out: {koleo} (stale" in markdown
    headline = json.loads((tmp_path / "r.json").read_text())
    assert {run["method"] for run in headline["runs"]} == {"baseline"}
    assert len(list((tmp_path / "fig").glob("*.png"))) == 3


def _record(dataset, k, method, seed, unique, knn, balanced):
    return {
        "name": f"{dataset}-K{k}-{method}-seed{seed}", "stage": "main", "dataset": dataset, "method": method,
        "num_prototypes": k, "seed": seed, "settings": {"epochs": 100}, "device": "test", "prototype_history": [],
        "pretraining": {"seconds": 60.0},
        "final_prototypes": {"teacher/cls": {"unique_curve": {f"{eps:g}": unique for eps in DEFAULT_EPS_VALUES}}},
        "evaluation": {"knn_top1": knn, "knn_balanced": balanced, "linear_top1": knn, "linear_balanced": balanced,
                       "shot5": knn},
    }  # fmt: skip


def test_verdicts_follow_the_targets():
    k = 16384
    runs = [
        _record("fashion_mnist", k, "baseline", 0, int(0.6 * k), 90.5, 90.5),
        _record("fashion_mnist", k, "koleo_proto", 0, int(0.99 * k), 91.0, 91.0),
        *[_record("fashion_mnist_lt", k, "baseline", seed, int(0.7 * k), 80.0, 70.0 + 0.2 * seed) for seed in range(3)],
        *[_record("fashion_mnist_lt", k, "koleo_proto", seed, k, 81.0, 72.0 + 0.2 * seed) for seed in range(3)],
    ]
    results = {"runs": runs, "pixels": {"fashion_mnist": {"knn_top1": 84.6}}}
    verdicts = {item["claim"]: item["verdict"] for item in claims(results)}
    assert verdicts == {
        "features beat raw pixels": "confirmed",
        "the baseline partially collapses": "confirmed",
        "KoLeo-proto prevents it": "confirmed",
        "KoLeo-proto helps on long-tailed data": "confirmed",
    }
    # with the config, the claim tests the recipe's own group (KoLeo-proto at the recipe's K), not the best one
    results["recipe_group"] = {"num_prototypes": k}
    assert claims(results)[0]["verdict"] == "confirmed" and "the recipe" in claims(results)[0]["evidence"]
    results["pixels"]["fashion_mnist"]["knn_top1"] = 91.5  # >= 90 but not above pixels: not confirmed
    assert claims(results)[0]["verdict"] == "not confirmed"
    results["pixels"]["fashion_mnist"]["knn_top1"] = 84.6
    # a small loss (0.3 points, above the spread) is not a contradiction: that needs >= 1 point
    for run in runs:
        if run["dataset"] == "fashion_mnist_lt" and run["method"] == "koleo_proto":
            run["evaluation"]["knn_balanced"] -= 2.3
    assert {c["claim"]: c["verdict"] for c in claims(results)}["KoLeo-proto helps on long-tailed data"] == (
        "not confirmed"
    )
    for run in runs:
        if run["dataset"] == "fashion_mnist_lt" and run["method"] == "koleo_proto":
            run["evaluation"]["knn_balanced"] += 2.3
    # KoLeo-proto worse on LT by more than the spread: contradicted; short of 95 % unique: not confirmed
    for run in runs:
        if run["dataset"] == "fashion_mnist_lt" and run["method"] == "koleo_proto":
            run["evaluation"]["knn_balanced"] -= 5.0
            run["final_prototypes"]["teacher/cls"]["unique_curve"]["0.025"] = int(0.9 * k)
    verdicts = {item["claim"]: item["verdict"] for item in claims(results)}
    assert verdicts["KoLeo-proto helps on long-tailed data"] == "contradicted"
    assert verdicts["KoLeo-proto prevents it"] == "not confirmed"
    # no collapse anywhere: the baseline claim is not confirmed and the KoLeo-proto one cannot be judged
    for run in runs:
        run["final_prototypes"]["teacher/cls"]["unique_curve"]["0.025"] = k
    verdicts = {item["claim"]: item["verdict"] for item in claims(results)}
    assert verdicts["the baseline partially collapses"] == "not confirmed"
    assert verdicts["KoLeo-proto prevents it"] == "not measured"
    markdown = render_markdown(results)
    assert "| 16,384 | koleo_proto | 3 |" in markdown
    tables = [line for line in markdown.splitlines() if line.startswith("| K |") or line.startswith("| 16,384 |")]
    assert len({line.count("|") for line in tables}) == 1  # every row has the header's columns
    assert len(results_json(results)["runs"]) == len(runs)


def test_an_empty_results_folder_reports_that_nothing_ran(tmp_path):
    results = load_results(tmp_path)
    assert render_markdown(results) == "No run of the GPU study has finished yet.\n"
    assert {item["verdict"] for item in claims(results)} == {"not measured"}


def test_the_plan_command_lists_every_run_with_its_status_and_images(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_study.py"), "plan", "--quick", "--results_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    runs = plan_runs(load_gpu_study_config(CONFIG, quick=True))
    assert [line.split()[2] for line in lines[:-1]] == [run.name for run in runs]
    assert all(line.startswith("pending") and line.endswith("M images") for line in lines[:-1])
    assert lines[-1].endswith("M images in all")
