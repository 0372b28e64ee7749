from data_fixtures import write_parquet
from test_training import ROOT, TINY_RUN

from experiments.benchmarks import (
    KOLEO_IMPLEMENTATIONS,
    koleo_implementation,
    measure_data_pipeline,
    measure_koleo_proto,
    render_benchmarks_markdown,
    run_benchmark_suite,
)
from experiments.koleo_reference import dinov2_koleo_loss


def test_koleo_benchmark_runs_at_tiny_size():
    result = measure_koleo_proto("blocked", num_prototypes=64, dim=8, repeats=2, threads=1)
    assert result["seconds_median"] > 0 and result["peak_extra_mib"] >= 0 and "error" not in result


def test_koleo_benchmark_times_the_dinov2_algorithm_from_experiments():
    assert koleo_implementation("dense") is dinov2_koleo_loss
    result = measure_koleo_proto("dense", num_prototypes=64, dim=8, repeats=2, threads=1)
    assert "error" not in result and result["seconds_median"] > 0


def test_dense_koleo_is_not_attempted_when_it_cannot_fit():
    assert "not run" in measure_koleo_proto("dense", num_prototypes=10**6, dim=8)["error"]


def test_data_pipeline_benchmark_runs_at_tiny_size(tmp_path):
    data = write_parquet(tmp_path / "train.parquet", 24)
    result = measure_data_pipeline([*TINY_RUN, "--data", str(data)], n_batches=3)
    assert result["images_per_second"] > 0 and result["batch_size"] == 4


def test_whole_suite_runs_at_tiny_sizes_and_renders_markdown():
    results = run_benchmark_suite(
        koleo_sizes=(32,),
        loss_sizes=(32,),
        loss_batches=(2,),
        step_sizes=(32,),
        step_batch=2,
        data_config=str(ROOT / "configs" / "demo.yaml"),
        rounds=1,
        dim=8,
    )
    markdown = render_benchmarks_markdown(results, "python scripts/benchmark.py all")
    assert "| 32 |" in markdown and "lightly" in markdown and results["step"][0]["speedup_median"] > 0
    koleo = {row["implementation"]: row["seconds_median"] for row in results["koleo"]}
    assert KOLEO_IMPLEMENTATIONS["dense"] in markdown and f"| {koleo['blocked'] / koleo['dense']:.2f} |" in markdown
