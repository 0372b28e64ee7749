"""Report of the frozen-head study (``configs/experiments/frozen_head.yaml``): tables, the reading, plots.

Reads the study's records (run kind ``frozen_head``) and renders them; nothing here trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_koleo.prototypes import TRACKED_EPS

from .markdown import (
    CLUSTER_COLUMNS,
    cluster_cells,
    distinct,
    failed_left_out,
    finished,
    group_by,
    left_out_lines,
    markdown_table,
    mean,
    mean_std,
    pyplot,
    save_figure,
)

FIGURES = "figures/frozen_head"  # the study's figures, relative to its report folder


def load_results(records: list[dict[str, Any]], spec) -> dict[str, Any]:
    """The study's runs and backbones from its records, with how and where they were made.

    ``{"backbones": {name: description}, "runs": [{"backbone", "variant", "seed", **result}],
    "seconds", "command", "machine", "quick", "variants", "seeds", "backbone_origins", "notes"}``.
    """
    records = finished(records)
    backbones, runs = {}, []
    for record in records:
        result = dict(record["result"])
        backbones.setdefault(record["axes"]["backbone"], result.pop("backbone"))
        runs.append({key: record["axes"][key] for key in ("backbone", "variant", "seed")} | result)
    environments = [record["environment"] for record in records]
    origins = {record["axes"]["backbone"]: record["params"]["backbone"].get("origin") for record in records}
    notes = spec.settings.get("notes")
    variants = spec.settings["choices"]["variant"]
    return {
        "backbones": backbones,
        "runs": runs,
        "seconds": sum(record["seconds"] for record in records),
        "command": distinct(environment["command"] for environment in environments),
        "machine": distinct(environment["machine"] for environment in environments),
        "quick": spec.quick,
        "variants": {name: overlay["head"]["koleo_proto_weight"] for name, overlay in variants.items()},
        "seeds": sorted({run["seed"] for run in runs}),
        "backbone_origins": {name: origin for name, origin in origins.items() if origin},
        "notes": Path(notes).read_text() if notes and Path(notes).exists() else None,
    }


def write_report(spec, records: list[dict[str, Any]], left_out: dict[str, str], report_dir: Path) -> list[Path]:
    """``frozen_head.md`` and ``figures/frozen_head_*.png`` in ``report_dir``."""
    results = load_results(records, spec)
    report_dir.mkdir(parents=True, exist_ok=True)
    markdown = report_dir / "frozen_head.md"
    left_out_text = "".join(f"{line}\n" for line in left_out_lines(failed_left_out(records, left_out)))
    markdown.write_text(render_markdown(results) + left_out_text)
    return [markdown, *plot_study(results, report_dir / FIGURES)]


def _grouped(results: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    return group_by(results["runs"], lambda run: (run["backbone"], run["variant"]))


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (backbone, variant): end-of-run metrics of every seed, and when collapse began.

    ``first_step_below_99`` is the first evaluated step where unique@0.025 fell below 99 % of K
    (None if it never did), per seed.
    """
    rows = []
    for (backbone, variant), runs in _grouped(results).items():
        finals = [run["history"][-1] for run in runs]
        num_prototypes = runs[0]["config"]["num_prototypes"]
        first_below = [
            next((row["step"] for row in run["history"] if row["unique"]["0.025"] < 0.99 * num_prototypes), None)
            for run in runs
        ]
        rows.append(
            {
                "backbone": backbone,
                "variant": variant,
                "seeds": [run["seed"] for run in runs],
                "num_prototypes": num_prototypes,
                "steps": runs[0]["config"]["steps"],
                "unique": {f"{eps:g}": [final["unique"][f"{eps:g}"] for final in finals] for eps in TRACKED_EPS},
                "nn_distance_min": [final["nn_distance"]["q0"] for final in finals],
                "nn_distance_median": [final["nn_distance"]["q0.5"] for final in finals],
                **{key: [final[key] for final in finals] for key in ("used", "marginal_perplexity", "dino_loss")},
                "first_step_below_99": first_below,
                # the teacher's arg-max on the evaluation images as clusters (records from before it: none)
                "clusters": [final.get("clusters") for final in finals],
                "seconds": [run["seconds"] for run in runs],
            }
        )
    return rows


