"""The reports' toolkit: markdown tables, mean ± sd cells, generated regions inside hand-written docs, figures."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: header, separator, one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean, summed in order (``statistics.fmean`` can differ in the last bit)."""
    return sum(float(value) for value in values) / len(values)


def sample_sd(values: Sequence[float]) -> float:
    """The sample standard deviation; 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    centre = mean(values)
    return math.sqrt(sum((float(value) - centre) ** 2 for value in values) / (len(values) - 1))


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    """``mean ± sample sd`` of the values (the mean alone for one value), thousands separated."""
    if len(values) == 1:
        return f"{mean(values):,.{digits}f}"
    return f"{mean(values):,.{digits}f} ± {sample_sd(values):,.{digits}f}"


def group_by(items: Iterable[T], key: Callable[[T], Hashable]) -> dict[Hashable, list[T]]:
    """``{key(item): [items]}``, groups and their items in the order they come."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def distinct(values: Iterable[str], empty: str = "") -> str:
    """The values joined with ``"; "``, each once, in order (``empty`` for none): machines, commands."""
    return "; ".join(dict.fromkeys(values)) or empty


# The teacher's arg-max as clusters (hf_koleo.evaluation.clusters): (key in its scores, label, digits)
CLUSTER_COLUMNS = (
    ("clusters_used", "clusters used", 0),
    ("nmi", "NMI", 3),
    ("ari", "ARI", 3),
    ("purity", "purity", 3),
    ("clusters_for_coverage_mean", "clusters for 90 % of a class", 1),
)


def cluster_cells(scores: Sequence[dict]) -> list[str]:
    """One cell per :data:`CLUSTER_COLUMNS`: mean ± sd over the runs' cluster scores."""
    return [mean_std([score[key] for score in scores], digits) for key, _, digits in CLUSTER_COLUMNS]


def finished(records: Sequence[dict]) -> list[dict]:
    """The records of runs that finished (``status: done``), in order."""
    return [record for record in records if record.get("status") == "done"]


def failed_left_out(records: Sequence[dict], left_out: dict[str, str]) -> dict[str, str]:
    """``left_out`` and every failed record (``{name: "failed: error"}``): for a report without failed rows."""
    failed = {record["name"]: f"failed: {record['error']}" for record in records if record.get("status") == "failed"}
    return {**left_out, **failed}


def left_out_lines(left_out: dict[str, str]) -> list[str]:
    """``["", "Left out: name (why); ..."]`` for the records a report does not use; none: ``[]``."""
    if not left_out:
        return []
    return ["", "Left out: " + "; ".join(f"{name} ({why})" for name, why in left_out.items()) + "."]


def verdict_list(verdicts: Sequence[dict[str, str]]) -> list[str]:
    """Verdicts (``claim``, ``verdict``, ``evidence``, as every report makes them) as a bullet list."""
    return [f"- {item['claim']}: {item['evidence']}: {item['verdict']}." for item in verdicts]


def verdict_table(verdicts: Sequence[dict[str, str]]) -> list[str]:
    """Verdicts as a markdown table: claim, verdict, evidence."""
    return markdown_table(
        ["claim", "verdict", "evidence"], [[v["claim"], v["verdict"], v["evidence"]] for v in verdicts]
    )


def report_outputs(spec, report_dir: Path) -> dict[str, str]:
    """The file names a report writes in ``report_dir`` (created): the spec's ``outputs`` over the defaults,
    ``<spec name>.md``, ``<spec name>.json`` and the figures' prefix ``<spec name>``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    return {
        "markdown": f"{spec.name}.md",
        "json": f"{spec.name}.json",
        "figures": spec.name,
        **(spec.settings.get("outputs") or {}),
    }


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"


def write_generated(
    path: Path, sections: dict[str, list[str]], header: Sequence[str] = (), titles: dict[str, str] | None = None
) -> None:
    """Put each section's lines between its markers in ``path``, keeping the text around them.

    A doc mixes hand-written reading with generated tables: a report rewrites only the regions
    ``<!-- generated: NAME -->`` ... ``<!-- end generated: NAME -->``. A section without markers in
    the file is appended (with them, under ``## titles[NAME]``); a missing file starts from ``header``.
    """
    text = path.read_text() if path.exists() else "\n".join(header) + "\n"
    for name, lines in sections.items():
        begin, end = _markers(name)
        block = "\n".join([begin, *lines, end])
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _, block=block: block, text)
        else:
            title = f"## {titles[name]}\n\n" if titles and name in titles else ""
            text = text.rstrip("\n") + "\n\n" + title + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display on a CI machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def k_axis(axis, ks, label: str = "K") -> None:
    """A log-scaled axis of prototype counts, ticked at exactly ``ks`` (no crowded minor labels)."""
    ks = sorted(set(ks))
    axis.set_xscale("log", base=2)
    axis.set_xticks(ks, [f"{k:,}" for k in ks])
    axis.minorticks_off()
    axis.set_xlabel(label)


def save_figure(figure, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; its path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
