"""The few lines a pretraining run ends with: what it did, where its outputs are, how many prototypes survive.

The full prototype report stays in ``prototype_report.json``; the console gets the headline numbers
and the unique-prototype curve (prototypes at least ``eps`` apart, see :mod:`hf_koleo.prototypes`)
as a small table, one column per prototype head.
"""

from __future__ import annotations

from typing import Any


def unique_prototype_table(report: dict[str, Any]) -> str:
    """The report's unique-prototype curves as a table: one row per eps, one column per head.

    Args:
        report: the output of :func:`hf_koleo.prototypes.prototype_report` (``"<branch>/<head>"``
            entries with a ``unique_curve`` mapping eps strings to counts, and ``"config"``).
    """
    heads = [name for name, entry in report.items() if isinstance(entry, dict) and "unique_curve" in entry]
    if not heads:
        return ""
    eps_values = sorted({eps for head in heads for eps in report[head]["unique_curve"]}, key=float)
    headline = f"{report.get('config', {}).get('eps', report[heads[0]]['eps']):g}"
    widths = [max(len(head), 5) for head in heads]
    lines = ["     eps  " + "  ".join(head.rjust(width) for head, width in zip(heads, widths))]
    for eps in eps_values:
        counts = [str(report[head]["unique_curve"].get(eps, "-")).rjust(width) for head, width in zip(heads, widths)]
        marker = "*" if eps == headline else " "
        lines.append(f"{eps:>8}{marker} " + "  ".join(counts))
    return "\n".join(lines)


def prototype_line(step: int, metrics: dict[str, Any], num_prototypes: int, eps_values) -> str:
    """The console's line for one prototype-statistics step, from :func:`hf_koleo.prototypes.prototype_metrics`.

    ``step 500 · unique@0.025 teacher 4,093/4,096 · used 412 (perplexity 88.1) · NN-distance median 0.912``:
    both kinds of collapse side by side (prototypes merging, assignments concentrating).
    """
    eps = 0.025 if 0.025 in eps_values else eps_values[0]
    prefix = "prototypes/teacher_cls"
    unique = metrics.get(f"{prefix}/unique@{eps:g}")
    parts = [f"step {step}"]
    if unique is not None:
        parts.append(f"unique@{eps:g} teacher {unique:,}/{num_prototypes:,}")
    if f"{prefix}/used" in metrics:
        perplexity = metrics.get(f"{prefix}/assignment_perplexity")
        parts.append(f"used {metrics[f'{prefix}/used']:,}" + (f" (perplexity {perplexity:.1f})" if perplexity else ""))
    median = metrics.get(f"{prefix}/nn_distance_q0.5")
    if median is not None:
        parts.append(f"NN-distance median {median:.3f}")
    return " · ".join(parts)


def format_summary(summary: dict[str, Any]) -> str:
    """A short human summary of :func:`hf_koleo.training.trainer.pretrain`'s result.

    Steps, images seen, images per second, corrupt records skipped, the paths of the last
    checkpoint, the exported backbone and the report, then :func:`unique_prototype_table`.
    """
    if summary.get("stopped"):
        cause = "--max_time" if summary["stopped"] == "max_time" else summary["stopped"]
        return (
            f"pretraining stopped by {cause} at step {summary['steps']} of {summary['total_steps']} "
            f"({summary['images_seen']} images seen, {summary.get('images_per_second', 0.0):.1f} img/s); "
            f"--resume latest goes on from {summary.get('checkpoint')}"
        )
    lines = [
        f"pretraining done: {summary['steps']} steps, {summary['images_seen']} images seen, "
        f"{summary.get('images_per_second', 0.0):.1f} img/s, "
        f"{summary.get('corrupt_records', 0)} corrupt records skipped"
    ]
    for label, key in (("checkpoint", "checkpoint"), ("backbone", "backbone"), ("report", "report_path")):
        if summary.get(key):
            lines.append(f"  {label:<11}{summary[key]}")
    report = summary.get("prototype_report")
    table = unique_prototype_table(report) if report else ""
    if table:
        config = report.get("config", {})
        lines.append(
            f"unique prototypes of {config.get('num_prototypes', '?')} (at least eps apart; * the headline eps):"
        )
        lines.append(table)
    for alarm in summary.get("collapse_alarms") or []:
        lines.append(f"collapse alarm, {alarm['message']}")
    return "\n".join(lines)
