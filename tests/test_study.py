"""The CPU study (configs/experiments/cpu_study.yaml) through the pretraining-study report
(experiments/study_report.py): the weight chosen on a validation split, tables that hold the numbers
its runs wrote."""

import json
import os
from pathlib import Path

import pytest

from experiments.pretrain_eval import run_settings
from experiments.runner import run_pending
from experiments.spec import load_spec
from experiments.store import Store
from experiments.study_report import load_results, recipe_rows, write_report
from hf_koleo.data.fashion_mnist import RAW_DIR
from hf_koleo.training.arguments import arguments_from_settings

SPEC = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "cpu_study.yaml"


def test_every_run_takes_the_cpu_recipe_and_its_own_data_k_method_and_seed(tmp_path):
    spec = load_spec(SPEC)
    stages = ["pixels"] * 2 + ["main"] * 8 + ["seeds"] * 2 + ["long"] * 4 + ["long_lt"] * 2
    assert [run.stage for run in spec.runs] == stages
    assert spec.settings["targets"]["knn"] == 84.6  # the bar, not the GPU study's
    for run in spec.runs:
        if run.kind != "pretrain_eval":
            continue
        arguments, model = arguments_from_settings(run_settings(run.params, tmp_path / run.name), source=run.name)
        assert arguments.data == run.params["dataset"]["train"] and arguments.data.startswith("fashion_mnist:train")
        # the recipe (configs/fashion_mnist_cpu.yaml), the same number of images for every run
        assert arguments.per_device_batch_size == 64 and arguments.local_crops_number == 0
        assert arguments.teacher_momentum == 0.99  # 10 epochs of images; the long stage the recipe's 34
        assert arguments.max_steps == (31875 if run.stage.startswith("long") else 9375)
        assert model.num_prototypes == run.axes["num_prototypes"] and model.koleo_proto_search == "candidates"
        assert model.koleo_proto_weight == (0.1 if run.axes["method"] == "koleo_proto" else 0.0)
    seeds = [run.name for run in spec.runs if run.stage == "seeds"]
    assert seeds == ["fashion_mnist_lt-K16384-baseline-seed1", "fashion_mnist_lt-K16384-koleo_proto-seed1"]
    long = [run.name for run in spec.runs if run.stage == "long"]
    assert long[2:] == ["fashion_mnist-K16384-baseline-seed1-long", "fashion_mnist-K16384-koleo_proto-seed1-long"]
    quick_main = load_spec(SPEC, quick=True).run("fashion_mnist_lt-K64-koleo_proto-seed0")
    assert quick_main.params["pretrain"]["max_steps"] == 4 and quick_main.params["dataset"]["test"] == "demo:test"
    assert quick_main.params["pretrain"]["teacher_momentum"] == 0.99  # the quick overlay changes only what it names


@pytest.mark.skipif(not RAW_DIR.exists() and not os.environ.get("CI"), reason="dataset-fashion-mnist not installed")
def test_the_quick_study_tables_hold_the_numbers_its_runs_wrote(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "cache"))
    spec = load_spec(SPEC, quick=True)
    store = Store(tmp_path / "records")
    outcome = run_pending(spec, store, tmp_path / "work")
    assert outcome.finished == [run.name for run in spec.runs] and not outcome.failed
    records, _ = store.records(spec.runs)
    written = write_report(spec, records, {}, tmp_path / "docs")
    markdown = (tmp_path / "docs" / "results_cpu.md").read_text().splitlines()
    results = load_results(records, {}, spec)

    assert not recipe_rows(results)  # the recipe is chosen by its own search (cpu_recipe.yaml)
    for name in ("fashion_mnist-K64-koleo_proto-seed0", "fashion_mnist_lt-K64-baseline-seed0"):
        assert "clusters" in store.read(name)["result"]["evaluation"]  # the teacher's arg-max as clusters

    for dataset in ("fashion_mnist", "fashion_mnist_lt"):
        start = markdown.index(f"### {dataset}") + 1
        end = next((i for i in range(start, len(markdown)) if markdown[i].startswith("### ")), len(markdown))
        rows = {line.split(" | ")[1]: line for line in markdown[start:end] if line.startswith("| ")}
        for method in ("baseline", "koleo_proto"):
            result = store.read(f"{dataset}-K64-{method}-seed0")["result"]
            teacher = result["final_prototypes"]["teacher/cls"]
            # the run folder's own report agrees with the record
            report = json.loads(
                (tmp_path / "work" / f"{dataset}-K64-{method}-seed0" / "prototype_report.json").read_text()
            )
            assert report["teacher/cls"]["unique_curve"] == teacher["unique_curve"]
            assert isinstance(result["collapse_alarms"], list)  # the trainer's alarms (in the run summary)
            row = rows[method]
            assert row.startswith(f"| 64 | {method} | 1 | 4 steps | {teacher['unique_curve']['0.01']:,} |")
            assert f"| {teacher['utilisation']['used']:,} | {teacher['nn_distance_quantiles']['q0.5']:.3f} |" in row
            assert f"| {result['evaluation']['knn_balanced']:.1f} |" in row
        pixels = store.read(f"pixels-{dataset}")["result"]["evaluation"]
        assert f"| {pixels['knn_top1']:.1f} | {pixels['knn_balanced']:.1f} |" in rows["raw pixels"]
    assert "features beat raw pixels" in "\n".join(markdown)  # one verdict per claim, measured or not
    start = markdown.index("### fashion_mnist_lt: the teacher's arg-max on the test images as clusters") + 2
    table = [markdown[start], *markdown[start + 2 : start + 4]]  # header, the two methods: as many cells
    assert len({line.count(" | ") for line in table}) == 1 and table[1].startswith("| 64 | baseline | 1 |")
    clusters = store.read("fashion_mnist_lt-K64-baseline-seed0")["result"]["evaluation"]["clusters"]
    assert f"| {clusters['clusters_used']:,} | {clusters['nmi']:.3f} |" in table[1]
    assert [path.name for path in written[:2]] == ["results_cpu.md", "results_cpu.json"]
    assert len([path for path in written if path.suffix == ".png"]) == 3
