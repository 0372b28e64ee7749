"""The benchmark suite (experiments/benchmarks.py, its report, the peer comparisons): each figure is
computed from the record's own timings."""

import statistics

import pytest
from conftest import ROOT, TINY_RUN, tiny_config

from experiments.benchmarks import KOLEO_IMPLEMENTATIONS, koleo_implementation, koleo_timing, measure_data_pipeline
from experiments.benchmarks_report import benchmark_sections, check_targets, load_results, write_report
from experiments.koleo_reference import dinov2_koleo_loss
from experiments.markdown import verdict_list
from experiments.peers import compare_feature_extraction, compare_training_steps
from experiments.runner import run_pending
from experiments.spec import load_spec
from experiments.store import Store
from hf_koleo import KoLeoDinoForPreTraining, koleo_proto_loss
from hf_koleo.backbone_export import export_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_koleo_implementations_are_ours_and_the_dinov2_reference():
    assert koleo_implementation("blocked") is koleo_proto_loss
    assert koleo_implementation("dense") is dinov2_koleo_loss
    with pytest.raises(ValueError, match="implementation must be one of"):
        koleo_implementation("cdist")


def test_koleo_measurement_reports_the_median_of_its_own_timings():
    result = koleo_timing({"implementation": "dense", "num_prototypes": 64, "dim": 8, "repeats": 3})
    assert len(result["seconds"]) == 3 and result["threads"] == 1
    assert result["seconds_median"] == statistics.median(result["seconds"])
    assert result["seconds_first"] == result["seconds"][0] and result["peak_extra_mib"] >= 0


def test_dense_koleo_is_not_attempted_when_its_similarity_matrix_cannot_fit():
    with pytest.raises(MemoryError, match="not run: needs about 3725 GiB for the K x K similarity matrix"):
        koleo_timing({"implementation": "dense", "num_prototypes": 10**6, "dim": 8})


def test_data_pipeline_rate_is_its_images_over_its_seconds(data_path):
    result = measure_data_pipeline([*TINY_RUN, "--data", str(data_path)], n_batches=3)
    assert result["batch_size"] == 4 and result["images"] == 3 * 4
    assert result["images_per_second"] == pytest.approx(result["images"] / result["seconds"])


def test_step_comparison_speedup_is_the_median_of_its_per_round_ratios():
    config = tiny_config(ibot_loss_weight=0.0, koleo_proto_weight=0.0, num_prototypes=32)
    result = compare_training_steps(config, batch=2, global_size=16, local_size=8, n_local=2, rounds=3, warmup=1)
    ours, lightly = result["seconds"]["ours"], result["seconds"]["lightly"]
    assert len(ours) == len(lightly) == 3 and result["K"] == 32
    assert result["speedup_median"] == statistics.median(peer / own for own, peer in zip(ours, lightly))
    assert result["ours_images_per_second"] == pytest.approx(2 / statistics.median(ours))
    assert result["lightly_images_per_second"] == pytest.approx(2 / statistics.median(lightly))


def test_feature_extraction_ratio_is_stock_time_over_exported_time(tmp_path):
    export_backbone(KoLeoDinoForPreTraining(tiny_config()), tmp_path, image_size=16)
    result = compare_feature_extraction(str(tmp_path), batch=2, rounds=3)
    exported, stock = result["seconds"]["exported"], result["seconds"]["stock"]
    assert result["image_size"] == 16 and len(exported) == len(stock) == 3
    assert result["ratio"] == pytest.approx(statistics.median(stock) / statistics.median(exported))


