"""Report of the CPU study (``configs/experiments/cpu_study.yaml``): baseline vs KoLeo-proto on
Fashion-MNIST and Fashion-MNIST-LT, with the KoLeo-proto weight chosen by a sweep scored on a
validation split carved from the *training* data.

Per dataset and seed, two runs identical but for ``koleo_proto_weight``; for each: unique prototypes
of teacher and student over training and at the end (eps curve), utilisation, marginal-distribution
entropy, weighted kNN, linear probe, 1- and 5-shot, balanced accuracy, and the raw-pixel baseline.
Everything is read from the study's records (run kinds ``pretrain_eval``, ``evaluate_pixels``);
:func:`write_report` writes ``cpu_study.md`` and one PNG per dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.markdown import mean_std

VARIANTS = ("baseline", "koleo_proto")
CURVE_KEYS = (
    "prototypes/teacher_cls/unique@0.025",
    "prototypes/student_cls/unique@0.025",
    "prototypes/teacher_cls/nn_distance_q0.5",
    "prototypes/student_cls/nn_distance_q0.5",
)


def run_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one finished ``pretrain_eval`` run the tables and plots show."""
    teacher, student = result["final_prototypes"]["teacher/cls"], result["final_prototypes"]["student/cls"]
    history = result["prototype_history"]
    return {
        "weight": result["settings"]["model"].get("koleo_proto_weight", 0.0),
        "teacher_unique": teacher["unique_prototypes"],
        "student_unique": student["unique_prototypes"],
        "teacher_eps_curve": teacher["unique_curve"],
        "student_eps_curve": student["unique_curve"],
        "used": teacher["utilisation"]["used"],
        "perplexity": teacher["utilisation"]["assignment_perplexity"],
        "marginal_entropy": teacher["marginal_entropy"],
        "nn_median": teacher["nn_distance_quantiles"]["q0.5"],
        "curves": {key: [[row["step"], row[key]] for row in history if key in row] for key in CURVE_KEYS},
        "wall_seconds": result["pretraining"]["seconds"],
        **result["evaluation"],
    }


def load_results(records: list[dict[str, Any]], spec) -> dict[str, Any]:
    """``{"sweep", "chosen_weight", "used_weight", "runs": {dataset: {variant: [run]}}, "pixels", ...}``."""
    done = [record for record in records if record.get("status") == "done"]
    results: dict[str, Any] = {"sweep": {}, "runs": {}, "pixels": {}}
    for record in done:
        axes, result = record["axes"], record["result"]
        if record["kind"] == "evaluate_pixels":
            results["pixels"][axes["dataset"]] = result["evaluation"]
        elif record["stage"] == "sweep":
            results["sweep"][f"{axes['weight']:g}"] = {
                "validation_knn_balanced": result["evaluation"]["validation_knn_balanced"],
                "teacher_unique": result["final_prototypes"]["teacher/cls"]["unique_prototypes"],
            }
        else:
            summary = run_summary(result)
            results["runs"].setdefault(axes["dataset"], {}).setdefault(axes["variant"], []).append(summary)
    sweep = results["sweep"]
    key = lambda w: (sweep[w]["validation_knn_balanced"], sweep[w]["teacher_unique"])  # noqa: E731
    results["chosen_weight"] = float(max(sweep, key=key)) if sweep else None
    results["used_weight"] = spec.settings["choices"]["variant"]["koleo_proto"]["pretrain"]["model"][
        "koleo_proto_weight"
    ]
    results["num_prototypes"] = spec.settings["base"]["pretrain"]["model"]["num_prototypes"]
    results["wall_seconds"] = sum(record["seconds"] or 0 for record in done)
    return results


def write_report(spec, records: list[dict[str, Any]], left_out: dict[str, str], report_dir: Path) -> list[Path]:
    """``cpu_study.md`` and ``figures/cpu_study_unique_prototypes_<dataset>.png`` in ``report_dir``."""
    results = load_results(records, spec)
    report_dir.mkdir(parents=True, exist_ok=True)
    failed = {record["name"]: f"failed: {record['error']}" for record in records if record.get("status") == "failed"}
    text = render_study_markdown(results)
    if {**left_out, **failed}:
        text += "\nLeft out: " + "; ".join(f"{name} ({why})" for name, why in {**left_out, **failed}.items()) + ".\n"
    path = report_dir / "cpu_study.md"
    path.write_text(text)
    return [path, *plot_study(results, report_dir / "figures")]


