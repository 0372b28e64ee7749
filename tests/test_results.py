"""docs/results.json and the claims table: every study's committed records, one row each, one verdict per claim."""

import json
import shutil

from conftest import ROOT

from experiments.results import clusters_claim, cpu_hours, recipe_claim, recipe_prevention
from experiments.spec import load_spec
from experiments.store import Store


def test_results_gather_every_committed_record_and_write_the_claims_region(tmp_path):
    from experiments.__main__ import main

    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(ROOT / "docs" / "results.md", docs / "results.md")
    main(["results", "--report_dir", str(docs)])
    results = json.loads((docs / "results.json").read_text())
    spec = load_spec(ROOT / "configs" / "experiments" / "frozen_head.yaml")
    records, _ = Store(ROOT / spec.settings["records"]).records(spec.runs)
    rows = {row["name"]: row for row in results["runs"] if row["source"] == "frozen_head"}
    assert len(rows) == len(records) >= 10
    for record in records:
        assert rows[record["name"]]["unique"] == record["result"]["history"][-1]["unique"]
    study = {row["name"]: row for row in results["runs"] if row["source"] == "cpu_study"}
    long = study["fashion_mnist-K16384-baseline-seed1-long"]  # set by max_steps: its epochs are the passes made
    assert long["epochs"] == 34.0 and long["steps"] == 31875
    assert long["clusters_used"] == 433 and long["used"] == 239  # test-split clusters beside end-of-training use
    claims = {claim["claim"]: claim for claim in results["claims"]}
    assert all(claim["verdict"] and claim["evidence"] for claim in claims.values())
    text = (docs / "results.md").read_text()
    assert text.count("<!-- generated: claims -->") == 1
    assert all(f"| {claim} |" in text for claim in claims)
    assert text.count("<!-- generated: cpu_hours -->") == 1
    on_cpu = [row for row in results["runs"] if row.get("cpu_seconds") is not None]
    assert results["cpu_hours"]["total"]["runs"] == len(on_cpu) > len(records)
    assert f"| total | {len(on_cpu)} |" in text


def test_cpu_hours_sum_each_source_and_all_leaving_out_device_runs():
    rows = [
        {"source": "cpu_study", "cpu_seconds": 5400.0},
        {"source": "cpu_study", "cpu_seconds": 1800.0},
        {"source": "frozen_head_k", "cpu_seconds": 3600.0},
        {"source": "gpu_window", "cpu_seconds": None, "device_seconds": 500.0},
    ]
    hours = cpu_hours(rows)
    assert list(hours) == ["cpu_study", "frozen_head_k", "total"]
    assert hours["cpu_study"] == {"runs": 2, "hours": 2.0}
    assert hours["total"] == {"runs": 3, "hours": 3.0}


def test_cluster_verdicts_need_both_methods_and_say_which_way():
    def row(method, k, nmi, source="frozen_head_k"):
        return {"source": source, "dataset": "d", "method": method, "num_prototypes": k, "nmi": nmi}

    assert clusters_claim([row("baseline", 256, 0.5)])["verdict"] == "not measured"
    finer = clusters_claim([row("baseline", 256, 0.5), row("koleo_proto", 256, 0.6), row("baseline", 1024, 0.4),
                            row("koleo_proto_candidates", 1024, 0.45)])  # fmt: skip
    assert finer["verdict"] == "confirmed" and "K = 1,024: +0.050" in finer["evidence"]
    mixed = clusters_claim([row("baseline", 256, 0.5), row("koleo_proto", 256, 0.6), row("baseline", 1024, 0.5),
                            row("koleo_proto", 1024, 0.4)])  # fmt: skip
    assert mixed["verdict"] == "not confirmed"
    # a Sinkhorn-Knopp run is no baseline of an EMA-centred KoLeo-proto run
    sinkhorn = {**row("baseline", 256, 0.1), "centring": "sinkhorn_knopp"}
    paired = clusters_claim([row("baseline", 256, 0.5), row("koleo_proto", 256, 0.6), sinkhorn])
    assert "K = 256: +0.100" in paired["evidence"]


