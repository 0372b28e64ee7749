"""What a run leaves in its ``output_dir``, and the rules that keep two runs from mixing there.

A run writes ``checkpoints/``, ``metrics.jsonl``, the TensorBoard folder ``hf_koleo/``, and when it
ends ``backbone/`` and ``prototype_report.json``. A fresh run (no ``--resume``) refuses a folder
that holds another run's outputs, unless ``--overwrite_output_dir`` asks to remove them first; a
resumed run cuts ``metrics.jsonl`` back to the step it resumes from, so the log holds one curve.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# What marks a folder as holding an earlier run: a run that failed in its set-up leaves none of these.
RUN_OUTPUTS = ("checkpoints", METRICS_FILE, "backbone", "prototype_report.json")
# Also removed by --overwrite_output_dir: TensorBoard's run folder (named after the tracker project).
TRACKER_OUTPUTS = ("hf_koleo",)
TRACKER_FILE_PREFIX = "events.out.tfevents"


class OutputDirInUseError(ValueError):
    """A fresh run was pointed at a folder holding an earlier run's outputs."""


def earlier_outputs(output_dir: str | os.PathLike) -> list[Path]:
    """The outputs of an earlier run in ``output_dir`` (an empty ``checkpoints/`` does not count)."""
    folder = Path(output_dir)
    found = []
    for name in RUN_OUTPUTS:
        path = folder / name
        if path.is_dir() and not any(path.iterdir()):
            continue
        if path.exists():
            found.append(path)
    return found


def claim_output_dir(output_dir: str | os.PathLike, resume: str, overwrite: bool, is_main_process: bool) -> None:
    """Make sure a fresh run does not mix with an earlier one in ``output_dir``.

    Every process checks (the folder is shared, nothing writes to it yet); with ``overwrite`` only
    the main process looks and removes the earlier outputs (the tracker folder ``hf_koleo/`` only
    when it holds nothing but TensorBoard event files). A run that resumes keeps them.

    Raises:
        OutputDirInUseError: the folder holds an earlier run's outputs and neither ``resume`` nor
            ``overwrite`` was given.
    """
    if resume or (overwrite and not is_main_process):
        return  # with overwrite, only the main process looks: the others would race its removal
    found = earlier_outputs(output_dir)
    if not found:
        return
    names = _names(found)
    if not overwrite:
        raise OutputDirInUseError(
            f"--output_dir {output_dir} holds an earlier run's outputs ({names}): continue that run with "
            "--resume latest, start over with --overwrite_output_dir (removes them), or choose another --output_dir"
        )
    for name in TRACKER_OUTPUTS:
        path = Path(output_dir) / name
        if path.exists():
            foreign = _not_tracker_files(path)
            if foreign:
                raise OutputDirInUseError(
                    f"--overwrite_output_dir: {path} holds files a tracker did not write ({_names(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}); move them, or choose another --output_dir"
                )
            found.append(path)
    names = _names(found)
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    logger.warning("--overwrite_output_dir: removed the earlier run's %s from %s", names, output_dir)


def _not_tracker_files(folder: Path) -> list[Path]:
    """Files in a tracker's folder that TensorBoard did not write (``events.out.tfevents.*``)."""
    if not folder.is_dir():
        return [folder]
    return sorted(
        path for path in folder.rglob("*") if path.is_file() and not path.name.startswith(TRACKER_FILE_PREFIX)
    )


def _names(paths: list[Path]) -> str:
    return ", ".join(f"{path.name}/" if path.is_dir() else path.name for path in paths)


def append_metrics(output_dir: str | os.PathLike, step: int, metrics: dict[str, Any]) -> None:
    """One JSON line ``{"step": step, **metrics}`` at the end of ``metrics.jsonl`` (main process only)."""
    with open(Path(output_dir) / METRICS_FILE, "a") as handle:
        handle.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (none when it is missing); a line cut short by a kill is skipped."""
    path = Path(output_dir) / METRICS_FILE
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def cut_metrics(output_dir: str | os.PathLike, step: int) -> int:
    """Keep only the rows of ``metrics.jsonl`` up to ``step`` (a resume goes on from there); returns
    how many rows were dropped.

    A killed run may have logged steps past its last checkpoint, and its last line may be cut
    short: both go, so the resumed run's rows follow on without a repeat. Rewritten atomically.
    """
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        staging = path.with_name(f".{METRICS_FILE}.tmp")
        staging.write_text("".join(f"{line}\n" for line in kept))
        os.replace(staging, path)
        logger.info("resuming at step %d: dropped %d rows of %s logged after it", step, dropped, path)
    return dropped


__all__ = [
    "OutputDirInUseError",
    "append_metrics",
    "claim_output_dir",
    "cut_metrics",
    "earlier_outputs",
    "read_metrics",
]
