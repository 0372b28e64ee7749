"""The CPU study (configs/experiments/cpu_study.yaml, experiments/study.py): its tables hold the numbers
its runs wrote."""

import json
import os
import statistics
from pathlib import Path

import pytest

from experiments.pretrain_eval import run_settings
from experiments.runner import run_pending
from experiments.spec import load_spec
from experiments.store import Store
from experiments.study import METRIC_ROWS, VARIANTS, load_results, render_study_markdown, write_report
from hf_koleo.data.fashion_mnist import RAW_DIR
from hf_koleo.training.arguments import arguments_from_settings

SPEC = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "cpu_study.yaml"


def test_the_sweep_runs_first_and_every_run_takes_the_shared_config_and_its_own_data_seed_and_weight(tmp_path):
    spec, quick = load_spec(SPEC), load_spec(SPEC, quick=True)
    assert [run.stage for run in spec.runs] == ["sweep"] * 3 + ["pixels"] * 2 + ["main"] * 4
    for run in spec.runs:
        if run.kind != "pretrain_eval":
            continue
        arguments, model = arguments_from_settings(run_settings(run.params, tmp_path / run.name), source=run.name)
        assert arguments.data == run.params["dataset"]["train"] and arguments.data.startswith("fashion_mnist:train")
        assert list(arguments.global_crops_scale) == [0.4, 1.0] and model.num_prototypes == 4096
        if run.stage == "sweep":
            assert arguments.max_steps == 120 and run.params["evaluation"]["protocol"] == "validation"
            assert model.koleo_proto_weight == run.axes["weight"]
        else:
            assert arguments.max_steps == 400 and "protocol" not in run.params["evaluation"]
            assert model.koleo_proto_weight == (0.05 if run.axes["variant"] == "koleo_proto" else 0.0)
    quick_main = quick.run("fashion_mnist_lt-koleo_proto-seed0")
    assert quick_main.params["pretrain"]["max_steps"] == 4 and quick_main.params["dataset"]["test"] == "demo:test"
    assert quick_main.params["pretrain"]["base_lr"] == 0.002  # the quick overlay changes only what it names


def test_the_table_shows_the_mean_and_spread_over_seeds():
    def record(knn, unique):
        return {
            **{key: 0.0 for key, _, _ in METRIC_ROWS},
            "knn_top1": knn,
            "teacher_unique": unique,
            "wall_seconds": None,
        }

    results = {
        "chosen_weight": 0.2,
        "used_weight": 0.2,
        "sweep": {"0.2": {"validation_knn_balanced": 41.25, "teacher_unique": 60}},
        "runs": {"lt": {"baseline": [record(50.0, 10), record(52.0, 14)], "koleo_proto": [record(55.0, 64)]}},
        "pixels": {"lt": {"knn_top1": 61.0}},
        "wall_seconds": 90.0,
    }
    lines = render_study_markdown(results).splitlines()
    spread = statistics.stdev([50.0, 52.0])
    assert f"| kNN top-1 (k=20) | 51.0 ± {spread:.1f} | 55.0 | 61.0 |" in lines
    assert f"| unique prototypes (teacher, eps 0.025) | 12 ± {statistics.stdev([10, 14]):.0f} | 64 | - |" in lines
    assert "| 0.2 | 41.2 | 60 |" in lines and "Study wall time: 1.5 min." in lines
    results["used_weight"] = 0.1  # the spec not yet set to the sweep's choice: said so
    assert "the KoLeo-proto runs use **0.1** (the spec's" in render_study_markdown(results)


def dataset_section(markdown: list[str], dataset: str) -> list[str]:
    """The lines of the ``### dataset`` section of cpu_study.md."""
    start = markdown.index(f"### {dataset}") + 1
    ends = [index for index in range(start, len(markdown)) if markdown[index].startswith("### ")]
    return markdown[start : ends[0] if ends else len(markdown)]


@pytest.mark.skipif(not RAW_DIR.exists() and not os.environ.get("CI"), reason="dataset-fashion-mnist not installed")
def test_the_quick_study_tables_hold_the_numbers_its_runs_wrote(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "cache"))
    spec = load_spec(SPEC, quick=True)
    store = Store(tmp_path / "records")
    outcome = run_pending(spec, store, tmp_path / "work")
    assert outcome.finished == [run.name for run in spec.runs] and not outcome.failed
    records, _ = store.records(spec.runs)
    written = write_report(spec, records, {}, tmp_path / "docs")
    markdown = (tmp_path / "docs" / "cpu_study.md").read_text().splitlines()
    results = load_results(records, spec)

    sweep = {}
    for weight in (0.1, 0.3):
        record = store.read(f"sweep-w{weight}")
        validation = record["result"]["evaluation"]["validation_knn_balanced"]
        sweep[weight] = (validation, record["result"]["final_prototypes"]["teacher/cls"]["unique_prototypes"])
        assert record["result"]["settings"]["model"]["koleo_proto_weight"] == weight
        assert f"| {weight:g} | {validation:.1f} | {sweep[weight][1]} |" in markdown
    assert results["chosen_weight"] == max(sweep, key=sweep.get) and results["used_weight"] == 0.1

    for dataset in ("fashion_mnist", "fashion_mnist_lt"):
        runs = {variant: store.read(f"{dataset}-{variant}-seed0")["result"] for variant in VARIANTS}
        assert runs["baseline"]["settings"]["model"]["koleo_proto_weight"] == 0.0
        assert runs["koleo_proto"]["settings"]["model"]["koleo_proto_weight"] == 0.1
        # the run folder's own files agree with the record
        report = json.loads((tmp_path / "work" / f"{dataset}-baseline-seed0" / "prototype_report.json").read_text())
        assert (
            report["teacher/cls"]["unique_curve"] == runs["baseline"]["final_prototypes"]["teacher/cls"]["unique_curve"]
        )
        section = dataset_section(markdown, dataset)
        teachers = [runs[variant]["final_prototypes"]["teacher/cls"] for variant in VARIANTS]
        unique = " | ".join(str(teacher["unique_prototypes"]) for teacher in teachers)
        assert f"| unique prototypes (teacher, eps 0.025) | {unique} | - |" in section
        nn_medians = " | ".join(f"{teacher['nn_distance_quantiles']['q0.5']:.3f}" for teacher in teachers)
        entropies = " | ".join(f"{teacher['marginal_entropy']:.3f}" for teacher in teachers)
        assert f"| median NN distance (teacher) | {nn_medians} | - |" in section
        assert f"| marginal latent class entropy (nats) | {entropies} | - |" in section
        key = "prototypes/teacher_cls/unique@0.025"
        for variant in VARIANTS:
            curve = [[row["step"], row[key]] for row in runs[variant]["prototype_history"] if key in row]
            assert len(curve) == 2 and results["runs"][dataset][variant][0]["curves"][key] == curve
        knn = [runs[variant]["evaluation"]["knn_balanced"] for variant in VARIANTS]
        pixels = store.read(f"pixels-{dataset}")["result"]["evaluation"]["knn_balanced"]
        assert f"| kNN balanced accuracy | {knn[0]:.1f} | {knn[1]:.1f} | {pixels:.1f} |" in section
    assert len([path for path in written if path.suffix == ".png"]) == 2
