"""The run kinds and reports a spec may name: plain dicts of ``"module:function"``, imported when used.

A run kind is ``function(params, context) -> result`` (:mod:`experiments.runner`); a report is
``function(spec, records, left_out, report_dir) -> [paths written]`` reading records only (it
never trains or measures).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

RUN_KINDS: dict[str, str] = {
    "pretrain_eval": "experiments.pretrain_eval:pretrain_and_evaluate",
    "evaluate_pixels": "experiments.pretrain_eval:evaluate_pixels",
    "frozen_head": "experiments.frozen_head:frozen_head_run",
    "koleo_timing": "experiments.benchmarks:koleo_timing",
    "dino_ibot_timing": "experiments.benchmarks:dino_ibot_timing",
    "step_vs_peer": "experiments.benchmarks:step_vs_peer",
    "step_profile": "experiments.benchmarks:step_profile",
    "data_rate": "experiments.benchmarks:data_rate",
    "feature_extraction": "experiments.benchmarks:feature_extraction",
    "unique_curve_timing": "experiments.benchmarks:unique_curve_timing",
    "loop_batch": "experiments.loop_benchmark:loop_batch",
    "host_overhead": "experiments.loop_benchmark:host_overhead",
    "koleo_on_device": "experiments.loop_benchmark:koleo_on_device",
    "neighbour_churn": "experiments.neighbour_churn:neighbour_churn",
    "side_by_side": "experiments.side_by_side:side_by_side",
}

# Optional: a line ``plan`` prints beside a run of that kind (``function(params) -> str``).
PLAN_NOTES: dict[str, str] = {
    "pretrain_eval": "experiments.pretrain_eval:planned_images",
}

REPORTS: dict[str, str] = {
    "pretrain_study": "experiments.study_report:write_report",
    "frozen_head": "experiments.frozen_head_report:write_report",
    "frozen_head_k": "experiments.frozen_head_k_report:write_k_report",
    "benchmarks": "experiments.benchmarks_report:write_report",
    "loop_benchmark": "experiments.loop_benchmark_report:write_report",
    "recipe": "experiments.recipe_report:write_report",
    "gpu_window": "experiments.side_by_side:write_report",
}


def _resolve(table: dict[str, str], what: str, name: str) -> Callable:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(table)}")
    module, function = table[name].split(":")
    return getattr(importlib.import_module(module), function)


def run_kind(name: str) -> Callable:
    """The run kind called ``name`` (a key of :data:`RUN_KINDS`)."""
    return _resolve(RUN_KINDS, "run kind", name)


def plan_note(name: str) -> Callable | None:
    """The plan note of run kind ``name``, or None."""
    return _resolve(PLAN_NOTES, "plan note", name) if name in PLAN_NOTES else None


def report(name: str) -> Callable:
    """The report called ``name`` (a key of :data:`REPORTS`)."""
    return _resolve(REPORTS, "report", name)


__all__ = ["PLAN_NOTES", "REPORTS", "RUN_KINDS", "plan_note", "report", "run_kind"]
