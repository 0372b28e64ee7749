"""The GPU study on the harness (configs/experiments/gpu_study.yaml, pretrain_eval, study_report)."""

import dataclasses
import json
from pathlib import Path

from conftest import ROOT

import experiments.pretrain_eval as pretrain_eval
from experiments.pretrain_eval import run_settings
from experiments.runner import run_pending
from experiments.spec import load_spec
from experiments.store import Store
from experiments.study_report import claims, load_results, render_markdown, results_json, write_report
from hf_koleo.prototypes import DEFAULT_EPS_VALUES
from hf_koleo.training.arguments import arguments_from_settings

SPEC = ROOT / "configs" / "experiments" / "gpu_study.yaml"


def test_full_plan_runs_pixels_the_recipe_then_the_main_comparison_then_the_rest_each_once():
    runs = load_spec(SPEC).runs
    names = [run.name for run in runs]
    assert len(names) == len(set(names))
    assert names[:3] == ["pixels-fashion_mnist_val", "pixels-fashion_mnist", "pixels-fashion_mnist_lt"]
    assert [run.stage for run in runs[3:7]] == ["recipe"] * 4
    assert names[7:11] == [
        "fashion_mnist-K16384-baseline-seed0",
        "fashion_mnist-K16384-koleo_proto-seed0",
        "fashion_mnist_lt-K16384-baseline-seed0",
        "fashion_mnist_lt-K16384-koleo_proto-seed0",
    ]
    trained = [run for run in runs if run.kind == "pretrain_eval"]
    assert {run.axes["num_prototypes"] for run in trained} == {4096, 16384, 65536}
    assert {run.axes["method"] for run in runs if run.stage == "sinkhorn"} == {"baseline_sinkhorn"}
    assert all(run.reserve_seconds == (240 if run.stage == "main" else 60) for run in trained)
    # every run's settings parse, and carry what the run is about
    for run in trained:
        arguments, model = arguments_from_settings(run_settings(run.params, Path("/tmp/x")), source=run.name)
        assert model.num_prototypes == run.axes["num_prototypes"] and arguments.seed == run.axes["seed"]
        assert arguments.epochs >= (50 if run.stage == "recipe" else 100)
        assert arguments.proto_every_epochs == 1 and arguments.resume == "latest"
        assert run.params.get("keep_backbone", False) == (run.stage == "main")
        if run.stage != "recipe":
            assert arguments.data.startswith("fashion_mnist:train")  # never the test split
            assert model.koleo_proto_weight == (0.1 if run.axes["method"] == "koleo_proto" else 0.0)
            assert model.centring == ("sinkhorn_knopp" if run.axes["method"] == "baseline_sinkhorn" else "ema")
        else:
            assert arguments.data == "fashion_mnist:fit" and run.params["dataset"]["test"] == "fashion_mnist:val"


def _small_quick_spec():
    spec = load_spec(SPEC, quick=True)
    spec.runs = [run for run in spec.runs if run.name in (
        "pixels-fashion_mnist", "fashion_mnist-K32-baseline-seed0", "fashion_mnist-K32-koleo_proto-seed0"
    )]  # fmt: skip
    return spec


