from data_fixtures import write_parquet
from test_training import TINY_RUN

from hf_koleo.benchmarking import measure_data_pipeline, measure_koleo_proto


def test_koleo_benchmark_runs_at_tiny_size():
    result = measure_koleo_proto("blocked", num_prototypes=64, dim=8, repeats=2, threads=1)
    assert result["seconds_median"] > 0 and result["peak_extra_mib"] >= 0 and "error" not in result


def test_data_pipeline_benchmark_runs_at_tiny_size(tmp_path):
    data = write_parquet(tmp_path / "train.parquet", 24)
    result = measure_data_pipeline([*TINY_RUN, "--data", str(data)], n_batches=3)
    assert result["images_per_second"] > 0 and result["batch_size"] == 4
