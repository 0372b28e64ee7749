"""Report of a recipe search (``configs/experiments/cpu_recipe.yaml``): candidates scored on a validation split.

Reads ``pretrain_eval`` records whose axis ``candidate`` names one change from the reference recipe,
and writes one table (validation kNN@20, pretraining minutes, img/s, prototypes used at the end) best
first, a JSON of the same rows, and the figure of validation kNN@20 against pretraining minutes
(every kept checkpoint of a run with ``evaluation.curve``; the end point of the others).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .markdown import finished, left_out_lines, markdown_table, pyplot, report_outputs, save_figure
from .store import cpu_model


def recipe_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished runs as flat rows, best validation kNN@20 first."""
    rows = []
    for record in finished(records):
        if record["kind"] != "pretrain_eval":
            continue
        result = record["result"]
        settings, evaluation = result["settings"], result["evaluation"]
        teacher = result["final_prototypes"]["teacher/cls"]
        candidate = record["axes"]["candidate"]
        if settings["model"].get("koleo_proto_weight"):
            candidate += " + KoLeo-proto"
        if settings["model"].get("centring") == "sinkhorn_knopp" and "sinkhorn" not in candidate:
            candidate += " + Sinkhorn-Knopp"  # unless the candidate's own name says so
        end = {"minutes": result["pretraining"]["seconds"] / 60, "knn_top1": evaluation["knn_top1"]}
        curve = [
            {"minutes": point["seconds"] / 60, "knn_top1": point["knn_top1"]} for point in evaluation.get("curve", [])
        ]
        rows.append(
            {
                "name": record["name"],
                "candidate": candidate,
                "seed": record["axes"].get("seed"),
                "machine": cpu_model(record.get("environment", {}).get("machine", "")),  # minutes compare on one
                "epochs": settings.get("epochs"),
                "batch": settings["per_device_batch_size"],
                "minutes": end["minutes"],
                "images_per_second": result["pretraining"]["images_per_second"],
                "knn_top1": evaluation["knn_top1"],
                "knn_balanced": evaluation["knn_balanced"],
                "used": teacher["utilisation"]["used"],
                "perplexity": teacher["utilisation"]["assignment_perplexity"],
                "unique@0.025": teacher["unique_curve"]["0.025"],
                "num_prototypes": settings["model"]["num_prototypes"],
                "curve": curve or [end],
                "device": result["device"],
            }
        )
    return sorted(rows, key=lambda row: -row["knn_top1"])


COLUMNS = (  # (header, the cell of a row of recipe_runs)
    ("candidate", lambda run: run["candidate"]),
    ("seed", lambda run: str(run["seed"])),
    ("epochs", lambda run: f"{run['epochs']:g}"),
    ("batch", lambda run: str(run["batch"])),
    ("machine", lambda run: run["machine"]),
    ("minutes", lambda run: f"{run['minutes']:.1f}"),
    ("img/s", lambda run: f"{run['images_per_second']:.0f}"),
    ("val kNN@20", lambda run: f"{run['knn_top1']:.1f}"),
    ("val balanced", lambda run: f"{run['knn_balanced']:.1f}"),
    ("unique@0.025", lambda run: f"{run['unique@0.025']:,}"),
    ("used", lambda run: f"{run['used']:,} / {run['num_prototypes']:,}"),
    ("perplexity", lambda run: f"{run['perplexity']:.1f}"),
)


def render_markdown(runs: list[dict[str, Any]], title: str, left_out: dict[str, str]) -> str:
    if not runs:
        return f"No run of {title} has finished yet.\n"
    table = [[cell(run) for _, cell in COLUMNS] for run in runs]
    devices = ", ".join(sorted({run["device"] for run in runs}))
    minutes = "minutes of pretraining (evaluation not included), comparable on one machine only"
    lines = [f"{len(runs)} runs on {devices}, best first; {minutes}.", ""]
    lines += markdown_table([header for header, _ in COLUMNS], table) + left_out_lines(left_out)
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict[str, Any]], path: Path) -> Path:
    """Validation kNN@20 against pretraining minutes: each run with a curve as a line (one line style per
    machine, as minutes compare on one machine only), the runs scored at their end as grey points."""
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(10, 4.5))
    ends = [run["curve"][0] for run in runs if len(run["curve"]) == 1]
    if ends:
        label = f"{len(ends)} short candidates (end of run)"
        axis.scatter([p["minutes"] for p in ends], [p["knn_top1"] for p in ends], s=12, color="0.6", label=label)
    machines = sorted({run["machine"] for run in runs})
    for run in sorted(runs, key=lambda run: (run["candidate"], run["seed"] or 0)):
        if len(run["curve"]) > 1:
            axis.plot(
                [p["minutes"] for p in run["curve"]],
                [p["knn_top1"] for p in run["curve"]],
                marker="o",
                markersize=3,
                linestyle=("-", "--", ":", "-.")[machines.index(run["machine"]) % 4],
                label=f"{run['candidate']} ({run['epochs']:g} epochs, seed {run['seed']}, {run['machine']})",
            )
    axis.set_xlabel("pretraining minutes (one line style per machine)")
    axis.set_ylabel("kNN@20 top-1 on fashion_mnist:val")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(figure, path)


def write_report(spec, records: list[dict[str, Any]], left_out: dict[str, str], report_dir: Path) -> list[Path]:
    """The markdown table, its JSON and the curve figure the spec's ``outputs`` name, in ``report_dir``."""
    outputs = report_outputs(spec, report_dir)
    runs = recipe_runs(records)
    markdown, headline = report_dir / outputs["markdown"], report_dir / outputs["json"]
    markdown.write_text(render_markdown(runs, spec.settings.get("title", spec.name), left_out))
    headline.write_text(json.dumps({"runs": runs, "left_out": left_out}, indent=1) + "\n")
    written = [markdown, headline]
    if runs:
        written.append(plot_curves(runs, report_dir / "figures" / f"{outputs['figures']}_knn_vs_minutes.png"))
    return written


__all__ = ["recipe_runs", "render_markdown", "write_report"]