def test_a_run_cut_by_the_budget_resumes_in_the_next_call_and_leaves_one_small_record(
    tmp_path, monkeypatch, one_thread
):
    spec = _small_quick_spec()
    calls = []
    real_pretrain = pretrain_eval.pretrain

    def out_of_time_first(arguments, model_config):
        calls.append(arguments.output_dir)
        if len(calls) == 1:
            arguments = dataclasses.replace(arguments, max_time=1e-9)  # the budget ends at the first log step
        return real_pretrain(arguments, model_config)

    monkeypatch.setattr(pretrain_eval, "pretrain", out_of_time_first)
    store, work = Store(tmp_path / "runs"), tmp_path / "work"
    first = run_pending(spec, store, work, 600)
    baseline, koleo = "fashion_mnist-K32-baseline-seed0", "fashion_mnist-K32-koleo_proto-seed0"
    assert first.as_dict() == {"finished": ["pixels-fashion_mnist"], "failed": [], "interrupted": baseline,
                               "pending": [baseline, koleo]}  # fmt: skip
    second = run_pending(spec, store, work, 600)
    assert second.as_dict() == {"finished": [baseline, koleo], "failed": [], "interrupted": None, "pending": []}
    record = store.read(baseline)["result"]
    assert record["pretraining"]["chunks"] == 2 and record["pretraining"]["steps"] == 4
    assert [row["step"] for row in record["prototype_history"]] == [2, 4]  # steps 1 and 2..4 joined, no repeat
    assert [round(epoch * 3000 / 8) for epoch, _ in record["losses"]] == [1, 2, 3, 4]
    assert record["final_prototypes"]["teacher/cls"]["unique_curve"]["0.025"] <= 32
    assert set(record["evaluation"]) >= {"knn_top1", "knn_balanced", "linear_top1", "linear_balanced", "shot5"}
    assert record["settings"]["model"]["koleo_proto_weight"] == 0.0 and record["device"] == "CPU"
    export = Path(record["release"])  # the release folder, made where the checkpoint is
    assert export == work / baseline / "release"
    assert (export / "model.safetensors").exists() and (export / "preprocessor_config.json").exists()
    card = (export / "README.md").read_text()
    assert "model-index" in card and "demo:test" in card and "koleo" in card.lower()
    assert sum(path.stat().st_size for path in (tmp_path / "runs").glob("*.json")) < 200_000

    # the spec moves on: the old record is stale, never overwritten, left out of the report with why
    def moved_on(run):
        evaluation = {**run.params["evaluation"], "fewshot_draws": 3}
        return dataclasses.replace(run, params={**run.params, "evaluation": evaluation}) if run.name == koleo else run

    spec.runs = [moved_on(run) for run in spec.runs]
    assert run_pending(spec, store, work, 600).finished == []
    records, left_out = store.records(spec.runs)
    written = write_report(spec, records, left_out, tmp_path / "docs")
    markdown = (tmp_path / "docs" / "results_gpu.md").read_text()
    assert "| 32 | baseline | 1 |" in markdown and "| 32 | koleo_proto |" not in markdown
    assert f"Left out: {koleo} (stale" in markdown
    assert "| - | raw pixels |" in markdown
    headline = json.loads((tmp_path / "docs" / "results_gpu.json").read_text())
    assert {run["method"] for run in headline["runs"]} == {"baseline"}
    assert len([path for path in written if path.suffix == ".png"]) == 3


def _record(dataset, k, method, seed, unique, knn, balanced):
    return {
        "name": f"{dataset}-K{k}-{method}-seed{seed}", "stage": "main", "dataset": dataset, "method": method,
        "num_prototypes": k, "seed": seed, "settings": {"epochs": 100}, "device": "test", "prototype_history": [],
        "pretraining": {"seconds": 60.0},
        "final_prototypes": {"teacher/cls": {"unique_curve": {f"{eps:g}": unique for eps in DEFAULT_EPS_VALUES},
                                             "utilisation": {"used": 12}, "nn_distance_quantiles": {"q0.5": 0.5}}},
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


def test_runs_of_different_lengths_are_never_pooled_and_a_long_collapse_is_judged_on_its_own():
    k = 16384
    short = [_record("fashion_mnist", k, method, 0, k, 82.0, 82.0) for method in ("baseline", "koleo_proto")]
    long = [_record("fashion_mnist", k, "baseline", 0, int(0.2 * k), 84.0, 84.0),
            _record("fashion_mnist", k, "koleo_proto", 0, k, 84.0, 84.0)]  # fmt: skip
    for run in long:
        run["settings"] = {"max_steps": 31875}
        run["name"] += "-long"
    results = {"runs": [*short, *long], "pixels": {}}
    verdicts = {item["claim"]: item for item in claims(results)}
    collapse = verdicts["the baseline partially collapses"]
    assert collapse["verdict"] == "confirmed" and "31,875 steps: 20.0 % unique" in collapse["evidence"]
    assert verdicts["KoLeo-proto prevents it"]["verdict"] == "confirmed"
    markdown = render_markdown(results)
    assert "| 16,384 | baseline | 1 | 100 epochs |" in markdown
    assert "| 16,384 | baseline | 1 | 31,875 steps |" in markdown


def test_no_records_report_that_nothing_ran():
    results = load_results([])
    assert render_markdown(results, "the GPU study") == "No run of the GPU study has finished yet.\n"
    assert {item["verdict"] for item in claims(results)} == {"not measured"}