def render_markdown(results: dict[str, Any]) -> str:
    """``docs/frozen_head.md``: setup, end-of-run table, unique@0.025 over steps, figures, reading."""
    summary = summarise(results)
    lines = [
        "# Partial prototype collapse with a frozen backbone (head-only DINO)",
        "",
        f"Generated by `{results['command']}` on {results['machine']}; study wall time "
        f"{results['seconds'] / 60:.1f} min."
        + (" **Quick mode: a pipeline check, not a measurement.**" if results["quick"] else ""),
        "",
        "Only the DINO head trains (3-layer MLP -> L2-normalised bottleneck -> K weight-normalised prototypes); the "
        "backbone is frozen. Student and teacher heads see two augmented views of each image (random resized crop, "
        "flip, brightness), the student predicts each view's teacher distribution from the other view with "
        "`hf_koleo.losses.dino_loss`; the teacher is an EMA of the student and its logits are centred (EMA) and "
        "sharpened. KoLeo-proto adds `weight * koleo_proto_loss(student prototypes)`. Collapse is measured on the "
        "teacher's prototypes (`hf_koleo.prototypes`); *used* counts the prototypes that are the teacher's arg-max "
        "for at least one clean image of the evaluation set; *marginal perplexity* is exp of the entropy of the mean "
        "centred, sharpened teacher distribution (the marginal latent class distribution the loss matches).",
        "",
        "## Setup",
        "",
        "| backbone | input | images | mean cosine to mean input | head (hidden / bottleneck / K) | batch | steps | "
        "lr (AdamW, wd) | T student / teacher | centre / teacher EMA | eval images | setup (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, backbone in results["backbones"].items():
        head = backbone["head"]
        lines.append(
            f"| {name} | {backbone['description']} ({backbone['dim']}-d) | {backbone['n_images']:,} | "
            f"{backbone['mean_cosine_to_mean']:.2f} | "
            f"{head['hidden_size']} / {head['bottleneck_size']} / {head['num_prototypes']:,} | {head['batch_size']} | "
            f"{head['steps']:,} | {head['learning_rate']:g}, {head['weight_decay']:g} | "
            f"{head['student_temperature']:g} / {head['teacher_temperature']:g} | {head['centre_momentum']:g} / "
            f"{head['teacher_momentum']:g} | {head['eval_images']:,} | {backbone['setup_seconds']:.0f} |"
        )
    for name, origin in results["backbone_origins"].items():
        lines += ["", f"The trained backbone `{name}` came from: {origin}."]
    lines += [
        "",
        "Variants: "
        + ", ".join(f"{name} (KoLeo-proto weight {weight:g})" for name, weight in results["variants"].items())
        + ". "
        f"Seeds: {', '.join(str(seed) for seed in results['seeds'])} (head initialisation, image order and views).",
        "",
        "## End of training (teacher prototypes; mean ± std over seeds)",
        "",
        "| backbone | variant | K | unique @0.01 | @0.025 | @0.05 | @0.1 | min NN distance | median NN distance | "
        "used (arg-max) | marginal perplexity | DINO loss | first step < 99 % unique @0.025 | s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        unique = " | ".join(mean_std(row["unique"][f"{eps:g}"], 0) for eps in TRACKED_EPS)
        first = ", ".join("never" if step is None else f"{step:,}" for step in row["first_step_below_99"])
        lines.append(
            f"| {row['backbone']} | {row['variant']} | {row['num_prototypes']:,} | {unique} | "
            f"{mean_std(row['nn_distance_min'], 3)} | {mean_std(row['nn_distance_median'], 3)} | "
            f"{mean_std(row['used'], 0)} | {mean_std(row['marginal_perplexity'], 0)} | "
            f"{mean_std(row['dino_loss'], 3)} | "
            f"{first} | {mean_std(row['seconds'], 0)} |"
        )
    clustered = [row for row in summary if None not in row["clusters"]]
    if clustered:
        lines += [
            "",
            "## The teacher's arg-max as clusters of the evaluation images (mean ± std over seeds)",
            "",
            *markdown_table(
                ["backbone", "variant", *[label for _, label, _ in CLUSTER_COLUMNS]],
                [[row["backbone"], row["variant"], *cluster_cells(row["clusters"])] for row in clustered],
            ),
        ]
    lines += ["", "## Unique prototypes (eps 0.025) over training, per seed", ""]
    for (backbone, variant), runs in _grouped(results).items():
        steps = [row["step"] for row in runs[0]["history"]]
        shown = sorted({*steps[:: max(1, len(steps) // 8)], steps[-1]})
        table = []
        for run in runs:
            by_step = {row["step"]: row["unique"]["0.025"] for row in run["history"]}
            table.append([str(run["seed"]), *(f"{by_step[step]:,}" for step in shown)])
        lines += [
            f"**{backbone} / {variant}**",
            "",
            *markdown_table(["seed", *(f"{step:,}" for step in shown)], table),
            "",
        ]
    lines += [
        "## Figures",
        "",
        f"![unique prototypes and used prototypes vs step]({FIGURES}_unique_vs_step.png)",
        "",
        f"![unique prototypes vs eps at the end]({FIGURES}_eps_curve.png)",
        "",
        "## What the numbers say",
        "",
        *reading(summary),
        *comparison(summary),
        "",
        "## Against the paper and the first measurement",
        "",
        STUDY_CONTEXT,
    ]
    if results["notes"]:
        lines += ["", "## Reading (written after the run)", "", results["notes"].strip()]
    return "\n".join(lines) + "\n"


STUDY_CONTEXT = (
    "The experiment's first measurement (K = 4,096, batch 256, lr 5e-4, 3,000 steps, one seed) found unique@0.025 at "
    "4,096 until step ~1,200, then 1,165 (28 %) at step 3,000 with 412 prototypes used, and 4,096 of 4,096 with "
    "KoLeo-proto 0.1 (293 used). The full study here changes K, batch and lr to fit its CPU budget (see Setup), so "
    "compare fractions of K and the shape of the curves rather than step numbers. The backbone is frozen, so any "
    "merging is the head's own doing: the paper's mechanism (the DINO loss is met by moving prototypes, so "
    "nothing stops them from coinciding) in isolation. It says nothing about end-to-end pretraining, kNN or "
    "linear accuracy, or long-tailed data (the end-to-end studies answer those)."
)


def comparison(summary: list[dict[str, Any]]) -> list[str]:
    """Baseline against KoLeo-proto per backbone: unique fraction, arg-max use and marginal perplexity."""
    rows = {(row["backbone"], row["variant"]): row for row in summary}
    sentences = []
    for backbone in dict.fromkeys(row["backbone"] for row in summary):
        baseline, koleo = rows.get((backbone, "baseline")), rows.get((backbone, "koleo_proto"))
        if baseline is None or koleo is None:
            continue
        num_prototypes = baseline["num_prototypes"]
        sentences.append(
            f"- **{backbone}, baseline vs KoLeo-proto**: unique@0.025 "
            f"{100 * mean(baseline['unique']['0.025']) / num_prototypes:.1f} % vs "
            f"{100 * mean(koleo['unique']['0.025']) / num_prototypes:.1f} % of K, unique@0.1 "
            f"{100 * mean(baseline['unique']['0.1']) / num_prototypes:.1f} % vs "
            f"{100 * mean(koleo['unique']['0.1']) / num_prototypes:.1f} %; median nearest-neighbour distance "
            f"{mean(baseline['nn_distance_median']):.3f} vs {mean(koleo['nn_distance_median']):.3f}; prototypes "
            f"used {mean(baseline['used']):,.0f} vs {mean(koleo['used']):,.0f}; marginal perplexity "
            f"{mean(baseline['marginal_perplexity']):,.0f} vs {mean(koleo['marginal_perplexity']):,.0f}."
        )
    return sentences


def reading(summary: list[dict[str, Any]]) -> list[str]:
    """One sentence per (backbone, variant), computed from the runs (no hand-written numbers)."""
    sentences = []
    for row in summary:
        num_prototypes = row["num_prototypes"]
        unique = row["unique"]["0.025"]
        fraction = [count / num_prototypes for count in unique]
        began = [step for step in row["first_step_below_99"] if step is not None]
        onset = (
            f"unique@0.025 first fell below 99 % of K at step {', '.join(f'{step:,}' for step in began)}"
            if began
            else "unique@0.025 never fell below 99 % of K"
        )
        sentences.append(
            f"- **{row['backbone']} / {row['variant']}**: after {row['steps']:,} steps, "
            f"{mean_std(unique, 0)} of {num_prototypes:,} teacher prototypes unique at eps 0.025 "
            f"({mean_std([100 * value for value in fraction], 1)} %), {mean_std(row['unique']['0.1'], 0)} at eps 0.1; "
            f"{onset}; {mean_std(row['used'], 0)} prototypes used by the teacher arg-max, "
            f"marginal perplexity {mean_std(row['marginal_perplexity'], 0)}."
        )
    return sentences


def plot_study(results: dict[str, Any], figure_prefix: str | Path) -> list[Path]:
    """Two figures: unique (eps 0.025, 0.1), used prototypes and NN distances vs step; unique vs eps at the end."""
    plt = pyplot()

    colours = {"baseline": "tab:red", "koleo_proto": "tab:blue"}
    groups = _grouped(results)
    backbones = list(results["backbones"])
    paths = [Path(f"{figure_prefix}_unique_vs_step.png"), Path(f"{figure_prefix}_eps_curve.png")]
    figure, axes = plt.subplots(3, len(backbones), figsize=(6 * len(backbones), 10), squeeze=False)
    eps_figure, eps_axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 3.8), squeeze=False)
    for column, backbone in enumerate(backbones):
        num_prototypes = results["backbones"][backbone]["head"]["num_prototypes"]
        for (name, variant), runs in groups.items():
            if name != backbone:
                continue
            colour = colours.get(variant)
            for index, run in enumerate(runs):
                steps = [row["step"] for row in run["history"]]
                label = variant if index == 0 else None
                for eps, style in (("0.025", "-"), ("0.1", ":")):
                    values = [row["unique"][eps] for row in run["history"]]
                    axes[0, column].plot(
                        steps, values, style, color=colour, alpha=0.8, label=f"{label} (eps {eps})" if label else None
                    )
                axes[1, column].plot(steps, [row["used"] for row in run["history"]], color=colour, label=label)
                for quantile, style, statistic in (("q0.5", "-", "median"), ("q0", ":", "min")):
                    values = [row["nn_distance"][quantile] for row in run["history"]]
                    axes[2, column].plot(
                        steps, values, style, color=colour, label=f"{label} ({statistic})" if label else None
                    )
                curve = run["final_eps_curve"]
                eps_axes[0, column].plot(
                    [float(eps) for eps in curve], list(curve.values()), "o-", color=colour, label=label, markersize=3
                )
        axes[0, column].set(
            title=f"{backbone}: unique prototypes (K = {num_prototypes:,})",
            xlabel="step",
            ylabel="unique teacher prototypes",
            ylim=(0, num_prototypes * 1.05),
        )
        axes[1, column].set(title=f"{backbone}: prototypes used (teacher arg-max)", xlabel="step", ylabel="used")
        axes[2, column].set(
            title=f"{backbone}: nearest-neighbour distance between prototypes",
            xlabel="step",
            ylabel="Euclidean distance (unit prototypes)",
        )
        eps_axes[0, column].set(
            title=f"{backbone}: end of training",
            xscale="log",
            xlabel="eps",
            ylabel="unique teacher prototypes",
            ylim=(0, num_prototypes * 1.05),
        )
        for axis in (*axes[:, column], eps_axes[0, column]):
            axis.legend(fontsize=8)
            axis.grid(alpha=0.3)
    return [save_figure(fig, path, dpi=100) for fig, path in ((figure, paths[0]), (eps_figure, paths[1]))]
