"""The generated tables and targets of ``docs/benchmarks.md``, from the records of
``configs/experiments/benchmarks.yaml`` (:mod:`experiments.benchmarks`): every ratio and img/s figure is
computed from the timings a record carries; :func:`check_targets` marks the targets met or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.benchmarks import KOLEO_IMPLEMENTATIONS
from experiments.markdown import distinct, markdown_table, verdict_list, write_generated


def _measured(row: dict | None) -> bool:
    return bool(row) and "error" not in row


def _timing_cells(row: dict) -> list[str]:
    """Median seconds and peak extra MiB of a timing row; a failed row's error in both."""
    if "error" in row:
        return [row["error"], row["error"]]
    return [f"{row['seconds_median']:.3f}", f"{row['peak_extra_mib']:.0f}"]


def _koleo_runs(results: dict[str, Any]) -> dict[tuple[int, str], dict]:
    return {(row["num_prototypes"], row["implementation"]): row for row in results.get("koleo", [])}


def _data_headroom(results: dict[str, Any]) -> tuple[dict, dict, float] | None:
    """The data row, the first measured step and pipeline img/s over that step's; None unless both were measured."""
    steps = [row for row in results.get("step", []) if _measured(row)]
    data = results.get("data")
    if not (_measured(data) and steps):
        return None
    return data, steps[0], data["images_per_second"] / steps[0]["ours_images_per_second"]


def benchmark_sections(results: dict[str, Any]) -> dict[str, list[str]]:
    """The generated parts of ``docs/benchmarks.md``, by name: each a table (or the targets list).

    ``results``: ``{"koleo": [rows], "dino_ibot": [rows], "step": [rows], "data": row, "features": row}``
    (:func:`load_results`); a row that failed holds its parameters and ``error``.
    """
    sections: dict[str, list[str]] = {}
    koleo = _koleo_runs(results)
    rows = []
    for size in dict.fromkeys(size for size, _ in koleo):  # each K once, in the records' order
        blocked, dense = (koleo.get((size, name), {"error": "-"}) for name in ("blocked", "dense"))
        ratio = "-"
        if _measured(blocked) and _measured(dense):
            ratio = f"{blocked['seconds_median'] / dense['seconds_median']:.2f}"
        rows.append([str(size), *_timing_cells(blocked), *_timing_cells(dense), ratio])
    dinov2 = KOLEO_IMPLEMENTATIONS["dense"]
    if rows:
        sections["koleo"] = markdown_table(
            ["K", "ours (blocked) s", "ours peak MiB", f"{dinov2} s", f"{dinov2} peak MiB", "time ours ÷ DINOv2"], rows
        )
    if results.get("dino_ibot"):
        rows = [[str(row["num_prototypes"]), str(row["batch"]), *_timing_cells(row)] for row in results["dino_ibot"]]
        sections["dino_ibot"] = markdown_table(["K", "batch", "s", "peak MiB"], rows)
    if results.get("step"):
        rows = []
        for row in results["step"]:
            if "error" in row:
                cells = [row["error"], "", ""]
            else:
                images_per_second = row["ours_images_per_second"], row["lightly_images_per_second"]
                cells = [*(f"{value:.1f}" for value in images_per_second), f"{row['speedup_median']:.2f}×"]
            rows.append([str(row.get("K", row.get("num_prototypes"))), str(row["batch"]), *cells])
        header = ["K", "batch", "ours img/s", "lightly img/s", "median ratio (ours / lightly)"]
        sections["step"] = markdown_table(header, rows)
    if headroom := _data_headroom(results):
        data, step, ratio = headroom
        pipeline = f"{data['images_per_second']:.0f} (workers {data['num_workers']}, batch {data['batch_size']})"
        sections["data"] = markdown_table(
            ["pipeline img/s (stream → decode → multi-crop → photometric)", "step img/s", "headroom"],
            [[pipeline, f"{step['ours_images_per_second']:.1f} (K = {step['K']})", f"{ratio:.1f}×"]],
        )
    features = results.get("features")
    if _measured(features):
        rates = [f"{features[key]:.1f}" for key in ("exported_images_per_second", "stock_images_per_second")]
        sections["features"] = markdown_table(
            ["exported img/s", "stock img/s", "ratio"], [[*rates, f"{features['ratio']:.2f}×"]]
        )
    if results.get("unique_curve"):
        eps_values = list(next(row["unique"] for row in results["unique_curve"] if "unique" in row))
        rows = []
        for row in results["unique_curve"]:
            if "error" in row:
                cells = [row["error"], *[""] * len(eps_values)]
            else:
                cells = [f"{row['seconds']:.1f}", *[f"{row['unique'][eps]:,}" for eps in eps_values]]
            rows.append([f"{row['num_prototypes']:,}", f"{row['groups']:,}", *cells])
        header = ["K", "groups", "s", *[f"unique@{eps}" for eps in eps_values]]
        sections["unique_curve"] = markdown_table(header, rows)
    sections["targets"] = verdict_list(check_targets(results))
    return sections


