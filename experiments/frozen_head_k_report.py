"""Report of a frozen-head K sweep (``configs/experiments/frozen_head_k.yaml``): per K and variant, the
end-of-run unique share, prototypes used, cluster scores and training time, mean ± sd over seeds, their JSON
and one figure against K. Reads the records of run kind ``frozen_head`` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .markdown import (
    CLUSTER_COLUMNS,
    distinct,
    failed_left_out,
    finished,
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
)


def k_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per finished run of a K sweep: K, variant, seed and its end-of-run metrics."""
    rows = []
    for record in finished(records):
        result, final = record["result"], record["result"]["history"][-1]
        clusters = final.get("clusters") or {}
        rows.append(
            {
                "num_prototypes": result["config"]["num_prototypes"],
                "variant": record["axes"]["variant"],
                "seed": record["axes"]["seed"],
                "steps": result["config"]["steps"],
                "unique": final["unique"],
                "used": final["used"],
                "assignment_perplexity": final["assignment_perplexity"],
                "nn_distance_median": final["nn_distance"]["q0.5"],
                **{key: clusters.get(key) for key, _, _ in CLUSTER_COLUMNS[1:]},
                "train_seconds": result["train_seconds"],
            }
        )
    return sorted(rows, key=lambda row: (row["num_prototypes"], row["variant"], row["seed"]))


def _by_setting(rows: list[dict[str, Any]]) -> dict[tuple[int, str], list[dict[str, Any]]]:
    """A K sweep's rows by (K, variant), seeds in order."""
    return group_by(rows, lambda row: (row["num_prototypes"], row["variant"]))


def write_k_report(spec, records: list[dict[str, Any]], left_out: dict[str, str], report_dir: Path) -> list[Path]:
    """A K sweep (``configs/experiments/frozen_head_k.yaml``): ``frozen_head_k.md`` (one row per K and
    variant, mean ± sd over its seeds), ``.json`` (one row per run) and one figure."""
    rows = k_rows(records)
    left_out = failed_left_out(records, left_out)
    header = ["K", "variant", "seeds", "unique@0.025", "unique@0.1", "used", "NMI", "ARI", "purity"]
    header += ["clusters/class (90 %)", "train s"]

    def cells(group: list[dict[str, Any]], value, digits: int = 3, suffix: str = "") -> str:
        values = [value(row) for row in group]
        return "-" if None in values else mean_std(values, digits) + suffix

    table = [
        [
            f"{k:,}",
            variant,
            str(len(group)),
            cells(group, lambda row: 100 * row["unique"]["0.025"] / row["num_prototypes"], 1, "%"),
            cells(group, lambda row: 100 * row["unique"]["0.1"] / row["num_prototypes"], 1, "%"),
            cells(group, lambda row: row["used"], 0),
            *[cells(group, lambda row, key=key: row[key], digits) for key, _, digits in CLUSTER_COLUMNS[1:]],
            cells(group, lambda row: row["train_seconds"], 0),
        ]
        for (k, variant), group in _by_setting(rows).items()
    ]
    machines = distinct((record["environment"]["machine"] for record in finished(records)), "-")
    lines = [f"# {spec.settings.get('title', spec.name)}", "", f"Machine: {machines}.", ""]
    lines += markdown_table(header, table) + left_out_lines(left_out)
    outputs = report_outputs(spec, report_dir)
    markdown, data = report_dir / outputs["markdown"], report_dir / outputs["json"]
    figures = [plot_k(rows, report_dir / "figures" / f"{spec.name}.png")] if rows else []
    if figures:
        lines += [
            "",
            f"![unique share, prototypes used and NMI against K (mean ± sd over seeds)](figures/{figures[0].name})",
        ]
    markdown.write_text("\n".join(lines) + "\n")
    data.write_text(json.dumps({"runs": rows, "left_out": left_out}, indent=1) + "\n")
    return [markdown, data, *figures]


def plot_k(rows: list[dict[str, Any]], path: Path) -> Path:
    """Unique share, prototypes used and NMI against K, one line per variant (the mean over seeds, their
    sample sd as error bars)."""
    plt = pyplot()

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (
        ("unique@0.025 / K", lambda row: row["unique"]["0.025"] / row["num_prototypes"]),
        ("prototypes used (teacher arg-max)", lambda row: row["used"]),
        ("NMI of the arg-max clusters", lambda row: row["nmi"]),
    )
    # one line per method: KoLeo-proto's exact search at small K and its candidate search above are one method
    method = {row["variant"]: row["variant"].split("_candidates")[0] for row in rows}
    groups = _by_setting(rows)
    for axis, (label, value) in zip(axes, panels):
        at = {setting: [value(row) for row in group] for setting, group in groups.items()}
        for name in sorted(set(method.values())):
            points = [
                (k, values) for (k, variant), values in at.items() if method[variant] == name and None not in values
            ]
            searches = sorted(variant for variant in method if method[variant] == name and variant != name)
            legend = name + (" (candidate search at large K)" if searches else "")
            axis.errorbar(
                [k for k, _ in points],
                [mean(values) for _, values in points],
                yerr=[sample_sd(values) for _, values in points],
                fmt="o-",
                capsize=3,
                label=legend,
            )
        k_axis(axis, [row["num_prototypes"] for row in rows])
        axis.set(title=label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return save_figure(figure, path, dpi=100)
