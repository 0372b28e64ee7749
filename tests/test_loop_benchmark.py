import statistics

import pytest
import torch

from experiments.loop_benchmark import render_loop_suite_markdown, run_loop_suite


@pytest.fixture(scope="module")
def quick_results():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny work: one thread is faster, and far faster on a shared machine
    snapshots = []

    def progress(results):  # what a cut-short run would have written, after each measurement
        snapshots.append((sorted(results), render_loop_suite_markdown(results, "partial")))

    try:
        results = run_loop_suite(quick=True, steps=2, koleo_prototypes=128, progress=progress)
        yield {**results, "snapshots": snapshots}
    finally:
        torch.set_num_threads(threads)


def test_quick_suite_measures_data_step_and_end_to_end_at_each_batch(quick_results):
    (loop,) = quick_results["loops"].values()
    small, large = loop["rows"]
    assert (small["batch_size"], large["batch_size"]) == (4, 16) and small["resident"]
    for row in (small, large):
        assert row["data_images_per_second"] > 0 and row["step_ms"] > 0
        # the ratios come from the row's own timings
        assert row["data_over_step"] == pytest.approx(row["data_images_per_second"] / row["step_images_per_second"])
        assert row["end_to_end_over_step"] == pytest.approx(
            row["end_to_end_images_per_second"] / row["step_images_per_second"]
        )
        assert row["host_syncs"] == []  # the CPU recorder saw no host read in data + step
    assert large["step_time_ratio_to_previous"] == pytest.approx(large["step_ms"] / small["step_ms"])
    assert quick_results["koleo_proto"]["num_prototypes"] == 128 and quick_results["koleo_proto"]["ms"] > 0
    overhead = quick_results["overhead"]  # the same ops, no work: hundreds of ops, each a launch on a GPU
    assert overhead["step_ops"] > 500 and overhead["data_ops"] > 100 and overhead["step_ms"] > 0
    peer = quick_results["peer"]
    assert peer["batch"] == 4 and peer["device"] == "cpu" and len(peer["seconds"]["lightly"]) == 5
    assert peer["ours_images_per_second"] == pytest.approx(4 / statistics.median(peer["seconds"]["ours"]))


def test_quick_suite_renders_one_table_row_per_batch(quick_results):
    markdown = render_loop_suite_markdown(quick_results, "python scripts/benchmark_loop.py --quick")
    rows = [line for line in markdown.splitlines() if line.startswith("| 4 |") or line.startswith("| 16 |")]
    assert len(rows) == 2 and "none" in rows[0] and "KoLeo-proto" in markdown and "lightly-based peer" in markdown


def test_quick_suite_reports_after_each_measurement(quick_results):
    keys = [keys for keys, _ in quick_results["snapshots"]]
    assert keys == [
        ["device", "loops"],
        ["device", "loops", "overhead"],
        ["device", "koleo_proto", "loops", "overhead"],
        ["device", "koleo_proto", "loops", "overhead", "peer"],
    ]
    first_markdown = quick_results["snapshots"][0][1]
    assert "| 4 |" in first_markdown and "KoLeo-proto" not in first_markdown


def test_a_failing_measurement_is_reported_and_the_rest_still_run(monkeypatch, one_thread):
    import experiments.loop_benchmark as loop_benchmark

    broken = ("broken", ["--config", "configs/demo.yaml", "--model.num_prototypes", "1"], [4])
    monkeypatch.setattr(loop_benchmark, "QUICK_SUITE", (broken,))
    monkeypatch.setattr(loop_benchmark, "measure_peer_step", lambda *args: {})
    results = run_loop_suite(quick=True, steps=1, koleo_prototypes=64)
    (row,) = results["loops"]["broken"]["rows"]  # each batch size is recorded on its own
    assert "num_prototypes" in row["error"] and row["batch_size"] == 4
    assert results["koleo_proto"]["num_prototypes"] == 64  # measured after the failure
    assert "| 4 | failed: ValueError" in render_loop_suite_markdown(results, "x")


def test_every_gpu_suite_entry_parses_as_a_pretraining_run():
    from experiments.loop_benchmark import GPU_EXTRA, GPU_SUITE
    from hf_koleo.training.arguments import parse_pretraining_args

    for _, argv, batch_sizes in (*GPU_SUITE, *GPU_EXTRA):
        arguments, _ = parse_pretraining_args([*argv, "--report_to", "none", "--max_steps", "1000"])
        # one precision for the whole suite: accelerate's AcceleratorState is per process and refuses a change
        assert arguments.mixed_precision == "bf16" and batch_sizes == sorted(batch_sizes)


def test_the_suite_splits_into_core_and_extra_for_two_device_calls():
    with pytest.raises(ValueError, match="part must be one of"):
        run_loop_suite(quick=True, part="targets")
    extra = run_loop_suite(quick=True, steps=1, koleo_prototypes=64, part="extra")
    assert extra["loops"] == {} and "koleo_proto" not in extra and "peer" not in extra  # the quick suite has no extra