SECTION_TITLES = {
    "koleo": "KoLeo-proto forward + backward",
    "dino_ibot": "DINO + iBOT loss forward + backward",
    "step": "One training step: ours vs a lightly-based step, alternately in one process",
    "data": "Data pipeline vs what the training step consumes",
    "features": "Feature extraction: exported backbone vs stock Dinov2Model",
    "unique_curve": "Unique prototypes of a merged set (the collapse diagnostic's worst case)",
    "targets": "Targets",
}

# Which part of the suite each run kind measures.
KIND_SECTIONS = {
    "koleo_timing": "koleo",
    "dino_ibot_timing": "dino_ibot",
    "step_vs_peer": "step",
    "data_rate": "data",
    "feature_extraction": "features",
    "unique_curve_timing": "unique_curve",
}


def load_results(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The suite's results from its records: lists for the tables, one row for data and features."""
    results: dict[str, Any] = {"machine": distinct(r["environment"]["machine"] for r in records)}
    for record in records:
        section = KIND_SECTIONS[record["kind"]]
        row = record["result"] if record["status"] == "done" else {**record["params"], "error": record["error"]}
        if section in ("data", "features"):
            results[section] = row
        else:
            results.setdefault(section, []).append(row)
    return results


def write_report(spec, records: list[dict[str, Any]], left_out: dict[str, str], report_dir: Path) -> list[Path]:
    """The generated parts of ``benchmarks.md`` in ``report_dir`` (the text around them is kept)."""
    path = report_dir / "benchmarks.md"
    header = ["# Benchmarks", "", f"Tables generated from the records in `{spec.folder('records', '')}`."]
    write_generated(path, benchmark_sections(load_results(records)), header, SECTION_TITLES)
    return [path]


def check_targets(results: dict[str, Any]) -> list[dict[str, str]]:
    """The suite's targets as verdicts (``claim``, ``verdict`` met / NOT met, ``evidence``: the measured
    number and the target); a target whose measurement is missing or failed is left out."""

    def verdict(claim: str, met: bool, evidence: str) -> dict[str, str]:
        return {"claim": claim, "verdict": "met" if met else "NOT met", "evidence": evidence}

    koleo = _koleo_runs(results)
    verdicts = []
    if koleo:
        largest = max(size for size, _ in koleo)
        blocked = koleo.get((largest, "blocked"))
        if _measured(blocked):
            mib = blocked["peak_extra_mib"]
            claim = f"KoLeo-proto at K = {largest}"
            verdicts.append(verdict(claim, mib < 1024, f"{mib:.0f} MiB extra peak memory (target < 1024 MiB)"))
    if _measured(koleo.get((8192, "blocked"))) and _measured(koleo.get((8192, "dense"))):
        ours, dense = koleo[(8192, "blocked")]["seconds_median"], koleo[(8192, "dense")]["seconds_median"]
        claim = "KoLeo-proto at K = 8192 no slower than the DINOv2 algorithm"
        verdicts.append(verdict(claim, ours <= dense, f"{ours:.3f} s vs {dense:.3f} s"))
    for row in results.get("step", []):
        if _measured(row):
            claim = f"Full step at K = {row['K']} >= 1.2x the lightly-based step"
            verdicts.append(verdict(claim, row["speedup_median"] >= 1.2, f"{row['speedup_median']:.2f}x"))
    if found := _data_headroom(results):
        _, _, headroom = found
        claim = "Data pipeline >= 2x the step's demand (demo config)"
        verdicts.append(verdict(claim, headroom >= 2, f"{headroom:.1f}x"))
    if _measured(results.get("features")):
        ratio = results["features"]["ratio"]
        claim = "Exported backbone feature extraction = stock Dinov2Model"
        verdicts.append(verdict(claim, 0.95 <= ratio <= 1.05, f"{ratio:.2f}x"))
    return verdicts