# (key, label, decimals)
METRIC_ROWS = (
    ("teacher_unique", "unique prototypes (teacher, eps 0.025)", 0),
    ("student_unique", "unique prototypes (student, eps 0.025)", 0),
    ("used", "prototypes used (arg-max on report images)", 0),
    ("perplexity", "assignment perplexity", 2),
    ("marginal_entropy", "marginal latent class entropy (nats)", 3),
    ("nn_median", "median NN distance (teacher)", 3),
    ("knn_top1", "kNN top-1 (k=20)", 1),
    ("knn_balanced", "kNN balanced accuracy", 1),
    ("linear_top1", "linear probe top-1", 1),
    ("linear_balanced", "linear probe balanced accuracy", 1),
    ("shot1", "1-shot top-1", 1),
    ("shot5", "5-shot top-1", 1),
    ("shot5_balanced", "5-shot balanced accuracy", 1),
)


def render_study_markdown(results: dict[str, Any]) -> str:
    chosen, used = results.get("chosen_weight"), results.get("used_weight", results.get("chosen_weight"))
    if chosen is None:
        choice = "No sweep run yet"
    else:
        choice = f"KoLeo-proto weight chosen by the sweep: **{chosen:g}**"
    if used is not None and used != chosen:
        choice += f"; the KoLeo-proto runs use **{used:g}** (the spec's: set the sweep's choice there)"
    lines = [
        f"{choice} (validation: kNN balanced accuracy on 20 % held out from the training data).",
        "",
        "| sweep weight | validation kNN balanced accuracy | teacher unique prototypes |",
        "|---|---|---|",
    ]
    lines += [
        f"| {w} | {row['validation_knn_balanced']:.1f} | {row['teacher_unique']} |"
        for w, row in results["sweep"].items()
    ]
    for dataset, variants in results["runs"].items():
        pixels = results["pixels"].get(dataset, {})
        lines += ["", f"### {dataset}", "", "| metric | baseline | KoLeo-proto | raw pixels |", "|---|---|---|---|"]
        for key, label, digits in METRIC_ROWS:
            cells = [
                mean_std([run[key] for run in variants[variant]], digits) if variants.get(variant) else "-"
                for variant in VARIANTS
            ]
            lines.append(
                f"| {label} | {cells[0]} | {cells[1]} | {pixels[key]:.1f} |"
                if key in pixels
                else f"| {label} | {cells[0]} | {cells[1]} | - |"
            )
        walls = [
            run["wall_seconds"] for variant in VARIANTS for run in variants.get(variant, []) if run["wall_seconds"]
        ]
        if walls:
            lines.append(f"| pretraining wall time per run (s) | {mean_std(walls)} | | |")
    lines += ["", f"Study wall time: {results['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot_study(results: dict[str, Any], output_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset, variants in results["runs"].items():
        figure, (steps_axis, distance_axis, eps_axis) = plt.subplots(1, 3, figsize=(16, 4))
        num_prototypes = results["num_prototypes"]
        for variant, colour in zip(VARIANTS, ("tab:red", "tab:blue")):
            if not variants.get(variant):
                continue
            run = variants[variant][0]
            for branch, style in (("teacher", "-"), ("student", "--")):
                label = f"{variant} {branch}"
                for axis, key in ((steps_axis, "unique@0.025"), (distance_axis, "nn_distance_q0.5")):
                    curve = run["curves"][f"prototypes/{branch}_cls/{key}"]
                    axis.plot([s for s, _ in curve], [v for _, v in curve], style, color=colour, label=label)
                eps_curve = run[f"{branch}_eps_curve"]
                eps_axis.plot(
                    [float(e) for e in eps_curve],
                    list(eps_curve.values()),
                    style + "o",
                    color=colour,
                    label=label,
                    markersize=3,
                )
        steps_axis.set(
            xlabel="step",
            ylabel="unique prototypes (eps 0.025)",
            title=f"{dataset}: unique vs step",
            ylim=(0, num_prototypes * 1.05),
        )
        distance_axis.set(
            xlabel="step", ylabel="median nearest-neighbour distance", title=f"{dataset}: prototype spread vs step"
        )
        eps_axis.set(
            xscale="log",
            xlabel="eps",
            ylabel="unique prototypes",
            title=f"{dataset}: end of training",
            ylim=(0, num_prototypes * 1.05),
        )
        for axis in (steps_axis, distance_axis, eps_axis):
            axis.legend(fontsize=7)
        figure.tight_layout()
        output_dir.mkdir(parents=True, exist_ok=True)
        written.append(output_dir / f"cpu_study_unique_prototypes_{dataset}.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)
    return written


__all__ = ["load_results", "render_study_markdown", "run_summary", "write_report"]
