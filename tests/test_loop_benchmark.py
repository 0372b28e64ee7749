"""The training-loop benchmark (experiments/loop_benchmark.py, its report, configs/experiments/loop_benchmark.yaml)."""

import statistics
import warnings

import pytest
import torch
from conftest import ROOT

from experiments.loop_benchmark import MATMUL_DTYPES, matmul_gflops, sync_warnings
from experiments.loop_benchmark_report import load_results, render_loop_suite_markdown, write_report
from experiments.registry import run_kind
from experiments.runner import run_pending
from experiments.spec import load_spec
from experiments.store import Store

SPEC = ROOT / "configs" / "experiments" / "loop_benchmark.yaml"


@pytest.fixture(scope="module")
def quick_records(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny work: one thread is faster, and far faster on a shared machine
    folder = tmp_path_factory.mktemp("loop")
    try:
        spec = load_spec(SPEC, quick=True)
        store = Store(folder / "records")
        outcome = run_pending(spec, store, folder / "work")
        assert outcome.finished == [run.name for run in spec.runs] and not outcome.failed
        yield spec, store.records(spec.runs)[0], folder
    finally:
        torch.set_num_threads(threads)


def test_quick_suite_measures_data_step_and_end_to_end_at_each_batch(quick_records):
    _, records, _ = quick_records
    results = load_results(records)
    (loop,) = results["loops"].values()
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
        assert row["machine_matmul_dtype"] == "float32"  # the yardstick in the step's precision (no autocast)
    assert large["step_time_ratio_to_previous"] == pytest.approx(large["step_ms"] / small["step_ms"])
    assert results["koleo_proto"]["num_prototypes"] == 128 and results["koleo_proto"]["ms"] > 0
    overhead = results["overhead"]  # the same ops, no work: hundreds of ops, each a launch on a GPU
    assert overhead["step_ops"] > 500 and overhead["data_ops"] > 100 and overhead["step_ms"] > 0
    peer = results["peer"]
    assert peer["batch"] == 4 and peer["device"] == "cpu" and len(peer["seconds"]["lightly"]) == 5
    assert peer["ours_images_per_second"] == pytest.approx(4 / statistics.median(peer["seconds"]["ours"]))


def test_quick_suite_report_has_one_table_row_per_batch(quick_records):
    spec, records, folder = quick_records
    (path,) = write_report(spec, records, {}, folder / "docs")
    markdown = path.read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| 4 |") or line.startswith("| 16 |")]
    assert len(rows) == 2 and "none" in rows[0] and "KoLeo-proto" in markdown and "lightly-based peer" in markdown
    assert "### demo, tiny (CPU)" in markdown


def test_a_failing_batch_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch, one_thread):
    spec = load_spec(SPEC, quick=True)
    broken = ["--config", "configs/demo.yaml", "--model.num_prototypes", "1"]
    spec.runs = [
        run.__class__(**{**run.__dict__, "params": {**run.params, "argv": broken}}) if run.stage == "core" else run
        for run in spec.runs
        if run.stage in ("core", "koleo")
    ]
    store = Store(tmp_path / "records")
    outcome = run_pending(spec, store, tmp_path / "work")
    assert outcome.failed == ["demo_tiny-batch4", "demo_tiny-batch16"] and outcome.finished == ["koleo-K128"]
    records, _ = store.records(spec.runs)
    results = load_results(records)
    (row, _) = results["loops"]["demo, tiny"]["rows"]  # each batch size is recorded on its own
    assert "num_prototypes" in row["error"] and row["batch_size"] == 4
    assert results["koleo_proto"]["num_prototypes"] == 128  # measured after the failures
    assert "| 4 | failed: ValueError" in render_loop_suite_markdown(results, "x")


def test_every_gpu_suite_entry_parses_as_a_pretraining_run_at_one_precision():
    from hf_koleo.training.arguments import parse_pretraining_args

    spec = load_spec(SPEC)
    for run in spec.runs:
        assert callable(run_kind(run.kind))
        if run.kind == "loop_batch":
            arguments, _ = parse_pretraining_args([*run.params["argv"], "--report_to", "none"])
            # one precision for the whole suite: accelerate's AcceleratorState is per process and refuses a change
            assert arguments.mixed_precision == "bf16"
    stages = [run.stage for run in spec.runs]
    assert stages.index("extra") > stages.index("peer")  # the targets come first in a budgeted call


def test_the_cpu_speed_suite_compares_the_searches_side_by_side_and_measures_the_neighbour_churn(tmp_path, one_thread):
    spec = load_spec(ROOT / "configs" / "experiments" / "cpu_speed.yaml", quick=True)
    store = Store(tmp_path / "records")
    outcome = run_pending(spec, store, tmp_path / "work")
    assert outcome.finished == [run.name for run in spec.runs] and not outcome.failed
    records, _ = store.records(spec.runs)
    results = load_results(records)
    assert len(results["loops"]) == 3  # no KoLeo-proto, exact search, candidate lists
    churn = results["churn"]["churn"]
    assert churn["step"] == 6 and 0.0 <= churn["same_nn@1"] <= churn["in_top2@1"] <= churn["in_top4@1"] <= 1.0
    searches = {(row["period"], row["setting"]): row for row in results["candidate_search"]}
    plain, tighter, updated = "movers 0, repair 0", "movers 4, repair 8", "movers 0, repair 0, update every 2"
    assert set(searches) == {(period, setting) for period in (2, 3) for setting in (plain, tighter, updated)}
    assert searches[3, updated]["update_ms"] > 0 and "update_ms" not in searches[2, updated]  # full every 2: no update
    for row in searches.values():  # certified choices are exact: the exact fraction is at least the certified one
        assert 0.0 <= row["certified_mean"] <= row["exact_mean"] + 1e-9 <= 1.0 + 1e-9 and row["choose_ms"] > 0
    for period in (2, 3):  # movers and repair only add certified rows
        assert searches[period, tighter]["certified_mean"] >= searches[period, plain]["certified_mean"]
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\nhand-written\n")
    write_report(spec, records, {}, doc.parent)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written\n") and "<!-- generated: cpu_speed -->" in text
    assert "same nearest neighbour" in text and "MFU" in text and "certified (mean)" in text and "update ms" in text


def test_each_loop_starts_with_a_fresh_compiler(monkeypatch, one_thread):
    # Automatic dynamic shapes would otherwise make a later batch size measure a dynamic-shape graph.
    import torch._dynamo

    from experiments.loop_benchmark import MEASURE_ARGV, Loop

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    argv = [*load_spec(SPEC, quick=True).runs[0].params["argv"], *MEASURE_ARGV]
    for batch_size in (4, 8):
        Loop.build(argv, batch_size)
    assert len(resets) == 2


def test_only_warnings_that_name_a_synchronising_call_count_as_syncs():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # what torch says the first time the debug mode is turned on (seen on an H200): not a sync
        notice = "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing ops"
        warnings.warn(notice, stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation (Triggered internally at Module.cpp:1)", stacklevel=1)
    (found,) = sync_warnings(caught)
    assert found.startswith("called a synchronizing CUDA operation (Triggered") and " at " in found


def test_the_mfu_yardstick_is_measured_in_the_steps_precision():
    assert MATMUL_DTYPES["bf16"] == torch.bfloat16 and MATMUL_DTYPES.get("no", torch.float32) == torch.float32
    assert matmul_gflops(torch.device("cpu"), size=64, repeats=2, dtype=torch.bfloat16) > 0
