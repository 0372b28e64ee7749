"""The recipe search (configs/experiments/cpu_recipe.yaml) end to end in quick mode: pretraining,
validation kNN, a kNN curve over every kept checkpoint, the test-split evaluation with the teacher's
clusters, and the report's table and figure from the records."""

import json
from pathlib import Path

from experiments.recipe_report import recipe_runs
from experiments.results import is_shipped_release
from experiments.runner import run_pending
from experiments.spec import load_spec
from experiments.store import Store

SPEC = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "cpu_recipe.yaml"


def test_quick_recipe_runs_curve_test_split_clusters_and_report(tmp_path, one_thread):
    from experiments.registry import report

    spec = load_spec(SPEC, quick=True)  # a checkpoint every step, all kept: a 3-point curve
    store = Store(tmp_path / "records")
    outcome = run_pending(spec, store, tmp_path / "work", fresh_process=False)
    assert sorted(outcome.finished) == sorted(run.name for run in spec.runs) and not outcome.failed
    record = json.loads((tmp_path / "records" / "fashion_mnist_val-reference-seed0.json").read_text())
    evaluation = record["result"]["evaluation"]
    assert [point["step"] for point in evaluation["curve"]] == [1, 2, 3]
    seconds = [point["seconds"] for point in evaluation["curve"]]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    assert 0 <= evaluation["curve"][-1]["knn_top1"] <= 100 and "linear_top1" not in evaluation  # kNN only on val
    test = evaluation["test"]
    assert {"knn_top1", "linear_top1", "shot5", "knn_per_class", "rarest_classes", "clusters"} <= set(test)
    clusters = test["clusters"]
    assert 1 <= clusters["clusters_used"] <= 64 and 0 <= clusters["nmi"] <= 1 and 0 < clusters["purity"] <= 1
    records, left_out = store.records(spec.runs)
    written = report(spec.report)(spec, records, left_out, tmp_path / "docs")
    table = written[0].read_text()
    for run in recipe_runs(records):
        assert f"| {run['candidate']} |" in table and f"| {run['knn_top1']:.1f} |" in table
    assert written[-1].suffix == ".png" and written[-1].stat().st_size > 5_000


def test_the_recipe_config_is_the_recipe_run_of_the_search(tmp_path):
    # configs/fashion_mnist_cpu.yaml must train what the search's last release trained (and scored),
    # except where it says so: the whole training split, its own output folder, no resume.
    import yaml

    from experiments.pretrain_eval import run_settings

    # the last release stage with an exported backbone is the shipped recipe (the claim scores it too)
    run = [run for run in load_spec(SPEC).runs if is_shipped_release(run.stage, run.params)][-1]
    searched = run_settings(run.params, tmp_path)
    shipped = yaml.safe_load((SPEC.parents[1] / "fashion_mnist_cpu.yaml").read_text())
    differences = {key for key in {*searched, *shipped} if searched.get(key) != shipped.get(key)}
    assert differences == {"data", "output_dir", "resume", "keep_last", "report_to", "proto_every", "seed"}
    assert (searched["data"], shipped["data"]) == ("fashion_mnist:fit", "fashion_mnist:train")
