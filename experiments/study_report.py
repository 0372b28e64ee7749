"""Report of a pretraining study (``configs/experiments/{cpu_study,gpu_study}.yaml``): one verdict per
claim, the recipe (or weight) chosen on a validation split, one table per dataset, plots, JSON.

Reads the study's records (runs of kind ``pretrain_eval`` with axes dataset, method, num_prototypes
and seed; the raw-pixel ``evaluate_pixels``) and renders them; nothing here trains or evaluates.
The stage named ``recipe`` holds the candidates scored on a validation split. The spec's
``outputs`` name the files (``markdown``, ``json``, ``figures`` prefix; default the spec's name).
The verdicts test the paper's claims against these targets (a spec's ``targets`` overrides them):

* features beat raw pixels: kNN@20 top-1 >= 90 on the Fashion-MNIST test split;
* the baseline partially collapses: teacher unique@0.025 <= 75 % of K at some K >= 16384;
* KoLeo-proto prevents it: >= 95 % of K unique where the baseline collapsed;
* KoLeo-proto helps on long-tailed data: kNN balanced accuracy gain >= 1 point on Fashion-MNIST-LT,
  larger than the seed spread.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from .markdown import (
    CLUSTER_COLUMNS,
    cluster_cells,
    failed_left_out,
    group_by,
    k_axis,
    left_out_lines,
    markdown_table,
    mean,
    mean_std,
    pyplot,
    report_outputs,
    sample_sd,
    save_figure,
    verdict_table,
)

HEADLINE_EPS = "0.025"
TABLE_EPS = ("0.01", "0.025", "0.05", "0.1")  # the eps the study logs every epoch
METRICS = (  # (key in a run's "evaluation", label)
    ("knn_top1", "kNN@20 top-1"),
    ("knn_balanced", "kNN@20 balanced acc."),
    ("linear_top1", "linear top-1"),
    ("linear_balanced", "linear balanced acc."),
    ("shot5", "5-shot top-1"),
)
Groups = dict[tuple[str, int, str, str], list[dict[str, Any]]]  # runs by (dataset, K, method, length)
GROUP_HEADER = ["K", "method", "seeds", "length"]  # the cells of a group of runs (_group_cells)
TARGETS = {"knn": 90.0, "collapsed": 0.75, "prevented": 0.95, "collapse_min_k": 16384, "lt_gain": 1.0}


def load_results(records: list[dict[str, Any]], left_out: dict[str, str] | None = None, spec=None) -> dict[str, Any]:
    """``{"runs": [flat run records], "pixels": {dataset: evaluation}, "left_out": {name: why}}`` from records.

    ``records`` are the store's records of the spec's current plan (:meth:`Store.records`); a run
    record is flattened to its axis values (dataset, method, num_prototypes, seed), name, stage and
    result. A failed run is left out with its error. With the ``spec``, the recipe's own group
    (``koleo_proto`` at the recipe's K) is the one the "beats pixels" claim tests.
    """
    runs, pixels, left_out = [], {}, failed_left_out(records, left_out or {})
    for record in records:
        if record.get("status") == "failed":
            continue
        if record["kind"] == "evaluate_pixels":
            pixels[record["axes"]["dataset"]] = record["result"]["evaluation"]
        else:
            runs.append({"name": record["name"], "stage": record["stage"], **record["axes"], **record["result"]})
    results = {"runs": runs, "pixels": pixels, "left_out": left_out}
    if spec is not None:
        results["targets"] = {**TARGETS, **(spec.settings.get("targets") or {})}
        results["recipe_group"] = {"num_prototypes": spec.settings["base"]["pretrain"]["model"]["num_prototypes"]}
    return results


def write_report(spec, records: list[dict[str, Any]], left_out: dict[str, str], report_dir: Path) -> list[Path]:
    """The markdown, the headline JSON and the figures the spec's ``outputs`` name, in ``report_dir``."""
    results = load_results(records, left_out, spec)
    outputs = report_outputs(spec, report_dir)
    markdown, headline = report_dir / outputs["markdown"], report_dir / outputs["json"]
    figures = plot_results(results, report_dir / "figures", outputs["figures"])
    text = render_markdown(results, spec.settings.get("title", "the study"))
    if figures:
        links = [f"![{path.stem.replace('_', ' ')}](figures/{path.name})" for path in figures]
        text += "\n### Figures\n\n" + "\n\n".join(links) + "\n"
    markdown.write_text(text)
    headline.write_text(json.dumps(results_json(results), indent=1) + "\n")
    return [markdown, headline, *figures]


def teacher_curve(run: dict[str, Any]) -> dict[str, int]:
    """The teacher CLS head's unique prototypes per eps at the end of the run."""
    return run["final_prototypes"]["teacher/cls"]["unique_curve"]


def _length(settings: dict[str, Any]) -> str:
    return f"{settings['max_steps']:,} steps" if settings.get("max_steps") else f"{settings.get('epochs', '-')} epochs"


def _order(run: dict[str, Any]) -> tuple:
    settings = run["settings"]
    length = (settings.get("max_steps") or 0, settings.get("epochs") or 0)
    return (run["dataset"], run["num_prototypes"], run["method"], length, run["seed"])


def group_runs(results: dict[str, Any]) -> Groups:
    """The runs but the recipe candidates by (dataset, K, method, training length), seeds in order: only runs
    of one length are pooled."""
    return group_by(
        sorted((run for run in results["runs"] if run["stage"] != "recipe"), key=_order),
        lambda run: (run["dataset"], run["num_prototypes"], run["method"], _length(run["settings"])),
    )


def _group_cells(key: tuple[str, int, str, str], group: list[dict[str, Any]]) -> list[str]:
    """The cells under :data:`GROUP_HEADER` of a group of :func:`group_runs`."""
    _, k, method, length = key
    return [f"{k:,}", method, str(len(group)), length]


def _values(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [run["evaluation"][key] for run in runs]


def _unique_fractions(runs: list[dict[str, Any]]) -> list[float]:
    return [teacher_curve(run)[HEADLINE_EPS] / run["num_prototypes"] for run in runs]


def _unique_evidence(groups: Groups) -> str:
    return "; ".join(
        f"{dataset} K = {k:,}, {length}: {mean_std([100 * f for f in _unique_fractions(runs)])} % unique@{HEADLINE_EPS}"
        for (dataset, k, _, length), runs in groups.items()
    )


def _beats_pixels(results: dict[str, Any], groups: Groups, targets: dict[str, float]) -> dict[str, str]:
    """kNN@20 of the recipe (KoLeo-proto at the recipe's K, chosen on validation) against raw pixels; without
    the config, the best group on the test split (an optimistic choice, said so)."""
    claim = {"claim": "features beat raw pixels"}
    pixels = results["pixels"].get("fashion_mnist", {}).get("knn_top1")
    candidates = {key: runs for key, runs in groups.items() if key[0] == "fashion_mnist"}
    recipe = results.get("recipe_group")
    if recipe is not None:
        how = "the recipe"
        ours = [item for item in candidates.items() if item[0][1:3] == (recipe["num_prototypes"], "koleo_proto")]
        key, runs = ours[0] if ours else (None, None)
    else:
        how = f"best of {len(candidates)} groups on the test split (optimistic)"
        key, runs = max(candidates.items(), key=lambda item: mean(_values(item[1], "knn_top1")), default=(None, None))
    if runs is None or pixels is None:
        return {**claim, "verdict": "not measured", "evidence": "no run" if runs is None else "no pixel baseline"}
    knn = mean(_values(runs, "knn_top1"))
    return {
        **claim,
        "verdict": "confirmed" if knn >= targets["knn"] and knn > pixels else "not confirmed",
        "evidence": f"kNN@20 top-1 {mean_std(_values(runs, 'knn_top1'))} ({how}: {key[2]}, K = {key[1]:,}, "
        f"{key[3]}, {len(runs)} seed(s)) vs raw pixels {pixels:.1f}; target >= {targets['knn']:g}",
    }


def _collapse(groups: Groups, targets: dict[str, float]) -> tuple[dict[str, str], Groups]:
    """The collapse verdict, and the groups of baselines (at K >= ``collapse_min_k``) that collapsed."""
    claim = {"claim": "the baseline partially collapses"}
    min_k = targets["collapse_min_k"]
    baselines = {key: runs for key, runs in groups.items() if key[2] == "baseline" and key[1] >= min_k}
    collapsed = {key: runs for key, runs in baselines.items() if mean(_unique_fractions(runs)) <= targets["collapsed"]}
    if not baselines:
        return {**claim, "verdict": "not measured", "evidence": "no run"}, collapsed
    target = f"target <= {100 * targets['collapsed']:g} % at K >= {min_k:,}"
    evidence = f"{_unique_evidence(collapsed or baselines)} ({target})"
    return {**claim, "verdict": "confirmed" if collapsed else "not confirmed", "evidence": evidence}, collapsed


def _prevention(groups: Groups, collapsed: Groups, targets: dict[str, float]) -> dict[str, str]:
    """Whether the KoLeo-proto twin of each collapsed baseline (same data, K and length) kept its prototypes."""
    claim = {"claim": "KoLeo-proto prevents it"}
    wanted = {(dataset, k, "koleo_proto", length) for dataset, k, _, length in collapsed}
    twins = {key: runs for key, runs in groups.items() if key in wanted}
    if not twins:
        reason = "no collapsed baseline to compare with" if not collapsed else "no KoLeo-proto run beside it"
        return {**claim, "verdict": "not measured", "evidence": reason}
    held = all(mean(_unique_fractions(runs)) >= targets["prevented"] for runs in twins.values())
    evidence = f"{_unique_evidence(twins)} (target >= {100 * targets['prevented']:g} %)"
    return {**claim, "verdict": "confirmed" if held else "not confirmed", "evidence": evidence}


def _long_tail_gain(groups: Groups, targets: dict[str, float]) -> dict[str, str]:
    """KoLeo-proto's kNN balanced accuracy gain on Fashion-MNIST-LT over the baseline, against the seed spread."""
    claim = {"claim": "KoLeo-proto helps on long-tailed data"}
    gains = []
    for (dataset, k, method, length), runs in groups.items():
        twin = groups.get((dataset, k, "koleo_proto", length))
        if dataset == "fashion_mnist_lt" and method == "baseline" and twin:
            koleo, base = _values(twin, "knn_balanced"), _values(runs, "knn_balanced")
            spread, seeds = max(sample_sd(base), sample_sd(koleo)), min(len(base), len(koleo))
            gains.append((f"{k:,}, {length}", mean(koleo) - mean(base), spread, seeds))
    if not gains:
        return {**claim, "verdict": "not measured", "evidence": "no run"}
    k, gain, spread, seeds = max(gains, key=lambda item: item[3])  # the K with the most seeds
    if seeds < 2:
        verdict = "not confirmed (one seed: no spread to compare with)"
    elif gain >= targets["lt_gain"] and gain > spread:
        verdict = "confirmed"
    elif gain <= -targets["lt_gain"] and -gain > spread:
        verdict = "contradicted"
    else:
        verdict = "not confirmed"
    others = ", ".join(f"K = {other}: {g:+.2f}" for other, g, _, _ in gains if other != k) or "none"
    evidence = f"K = {k}: kNN balanced accuracy gain {gain:+.2f} points, seed sd {spread:.2f} ({seeds} seeds)"
    return {**claim, "verdict": verdict, "evidence": f"{evidence}; other settings: {others}"}


def claims(results: dict[str, Any]) -> list[dict[str, str]]:
    """One ``{"claim", "verdict", "evidence"}`` per target; "not measured" when its runs are missing."""
    groups = group_runs(results)
    targets = results.get("targets", TARGETS)
    collapse, collapsed = _collapse(groups, targets)
    return [
        _beats_pixels(results, groups, targets),
        collapse,
        _prevention(groups, collapsed, targets),
        _long_tail_gain(groups, targets),
    ]


def recipe_rows(results: dict[str, Any]) -> list[list[str]]:
    """The recipe candidates best first by their score: kNN@20 top-1 on their validation split (a dataset whose
    test split is held out of training)."""
    runs = [run for run in results["runs"] if run["stage"] == "recipe"]
    return [
        [
            run["method"],
            _length(run["settings"]),
            f"{run['evaluation']['knn_top1']:.1f}",
            f"{run['evaluation']['linear_top1']:.1f}" if "linear_top1" in run["evaluation"] else "-",
            f"{teacher_curve(run)[HEADLINE_EPS]:,} / {run['num_prototypes']:,}",
            f"{run['pretraining']['seconds']:.0f}",
        ]
        for run in sorted(runs, key=lambda run: -run["evaluation"]["knn_top1"])
    ]


def render_markdown(results: dict[str, Any], title: str = "the study") -> str:
    runs = results["runs"]
    if not runs:
        return f"No run of {title} has finished yet.\n"
    devices = sorted({run["device"] for run in runs})
    minutes = sum(run["pretraining"]["seconds"] for run in runs) / 60
    summary = f"Runs: {len(runs)} on {', '.join(devices)}; pretraining time {minutes:.1f} min in all"
    lines = [f"{summary} (evaluation not included).", "", "### Claims", "", *verdict_table(claims(results))]
    lines += ["", "Only this study's runs count in these verdicts; [results.md](results.md) weighs every source's."]
    lines += left_out_lines(results.get("left_out"))
    recipe = recipe_rows(results)
    if recipe:
        lines += ["", "### Recipe (candidates scored on a validation split, never on the test split)", ""]
        lines += markdown_table(
            ["candidate", "length", "val kNN@20", "val linear", f"unique@{HEADLINE_EPS}", "pretraining s"], recipe
        )
    groups = group_runs(results)
    for dataset in sorted({key[0] for key in groups}):
        lines += ["", f"### {dataset}", ""]
        rows = []
        of_dataset = {key: group for key, group in groups.items() if key[0] == dataset}
        for key, group in of_dataset.items():
            curve_cells = [mean_std([teacher_curve(run)[eps] for run in group], 0) for eps in TABLE_EPS]
            teachers = [run["final_prototypes"]["teacher/cls"] for run in group]
            prototype_cells = [
                mean_std([teacher["utilisation"]["used"] for teacher in teachers], 0),
                mean_std([teacher["nn_distance_quantiles"]["q0.5"] for teacher in teachers], 3),
            ]
            metric_cells = [mean_std(_values(group, metric)) for metric, _ in METRICS]
            rows.append([*_group_cells(key, group), *curve_cells, *prototype_cells, *metric_cells])
        pixels = results["pixels"].get(dataset)
        if pixels:
            cells = [f"{pixels[key]:.1f}" if key in pixels else "-" for key, _ in METRICS]
            rows.append(["-", "raw pixels", "-", "-", *["-"] * (len(TABLE_EPS) + 2), *cells])
        header = [*GROUP_HEADER, *[f"unique@{eps}" for eps in TABLE_EPS], "used (arg-max)", "NN median"]
        lines += markdown_table([*header, *[label for _, label in METRICS]], rows)
        lines += cluster_table(dataset, of_dataset)
    return "\n".join(lines) + "\n"


def cluster_table(dataset: str, groups: Groups) -> list[str]:
    """The teacher's arg-max on the test images as a clustering, per group of ``dataset``'s runs
    (:func:`group_runs`); on an imbalanced training set, whether its rarest classes own clusters (where
    they are the majority) and what share of their images sit in them, and which classes own none
    (absorbed). ``[]`` when the runs were evaluated without clusters."""
    if not groups or any("clusters" not in run["evaluation"] for group in groups.values() for run in group):
        return []
    counts = next(iter(groups.values()))[0]["evaluation"].get("rarest_classes", {})
    rare = list(counts) if len(set(counts.values())) > 1 else []  # balanced: no rare class
    rows = []
    for key, group in groups.items():
        clusters = [run["evaluation"]["clusters"] for run in group]
        cells = cluster_cells(clusters)
        for label in rare:
            own = mean_std([c["own_clusters"][label] for c in clusters], 0)
            cells.append(f"{own} ({mean_std([100 * c['in_own_clusters'][label] for c in clusters], 0)} %)")
        absorbed = [", ".join(label for label, n in c["own_clusters"].items() if n == 0) or "none" for c in clusters]
        rows.append([*_group_cells(key, group), *cells, " / ".join(dict.fromkeys(absorbed))])
    header = [*GROUP_HEADER, *[label for _, label, _ in CLUSTER_COLUMNS]]
    header += [f"class {label} ({counts[label]:,} training images): own clusters (its share in them)" for label in rare]
    title = f"### {dataset}: the teacher's arg-max on the test images as clusters"
    return ["", title, "", *markdown_table([*header, "classes owning no cluster (per seed)"], rows)]


def results_json(results: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, one entry per run, plus the pixels and the verdicts (``docs/results.json``)."""
    return {
        "runs": [
            {
                "dataset": run["dataset"],
                "method": run["method"],
                "stage": run["stage"],
                "num_prototypes": run["num_prototypes"],
                "seed": run["seed"],
                "epochs": run["settings"].get("epochs"),
                "max_steps": run["settings"].get("max_steps"),
                "device": run["device"],
                "pretraining_seconds": run["pretraining"]["seconds"],
                "unique_prototypes": teacher_curve(run),
                **run["evaluation"],
            }
            for run in results["runs"]
        ],
        "pixels": results["pixels"],
        "claims": claims(results),
    }


def plot_results(results: dict[str, Any], figures_dir: Path, prefix: str = "study") -> list[Path]:
    """Unique prototypes vs epoch, eps curves at the end, kNN / balanced accuracy vs K; the PNG paths."""
    groups = group_runs(results)
    if not groups:
        return []
    plt = pyplot()
    datasets = sorted({key[0] for key in groups})
    ks = sorted({key[1] for key in groups})
    methods = sorted({key[2] for key in groups})
    lengths = sorted({key[3] for key in groups}, key=lambda length: -sum(key[3] == length for key in groups))
    colours = {method: plt.get_cmap("tab10")(index) for index, method in enumerate(methods)}
    styles = {length: "-" if index == 0 else ":" for index, length in enumerate(lengths)}  # the usual length solid

    def label(method: str, length: str, k: int | None = None) -> str:
        return method + (f" K = {k:,}" if k else "") + (f", {length}" if length != lengths[0] else "")

    written = []
    figure, axes = plt.subplots(len(datasets), len(ks), figsize=(4.5 * len(ks), 3.5 * len(datasets)), squeeze=False)
    key = f"prototypes/teacher_cls/unique@{float(HEADLINE_EPS):g}"
    for (dataset, k, method, length), runs in groups.items():
        axis = axes[datasets.index(dataset)][ks.index(k)]
        for run in runs:
            history = [item for item in run["prototype_history"] if key in item]
            axis.plot(
                [item["epoch"] for item in history],
                [item[key] / k for item in history],
                styles[length],
                color=colours[method],
                alpha=1.0 if run["seed"] == 0 else 0.4,
                label=label(method, length) if run["seed"] == 0 else None,
            )
    for row, dataset in enumerate(datasets):
        for column, k in enumerate(ks):
            axis = axes[row][column]
            axis.set(title=f"{dataset}, K = {k:,}", xlabel="epoch", ylabel=f"unique@{HEADLINE_EPS} / K", ylim=(0, 1.05))
            if axis.lines:
                axis.legend(fontsize=7)
            else:  # a pair of the plan that has not run yet
                axis.text(0.5, 0.5, "not run yet", transform=axis.transAxes, ha="center", color="grey")
    written.append(save_figure(figure, figures_dir / f"{prefix}_unique_vs_epoch.png"))

    figure, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for (dataset, k, method, length), runs in groups.items():
        curve = teacher_curve(runs[0])
        axes[0][datasets.index(dataset)].plot(
            [float(eps) for eps in curve],
            [mean([teacher_curve(run)[eps] / k for run in runs]) for eps in curve],
            "o" + styles[length],
            color=colours[method],
            alpha=0.4 + 0.6 * ks.index(k) / max(1, len(ks) - 1),
            label=label(method, length, k),
            markersize=3,
        )
    for column, dataset in enumerate(datasets):
        axis = axes[0][column]
        axis.set(xscale="log", xlabel="eps", ylabel="unique / K", title=f"{dataset}: end of training", ylim=(0, 1.05))
        axis.legend(fontsize=7)
    written.append(save_figure(figure, figures_dir / f"{prefix}_eps_curves.png"))

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for column, (metric, title) in enumerate((("knn_top1", "kNN@20 top-1"), ("knn_balanced", "kNN@20 balanced acc."))):
        axis = axes[0][column]
        for dataset, method, length in itertools.product(datasets, methods, lengths):
            present = [k for k in ks if (dataset, k, method, length) in groups]
            points = [(k, _values(groups[(dataset, k, method, length)], metric)) for k in present]
            if points:
                axis.errorbar(
                    [k for k, _ in points],
                    [mean(values) for _, values in points],
                    yerr=[sample_sd(values) for _, values in points],
                    marker="o" if length == lengths[0] else "s",
                    capsize=3,
                    color=colours[method],
                    linestyle="-" if dataset == "fashion_mnist" else "--",
                    label=f"{dataset} {label(method, length)}",
                )
        k_axis(axis, ks, "K (prototypes)")
        axis.set(ylabel=title, title=f"{title} vs K")
        axis.legend(fontsize=7)
    written.append(save_figure(figure, figures_dir / f"{prefix}_accuracy_vs_k.png"))
    return written


__all__ = ["claims", "load_results", "plot_results", "render_markdown", "results_json", "write_report"]
