"""The KoLeo-proto study (experiments/study.py): its tables hold the numbers its runs wrote."""

import json
import os
import statistics
from pathlib import Path

import pytest

from experiments.study import (
    METRIC_ROWS,
    VARIANTS,
    load_study_config,
    render_study_markdown,
    run_arguments,
    run_study,
)
from hf_koleo.data.fashion_mnist import RAW_DIR

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "study_koleo_proto.yaml"
TINY_MODEL = {
    "backbone_config": {
        "model_type": "dinov2",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "mlp_ratio": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "num_prototypes": 64,
    "head_hidden_size": 32,
    "head_bottleneck_size": 16,
}


def test_quick_mode_overrides_keys_inside_each_section():
    full, quick = load_study_config(CONFIG), load_study_config(CONFIG, quick=True)
    assert "quick" not in quick and quick["run"]["max_steps"] == 4 and quick["evaluation"]["limit_train"] == 400
    assert quick["run"]["base_lr"] == full["run"]["base_lr"] and quick["model"] == full["model"]
    assert quick["sweep"]["weights"] == [0.1, 0.3] and quick["datasets"]["fashion_mnist"]["train"] == "demo"


def test_a_run_takes_the_shared_sections_and_its_own_data_seed_steps_and_weight(tmp_path):
    config = load_study_config(CONFIG, quick=True)
    model_before = json.dumps(config["model"], sort_keys=True)
    arguments, model_config = run_arguments(config, "fashion_mnist_lt", tmp_path / "run", 0.3, seed=5, max_steps=7)
    assert (arguments.data, arguments.seed, arguments.max_steps) == ("fashion_mnist:test_lt100", 5, 7)
    assert arguments.output_dir == str(tmp_path / "run") and arguments.report_to == "none"
    assert list(arguments.global_crops_scale) == config["run"]["global_crops_scale"]
    assert model_config.koleo_proto_weight == 0.3 and model_config.num_prototypes == config["model"]["num_prototypes"]
    assert json.dumps(config["model"], sort_keys=True) == model_before  # the shared section is not changed
    config["run"]["learning_rate"] = 0.1
    with pytest.raises(ValueError, match="learning_rate"):
        run_arguments(config, "fashion_mnist", tmp_path / "run", 0.0, seed=0, max_steps=1)


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


def read_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """A run's final prototype report, its metrics history and its last checkpoint's model config."""
    report = json.loads((run_dir / "prototype_report.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    return report, history, json.loads((checkpoint / "config.json").read_text())


def dataset_section(markdown: list[str], dataset: str) -> list[str]:
    """The lines of the ``### dataset`` section of results.md."""
    start = markdown.index(f"### {dataset}") + 1
    ends = [index for index in range(start, len(markdown)) if markdown[index].startswith("### ")]
    return markdown[start : ends[0] if ends else len(markdown)]


@pytest.mark.skipif(not RAW_DIR.exists() and not os.environ.get("CI"), reason="dataset-fashion-mnist not installed")
def test_the_quick_study_tables_hold_the_numbers_its_runs_wrote(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "cache"))
    config = load_study_config(CONFIG, quick=True)
    config["model"] = {**config["model"], **TINY_MODEL}  # the quick pipeline in seconds
    output = tmp_path / "study"
    run_study(config, output)
    results = json.loads((output / "results.json").read_text())
    markdown = (output / "results.md").read_text().splitlines()

    sweep = {}
    for weight in config["sweep"]["weights"]:
        report, _, model = read_run(output / "sweep" / f"w{weight:g}")
        validation = results["sweep"][f"{weight:g}"]["validation_knn_balanced"]
        sweep[weight] = (validation, report["teacher/cls"]["unique_prototypes"])
        assert model["koleo_proto_weight"] == weight
        assert f"| {weight:g} | {validation:.1f} | {sweep[weight][1]} |" in markdown
    assert results["chosen_weight"] == max(sweep, key=sweep.get)

    for dataset in config["datasets"]:
        runs = {variant: read_run(output / dataset / variant / "seed0") for variant in VARIANTS}
        assert runs["baseline"][2]["koleo_proto_weight"] == 0.0
        assert runs["koleo_proto"][2]["koleo_proto_weight"] == results["chosen_weight"]
        section = dataset_section(markdown, dataset)
        reports = [runs[variant][0]["teacher/cls"] for variant in VARIANTS]
        unique = " | ".join(str(report["unique_prototypes"]) for report in reports)
        assert f"| unique prototypes (teacher, eps 0.025) | {unique} | - |" in section
        nn_medians = " | ".join(f"{report['nn_distance_quantiles']['q0.5']:.3f}" for report in reports)
        entropies = " | ".join(f"{report['marginal_entropy']:.3f}" for report in reports)
        assert f"| median NN distance (teacher) | {nn_medians} | - |" in section
        assert f"| marginal latent class entropy (nats) | {entropies} | - |" in section
        for variant in VARIANTS:
            _, history, _ = runs[variant]
            key = "prototypes/teacher_cls/unique@0.025"
            curve = [[row["step"], row[key]] for row in history if key in row]
            assert len(curve) == 2 and results["runs"][dataset][variant][0]["curves"][key] == curve
        knn = [results["runs"][dataset][variant][0]["knn_balanced"] for variant in VARIANTS]
        pixels = results["pixels"][dataset]["knn_balanced"]
        assert f"| kNN balanced accuracy | {knn[0]:.1f} | {knn[1]:.1f} | {pixels:.1f} |" in section
        assert (output / f"unique_prototypes_{dataset}.png").stat().st_size > 0
