"""The experiment harness (experiments/spec.py, store.py, runner.py, __main__.py): one spec schema,
one store, one runner, reports that read records only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import experiments.runner as runner
from experiments.registry import REPORTS, RUN_KINDS, report, run_kind
from experiments.runner import Unfinished, run_pending
from experiments.spec import digest, load_spec
from experiments.store import Store, cpu_model, machine_description

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "configs" / "experiments"


def write_spec(path: Path, **settings) -> Path:
    spec = {
        "kind": "fake",
        "choices": {"arm": {"a": {"weight": 0.0}, "b": {"weight": 0.1}}},
        "axes": {"seed": "seed"},
        "name": "{arm}-seed{seed}",
        "base": {"steps": 3},
        "stages": [{"name": "main", "grid": {"seed": [0, 1], "arm": ["a", "b"]}}],
        **settings,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_spec_expands_stages_times_axes_in_order_each_run_once(tmp_path):
    spec = load_spec(write_spec(
        tmp_path / "s.yaml",
        stages=[
            {"name": "main", "grid": {"seed": [0, 1], "arm": ["a", "b"]}},
            {"name": "more", "grid": {"seed": [1, 2], "arm": ["b"]}, "params": {"steps": 3}},
        ],
    ))  # fmt: skip
    assert [run.name for run in spec.runs] == ["a-seed0", "b-seed0", "a-seed1", "b-seed1", "b-seed2"]
    b1 = spec.run("b-seed1")
    assert b1.stage == "main" and b1.axes == {"seed": 1, "arm": "b"}
    assert b1.params == {"steps": 3, "weight": 0.1, "seed": 1}
    assert b1.digest == digest("fake", {"seed": 1, "weight": 0.1, "steps": 3})  # key order does not matter
    assert spec.run("b-seed2").stage == "more"


def test_quick_is_merged_over_the_spec_and_stages_are_replaced_whole(tmp_path):
    path = write_spec(
        tmp_path / "s.yaml", quick={"base": {"steps": 1}, "stages": [{"name": "q", "grid": {"seed": [0]}}]}
    )
    full, quick = load_spec(path), load_spec(path, quick=True)
    assert len(full.runs) == 4 and [run.name for run in quick.runs] == ["{arm}-seed0"]
    assert quick.runs[0].params == {"steps": 1, "seed": 0}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"stages": [{"name": "main", "grid": {"arm": ["a", "c"]}}]}, r"stage 'main' names unknown arm \['c'\]"),
        ({"stages": [{"name": "main", "grid": {"colour": ["red"]}}]}, "axis 'colour', in neither choices nor axes"),
        ({"budget": 3}, r"unknown key\(s\) \['budget'\]"),
        ({"base_files": {"pretrain": "missing.yaml"}}, "base_files.pretrain 'missing.yaml' not found"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_problem(tmp_path, settings, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as refused:
        load_spec(write_spec(tmp_path / "s.yaml", **settings))
    assert "\n" not in str(refused.value)


class FakeKind:
    """A run kind that records its calls: ``cut`` runs stop once with the budget, ``broken`` ones raise."""

    def __init__(self, cut=(), broken=()):
        self.calls, self.cut, self.broken = [], set(cut), set(broken)

    def __call__(self, params, context):
        name = context.run.name
        self.calls.append(name)
        if name in self.broken:
            raise RuntimeError(f"{name} broke\nsecond line")
        if name in self.cut:
            self.cut.discard(name)
            (context.work_dir).mkdir(parents=True, exist_ok=True)
            raise Unfinished("stopped at step 1 of 3 (budget)")
        return {"score": params["weight"] + params["seed"], "left": context.seconds_left > 0}


def test_the_runner_resumes_cut_runs_records_failures_and_skips_what_is_done(tmp_path, monkeypatch):
    spec = load_spec(write_spec(tmp_path / "s.yaml"))
    store = Store(tmp_path / "records")
    kind = FakeKind(cut={"b-seed0"}, broken={"a-seed1"})
    monkeypatch.setattr(runner, "run_kind", lambda name: kind)
    first = run_pending(spec, store, tmp_path / "work")
    assert first.as_dict() == {"finished": ["a-seed0"], "failed": [], "interrupted": "b-seed0",
                               "pending": ["b-seed0", "a-seed1", "b-seed1"]}  # fmt: skip
    second = run_pending(spec, store, tmp_path / "work")
    assert second.as_dict() == {"finished": ["b-seed0", "b-seed1"], "failed": ["a-seed1"], "interrupted": None,
                                "pending": []}  # fmt: skip
    failed = store.read("a-seed1")
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: a-seed1 broke second line"
    done = store.read("b-seed1")
    assert done["result"] == {"score": 1.1, "left": True} and done["axes"] == {"seed": 1, "arm": "b"}
    assert {"command", "machine", "torch", "threads", "load_average"} <= set(done["environment"])
    assert run_pending(spec, store, tmp_path / "work").as_dict()["finished"] == []  # failed: not retried ...
    kind.broken.clear()
    assert run_pending(spec, store, tmp_path / "work", retry_failed=True).finished == ["a-seed1"]  # ... unless asked
    assert kind.calls == ["a-seed0", "b-seed0", "b-seed0", "a-seed1", "b-seed1", "a-seed1"]


def test_a_record_made_with_other_parameters_is_stale_never_overwritten_and_left_out_of_reports(tmp_path, monkeypatch):
    path = write_spec(tmp_path / "s.yaml")
    store = Store(tmp_path / "records")
    monkeypatch.setattr(runner, "run_kind", lambda name: FakeKind())
    run_pending(load_spec(path), store, tmp_path / "work")
    moved_on = load_spec(write_spec(path, choices={"arm": {"a": {"weight": 0.0}, "b": {"weight": 0.2}}}))
    assert [store.status(run) for run in moved_on.runs] == ["done", "stale", "done", "stale"]
    assert run_pending(moved_on, store, tmp_path / "work").finished == []
    records, left_out = store.records(moved_on.runs)
    assert [record["name"] for record in records] == ["a-seed0", "a-seed1"]
    assert left_out == {name: "stale: made with other parameters than the spec gives it now" for name in
                        ("b-seed0", "b-seed1")}  # fmt: skip
    store.path("b-seed0").unlink()  # deleting a stale record runs it again
    assert run_pending(moved_on, store, tmp_path / "work").finished == ["b-seed0"]


def test_only_runs_the_named_runs_and_refuses_a_name_the_spec_lacks(tmp_path, monkeypatch):
    spec = load_spec(write_spec(tmp_path / "s.yaml"))
    store = Store(tmp_path / "records")
    monkeypatch.setattr(runner, "run_kind", lambda name: FakeKind())
    assert run_pending(spec, store, tmp_path / "work", only=["b-seed1"]).finished == ["b-seed1"]
    with pytest.raises(ValueError, match=r"--only names no run of this spec: \['b-seed7'\]"):
        run_pending(spec, store, tmp_path / "work", only=["a-seed0", "b-seed7"])  # a typo runs nothing
    assert store.status(spec.run("a-seed0")) == "pending"


def test_a_budget_starts_no_run_without_its_reserve(tmp_path, monkeypatch):
    spec = load_spec(write_spec(tmp_path / "s.yaml", reserve_seconds=30))
    monkeypatch.setattr(runner, "run_kind", lambda name: FakeKind())
    outcome = run_pending(spec, Store(tmp_path / "records"), tmp_path / "work", budget_seconds=20)
    assert outcome.finished == [] and outcome.pending == [run.name for run in spec.runs]


def test_every_registered_kind_and_report_resolves_and_every_shipped_spec_loads():
    for name in RUN_KINDS:
        assert callable(run_kind(name))
    for name in REPORTS:
        assert callable(report(name))
    for path in sorted(SPECS.glob("*.yaml")):
        for quick in (False, True):
            spec = load_spec(path, quick)
            assert spec.runs and {run.kind for run in spec.runs} <= set(RUN_KINDS), path
            assert spec.report in REPORTS, path
    with pytest.raises(ValueError, match=r"unknown run kind 'nope'; known: \["):
        run_kind("nope")


def experiments_cli(*arguments, cwd=ROOT, check=True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "experiments", *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=_environment())
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _environment():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_the_command_line_refuses_a_missing_spec_in_one_line(tmp_path):
    result = experiments_cli("plan", tmp_path / "nope.yaml", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"python -m experiments: error: experiment spec {tmp_path / 'nope.yaml'} not found"
    ]


def test_frozen_head_quick_runs_in_fresh_processes_and_reports_from_its_records(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from hf_koleo.backbone_export import build_image_processor

    backbone = tmp_path / "outputs" / "frozen_head_quick" / "backbone"  # the quick spec's relative path
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=16,
                          patch_size=4)  # fmt: skip
    Dinov2Model(config).save_pretrained(backbone)
    build_image_processor("dinov2", 16, [0.5] * 3, [0.5] * 3).save_pretrained(backbone)
    spec = SPECS / "frozen_head.yaml"
    records, docs = tmp_path / "records", tmp_path / "docs"
    plan = experiments_cli("plan", spec, "--quick", "--records", records, cwd=tmp_path).stdout
    assert plan.splitlines()[0].split() == ["pending", "study", "pixels-baseline-seed0"] and len(plan.splitlines()) == 4
    run = experiments_cli("run", spec, "--quick", "--records", records, "--work_dir", tmp_path / "work",
                          "--fresh_process", cwd=tmp_path)  # fmt: skip
    assert len(json.loads(run.stdout)["finished"]) == 4
    experiments_cli("report", spec, "--quick", "--records", records, "--report_dir", docs, cwd=tmp_path)
    markdown = (docs / "frozen_head.md").read_text()
    for path in sorted(records.glob("*.json")):
        record = json.loads(path.read_text())
        final, axes = record["result"]["history"][-1], record["axes"]
        row = next(
            line for line in markdown.splitlines() if line.startswith(f"| {axes['backbone']} | {axes['variant']} |")
        )
        assert f"| {final['unique']['0.025']:,} |" in row and f"{final['nn_distance']['q0.5']:,.3f}" in row
        assert record["environment"]["command"].startswith("python -m experiments run")
    assert "Quick mode" in markdown and "python -m experiments run" in markdown
    for name in ("unique_vs_step", "eps_curve"):
        assert (docs / "figures" / f"frozen_head_{name}.png").stat().st_size > 10_000


def test_the_committed_frozen_head_study_re_renders_from_its_records(tmp_path):
    from experiments.frozen_head_report import load_results, render_markdown

    spec = load_spec(SPECS / "frozen_head.yaml")
    records, left_out = Store(ROOT / "docs" / "frozen_head" / "runs").records(spec.runs)
    assert len(records) == len(spec.runs) == 14 and not left_out  # every run planned, none stale
    assert render_markdown(load_results(records, spec)) == (ROOT / "docs" / "frozen_head.md").read_text()


def test_the_k_sweep_scores_the_teachers_clusters_and_reports_them_against_k(tmp_path, one_thread):
    from experiments.registry import report
    from experiments.runner import run_pending

    spec = load_spec(SPECS / "frozen_head_k.yaml", quick=True)
    store = Store(tmp_path / "records")
    assert sorted(run_pending(spec, store, tmp_path / "work", fresh_process=False).finished) == sorted(
        run.name for run in spec.runs
    )
    records, left_out = store.records(spec.runs)
    markdown, data, figure = report(spec.report)(spec, records, left_out, tmp_path / "docs")
    rows = json.loads(data.read_text())["runs"]
    assert [(row["num_prototypes"], row["variant"]) for row in rows] == [
        (16, "baseline"), (16, "koleo_proto"), (64, "baseline"), (64, "koleo_proto")
    ]  # fmt: skip
    for row, record in zip(rows, sorted(records, key=lambda r: (r["axes"]["num_prototypes"], r["axes"]["variant"]))):
        final = record["result"]["history"][-1]
        assert row["nmi"] == final["clusters"]["nmi"] and 0 <= row["nmi"] <= 1
        assert row["used"] == final["used"] == final["clusters"]["clusters_used"]  # one arg-max, the same images
        assert f"| {row['num_prototypes']:,} | {row['variant']} |" in markdown.read_text()
    assert figure.stat().st_size > 10_000


def test_cpu_model_reads_the_cpu_back_from_a_machine_description():
    assert cpu_model("x86_64 AMD EPYC (AVX2 kernels), 2 cores, 24 GiB; torch 2.13.0+cpu (1 threads)") == "AMD EPYC"
    assert cpu_model("x86_64 Intel(R) Xeon(R) Processor (AVX512 kernels), 2 cores") == "Intel Xeon"
    assert cpu_model("aarch64 CPU, 2 cores") == "CPU" and cpu_model("") == "?"
    assert cpu_model(machine_description()) not in ("", "?")  # this machine's own line