def test_the_recipe_claim_is_not_measured_without_its_run_and_the_pixels():
    assert recipe_claim({})["verdict"] == "not measured"


def test_the_recipe_claim_scores_the_released_recipe_not_the_best_test_score():
    def run(name, knn, minutes, stage="recipe", released=False, seed=0, patch=14):
        result = {
            "settings": {"model": {"patch_size": patch}, "seed": seed, "output_dir": name},
            "pretraining": {"seconds": 60 * minutes},
            "evaluation": {"knn_top1": 0.0, "test": {"knn_top1": knn}},
        }
        params = {"keep_backbone": True} if released else {}
        return {"name": name, "status": "done", "stage": stage, "kind": "pretrain_eval", "params": params,
                "result": result}  # fmt: skip

    pixels = {"status": "done", "stage": "pixels", "kind": "evaluate_pixels", "params": {},
              "result": {"evaluation": {"knn_top1": 84.6}}}  # fmt: skip
    runs = [  # in plan order: the last release is the shipped recipe
        run("released_earlier", 84.0, 50, stage="release", released=True, patch=28),
        run("released", 85.9, 25, stage="release", released=True, seed=1),
        run("same_recipe_seed0", 86.3, 24),  # the same settings, another seed: counts
        run("tried_since", 87.0, 30, patch=4),  # a better test score, other settings: does not
        run("released_before", 84.9, 45, released=True, patch=7),  # an earlier release: does not
    ]
    sources = {"cpu_recipe": (None, [*runs, pixels])}
    claim = recipe_claim(sources)
    assert claim["verdict"] == "confirmed" and "86.1 (mean of 2 seeds)" in claim["evidence"]
    assert "(released, same_recipe_seed0)" in claim["evidence"] and "after 25 min" in claim["evidence"]
    runs[2]["result"]["pretraining"]["seconds"] = 61 * 60  # one seed over the hour
    assert recipe_claim(sources)["verdict"] == "not confirmed"
    assert recipe_claim({"cpu_recipe": (None, [*runs[2:], pixels])})["verdict"] == "not measured"
    # until the last release is done, the one released before it is the recipe
    earlier = recipe_claim({"cpu_recipe": (None, [runs[0], *runs[2:], pixels])})
    assert "84.0 on fashion_mnist:test" in earlier["evidence"] and "(released_earlier)" in earlier["evidence"]


def test_the_recipe_twin_decides_prevention_only_where_its_baseline_merged():
    def row(method, unique, epochs=34, k=4096, seed=0):
        return {"source": "cpu_recipe", "method": method, "epochs": epochs, "num_prototypes": k,
                "unique": {"0.025": unique}, "seed": seed}  # fmt: skip

    unmeasured = {"claim": "KoLeo-proto prevents it", "verdict": "not measured", "evidence": "no run"}
    assert recipe_prevention([row("baseline", 4000), row("koleo_proto", 4096)], unmeasured) == unmeasured  # no merge
    assert recipe_prevention([row("baseline", 233), row("koleo_proto", 4096, epochs=4)], unmeasured) == unmeasured
    held = recipe_prevention([row("baseline", 233), row("koleo_proto", 4096)], unmeasured)
    assert held["verdict"] == "confirmed" and "4,096 unique at eps 0.025 (100.0%)" in held["evidence"]
    assert "its baseline kept 5.7%" in held["evidence"]
    failed = recipe_prevention([row("baseline", 233), row("koleo_proto", 3900)], unmeasured)
    assert failed["verdict"] == "not confirmed"
    # a twin is set beside its own seed's baseline where there is one, once
    seeds = [row("baseline", 503), row("baseline", 547, seed=1), row("koleo_proto", 4096, seed=1)]
    paired = recipe_prevention(seeds, unmeasured)["evidence"]
    assert paired.count("where its baseline kept") == 1 and "kept 13.4%" in paired
    study = {**unmeasured, "verdict": "confirmed", "evidence": "fashion_mnist K = 16,384: 100 %"}
    assert recipe_prevention([row("baseline", 233), row("koleo_proto", 3900)], study)["verdict"] == "not confirmed"
