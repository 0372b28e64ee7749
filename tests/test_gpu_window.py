import json

from experiments.results import side_by_side_rows
from scripts.gpu_window import main


def test_the_gpu_window_runs_the_pair_side_by_side_then_the_loop_rows_and_packs_them(tmp_path):
    out = tmp_path / "out"
    main(["--quick", "--out", str(out), "--work_dir", str(tmp_path / "work")])  # records straight into out/runs
    pair = json.loads((out / "runs" / "decisive-demo-K64.json").read_text())
    assert pair["status"] == "done", pair.get("error")
    result = pair["result"]
    assert set(result["runs"]) == {"baseline", "koleo_proto"} and result["epochs"] == 1
    assert all(speed > 0 for speed in result["probe_images_per_second"].values())
    for run in result["runs"].values():
        assert run["prototype_history"] and 0 < run["evaluation"]["knn_top1"] <= 100 and not run["cut_by_max_time"]
    loop = json.loads((out / "runs" / "demo_tiny-batch4.json").read_text())
    assert loop["status"] == "done" and loop["result"]["host_syncs"] == []
    report = (out / "gpu_window.md").read_text()
    assert "| baseline | 1 |" in report and "| koleo_proto | 1 |" in report and "demo, tiny" in report
    # docs/results.json takes one headline row per method from the record
    rows = {row["method"]: row for row in side_by_side_rows("gpu_window", pair)}
    assert set(rows) == {"baseline", "koleo_proto"}
    for method, row in rows.items():
        run = result["runs"][method]
        assert row["num_prototypes"] == 64 and row["epochs"] == run["epochs_reached"] and row["device"] == "CPU"
        assert row["knn_top1"] == run["evaluation"]["knn_top1"]
        assert row["unique"] == run["final_prototypes"]["teacher/cls"]["unique_curve"]