def synthetic_results(blocked_seconds=0.2, dense_seconds=0.4, blocked_mib=300.0, speedup=1.5, data_rate=90.0):
    """Suite results with chosen numbers (step at 30 img/s), as :func:`load_results` returns them."""

    def koleo(implementation, size, seconds, mib):
        return {
            "implementation": implementation,
            "num_prototypes": size,
            "seconds_median": seconds,
            "peak_extra_mib": mib,
        }

    return {
        "machine": "test machine",
        "koleo": [
            koleo("blocked", 8192, blocked_seconds, blocked_mib),
            koleo("dense", 8192, dense_seconds, 280.0),
            koleo("blocked", 65536, 9.0, blocked_mib),
            {"implementation": "dense", "num_prototypes": 65536, "error": "not run: needs about 16 GiB"},
        ],
        "dino_ibot": [{"num_prototypes": 8192, "batch": 16, "seconds_median": 0.05, "peak_extra_mib": 12.0}],
        "step": [
            {
                "K": 1024,
                "batch": 64,
                "ours_images_per_second": 30.0,
                "lightly_images_per_second": 30.0 / speedup,
                "speedup_median": speedup,
            }
        ],
        "data": {"images_per_second": data_rate, "num_workers": 1, "batch_size": 64},
        "features": {"exported_images_per_second": 100.0, "stock_images_per_second": 101.0, "ratio": 1.01},
    }


def test_markdown_shows_the_ratios_computed_from_the_results():
    lines = [line for section in benchmark_sections(synthetic_results()).values() for line in section]
    markdown = "\n".join(lines)
    assert "| 8192 | 0.200 | 300 | 0.400 | 280 | 0.50 |" in lines  # time ours ÷ DINOv2 = 0.2 / 0.4
    assert "| 65536 | 9.000 | 300 | not run: needs about 16 GiB | not run: needs about 16 GiB | - |" in lines
    assert "| 1024 | 64 | 30.0 | 20.0 | 1.50× |" in lines
    assert "| 90 (workers 1, batch 64) | 30.0 (K = 1024) | 3.0× |" in lines
    assert "| 100.0 | 101.0 | 1.01× |" in lines and KOLEO_IMPLEMENTATIONS["dense"] in markdown


def test_targets_are_met_or_not_by_the_measured_numbers():
    met = verdict_list(check_targets(synthetic_results()))
    assert len(met) == 5 and all(line.endswith(": met.") for line in met), met
    missed = verdict_list(
        check_targets(
            synthetic_results(blocked_seconds=0.5, dense_seconds=0.4, blocked_mib=2048.0, speedup=1.1, data_rate=45.0)
        )
    )
    assert [line.endswith("NOT met.") for line in missed] == [True, True, True, True, False], missed
    assert "2048 MiB" in missed[0] and "1.10x" in missed[2] and "1.5x" in missed[3]


def test_the_quick_suite_runs_every_stage_and_its_report_fills_the_docs_regions(tmp_path):
    spec = load_spec(ROOT / "configs" / "experiments" / "benchmarks.yaml", quick=True)
    store = Store(tmp_path / "records")
    outcome = run_pending(spec, store, tmp_path / "work", fresh_process=False)  # in-process: no start-up cost
    assert outcome.finished == [run.name for run in spec.runs] and not outcome.failed
    records, _ = store.records(spec.runs)
    results = load_results(records)
    assert [(row["num_prototypes"], row["implementation"]) for row in results["koleo"]] == [
        (16, "blocked"),
        (16, "dense"),
        (32, "blocked"),
        (32, "dense"),
    ]
    assert [(row["num_prototypes"], row["batch"]) for row in results["dino_ibot"]] == [(16, 2), (16, 3)]
    assert [(row["K"], row["batch"], row["n_local"]) for row in results["step"]] == [(16, 2, 2), (24, 2, 2)]
    assert results["data"]["batch_size"] == 4 and results["features"]["image_size"] == 8
    (curve,) = results["unique_curve"]  # 64 prototypes in 8 groups: merged, fewer at the larger eps
    assert (curve["num_prototypes"], curve["groups"]) == (64, 8) and curve["seconds"] > 0
    assert 64 >= curve["unique"]["0.01"] >= curve["unique"]["0.1"] and curve["unique"]["0.1"] <= 8
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Mine\n\nread this\n\n<!-- generated: step -->\nold table\n<!-- end generated: step -->\nafter\n")
    write_report(spec, records, {}, doc.parent)
    text = doc.read_text()
    assert text.startswith("# Mine\n\nread this\n\n<!-- generated: step -->\n| K | batch |") and "old table" not in text
    assert "<!-- end generated: step -->\nafter\n" in text  # the hand-written text around a region stays
    assert "## Targets" in text and "| 24 | 2 |" in text  # regions the doc lacked are appended with a title
    assert "| K | groups | s | unique@0.01 |" in text
