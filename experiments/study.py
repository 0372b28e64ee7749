"""The KoLeo-proto study: baseline vs KoLeo-proto pretraining on balanced and long-tailed data.

For each dataset and seed, two runs identical but for ``koleo_proto_weight`` (0, and the weight
chosen by a short sweep scored on a validation split carved from the *training* data), then:
unique prototypes of teacher and student over training and at the end (eps curve), utilisation,
marginal-distribution entropy, weighted kNN, linear probe, 1- and 5-shot, balanced accuracy, and
the raw-pixel baseline. Writes ``results.json``, ``results.md`` and PNG plots to ``output_dir``.

Run by ``scripts/study_koleo_proto.py``; every number in ``results.md`` is read from a run's
``prototype_report.json`` / ``metrics.jsonl`` or computed by the evaluation protocols.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from experiments.markdown import mean_std
from experiments.pretrain_eval import evaluate_run
from experiments.spec import merge_settings
from hf_koleo import KoLeoDinoConfig
from hf_koleo.evaluation.features import extract_features
from hf_koleo.evaluation.knn import weighted_knn_predict
from hf_koleo.evaluation.linear import stratified_split
from hf_koleo.evaluation.metrics import classification_metrics
from hf_koleo.training.arguments import PretrainingArguments, arguments_from_settings
from hf_koleo.training.trainer import pretrain

logger = logging.getLogger(__name__)
VARIANTS = ("baseline", "koleo_proto")


def load_study_config(path: str | Path, quick: bool = False) -> dict[str, Any]:
    """The study YAML; ``quick`` merges its ``quick:`` section over the rest (CI-sized)."""
    config = yaml.safe_load(Path(path).read_text())
    quick_overrides = config.pop("quick", {}) or {}
    return merge_settings(config, quick_overrides) if quick else config


def run_arguments(
    config: dict, dataset: str, output_dir: Path, weight: float, seed: int, max_steps: int
) -> tuple[PretrainingArguments, KoLeoDinoConfig]:
    """One study run's arguments and model config: the shared ``run``/``model`` sections, this run's data,
    folder, seed, steps and KoLeo-proto weight (through the library's one dict -> run path)."""
    settings = {
        **config["run"],
        "data": config["datasets"][dataset]["train"],
        "output_dir": str(output_dir),
        "seed": seed,
        "max_steps": max_steps,
        "report_to": "none",
        "overwrite_output_dir": True,  # an unfinished run (no report yet) starts over, never mixes with the new one
        "model": {**config["model"], "koleo_proto_weight": weight},
    }
    return arguments_from_settings(settings, source=f"study run {output_dir}")


def _run(config: dict, dataset: str, output_dir: Path, weight: float, seed: int, max_steps: int) -> Path:
    """Pretrain once; returns the run folder (skipped when its final report already exists)."""
    arguments, model_config = run_arguments(config, dataset, output_dir, weight, seed, max_steps)
    if not (output_dir / "prototype_report.json").exists():
        started = time.perf_counter()
        pretrain(arguments, model_config)
        (output_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}")
    return output_dir


def validation_knn(model_dir: str, train_data: str, limit: int, seed: int = 0) -> float:
    """kNN (k = 20) balanced accuracy on a split held out from the training data (no test data)."""
    features = extract_features(model_dir, train_data, limit=limit, progress=False)
    fit, held_out = stratified_split(features.labels, 0.2, seed)
    predictions = weighted_knn_predict(features.cls[fit], features.labels[fit], features.cls[held_out], (20,))
    return classification_metrics(predictions[20], features.labels[held_out], use_evaluate=False)["balanced_accuracy"]


def prototype_summary(run_dir: Path, report_images: torch.Tensor | None = None) -> dict[str, Any]:
    report = json.loads((run_dir / "prototype_report.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curves = {
        key: [(row["step"], row[key]) for row in history if key in row]
        for key in (
            "prototypes/teacher_cls/unique@0.025",
            "prototypes/student_cls/unique@0.025",
            "prototypes/teacher_cls/nn_distance_q0.5",
            "prototypes/student_cls/nn_distance_q0.5",
        )
    }
    teacher = report["teacher/cls"]
    return {
        "teacher_unique": teacher["unique_prototypes"],
        "student_unique": report["student/cls"]["unique_prototypes"],
        "teacher_eps_curve": teacher["unique_curve"],
        "student_eps_curve": report["student/cls"]["unique_curve"],
        "used": teacher["utilisation"]["used"],
        "perplexity": teacher["utilisation"]["assignment_perplexity"],
        "marginal_entropy": teacher["marginal_entropy"],
        "max_entropy": teacher["max_marginal_entropy"],
        "nn_median": teacher["nn_distance_quantiles"]["q0.5"],
        "curves": curves,
        "wall_seconds": float((run_dir / "wall_seconds.txt").read_text())
        if (run_dir / "wall_seconds.txt").exists()
        else None,
    }


def run_study(config: dict[str, Any], output_dir: str | Path) -> dict[str, Any]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"config": config, "sweep": {}, "runs": {}, "pixels": {}}
    sweep = config["sweep"]
    sweep_dataset = config["datasets"][sweep["dataset"]]
    for weight in sweep["weights"]:
        run_dir = _run(config, sweep["dataset"], output_dir / "sweep" / f"w{weight:g}", weight, 0, sweep["max_steps"])
        results["sweep"][f"{weight:g}"] = {
            "validation_knn_balanced": validation_knn(
                str(run_dir / "backbone"), sweep_dataset["train"], sweep["validation_limit"]
            ),
            "teacher_unique": prototype_summary(run_dir)["teacher_unique"],
        }
    best_weight = float(
        max(
            results["sweep"],
            key=lambda w: (results["sweep"][w]["validation_knn_balanced"], results["sweep"][w]["teacher_unique"]),
        )
    )
    results["chosen_weight"] = best_weight
    for dataset_name, dataset in config["datasets"].items():
        results["pixels"][dataset_name] = evaluate_run("pixels", dataset, config["evaluation"])
        for seed in config["seeds"]:
            for variant, weight in zip(VARIANTS, (0.0, best_weight)):
                run_dir = _run(
                    config,
                    dataset_name,
                    output_dir / dataset_name / variant / f"seed{seed}",
                    weight,
                    seed,
                    config["run"]["max_steps"],
                )
                record = {
                    "weight": weight,
                    **prototype_summary(run_dir),
                    **evaluate_run(str(run_dir / "backbone"), dataset, config["evaluation"]),
                }
                results["runs"].setdefault(dataset_name, {}).setdefault(variant, []).append(record)
                logger.info(
                    "%s %s seed %d: %s",
                    dataset_name,
                    variant,
                    seed,
                    {k: v for k, v in record.items() if k not in ("curves",)},
                )
    results["wall_seconds"] = time.perf_counter() - started
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_study(results, output_dir)
    (output_dir / "results.md").write_text(render_study_markdown(results))
    return results


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
    lines = [
        f"KoLeo-proto weight chosen by the sweep: **{results['chosen_weight']:g}** "
        "(validation: kNN balanced accuracy on 20 % held out from the training data).",
        "",
        "| sweep weight | validation kNN balanced accuracy | teacher unique prototypes |",
        "|---|---|---|",
    ]
    lines += [
        f"| {w} | {row['validation_knn_balanced']:.1f} | {row['teacher_unique']} |"
        for w, row in results["sweep"].items()
    ]
    for dataset, variants in results["runs"].items():
        pixels = results["pixels"][dataset]
        lines += ["", f"### {dataset}", "", "| metric | baseline | KoLeo-proto | raw pixels |", "|---|---|---|---|"]
        for key, label, digits in METRIC_ROWS:
            cells = [mean_std([run[key] for run in variants[variant]], digits) for variant in VARIANTS]
            lines.append(
                f"| {label} | {cells[0]} | {cells[1]} | {pixels[key]:.1f} |"
                if key in pixels
                else f"| {label} | {cells[0]} | {cells[1]} | - |"
            )
        walls = [run["wall_seconds"] for variant in VARIANTS for run in variants[variant] if run["wall_seconds"]]
        if walls:
            lines.append(f"| pretraining wall time per run (s) | {mean_std(walls)} | | |")
    lines += ["", f"Study wall time: {results['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot_study(results: dict[str, Any], output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for dataset, variants in results["runs"].items():
        figure, (steps_axis, distance_axis, eps_axis) = plt.subplots(1, 3, figsize=(16, 4))
        num_prototypes = results["config"]["model"]["num_prototypes"]
        for variant, colour in zip(VARIANTS, ("tab:red", "tab:blue")):
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
        figure.savefig(output_dir / f"unique_prototypes_{dataset}.png", dpi=110)
        plt.close(figure)


__all__ = ["load_study_config", "run_study"]
