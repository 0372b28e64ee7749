"""The GPU study, run as resumable chunks: recipe on a validation split, then baseline vs KoLeo-proto.

A study config (``configs/study_gpu.yaml``) names a base *recipe* (a pretraining YAML), the
datasets, the *methods* (named sets of overrides: KoLeo-proto weight, centring, recipe candidates)
and *stages*: datasets x methods x K x seeds, in the order they should run. :func:`plan_runs`
expands the stages into one ordered list of :class:`StudyRun`.

:func:`run_chunk` works through that list within a time budget: a run with a result already in
``results_dir`` is skipped; a run that the budget cuts keeps its checkpoint in ``work_dir`` (via
``pretrain --max_time``) and resumes from it at the next chunk; a finished run is evaluated (kNN,
linear probe, few-shot, balanced accuracy; the raw-pixel baseline once per dataset) and leaves one
small JSON in ``results_dir`` (:func:`run_record`): its settings, the per-epoch prototype
statistics (unique prototypes per eps, nearest-neighbour distance quantiles, utilisation), the
final prototype report and the evaluation. A device run hands back only those JSON files (and the
backbones of stages with ``keep_backbone``), so chunks fit the GPU machine's 10-minute calls.

Run by ``scripts/gpu_study.py``; :mod:`experiments.gpu_study_report` turns the results into tables,
plots and ``results.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from experiments.study import evaluate_run, load_study_config, merge_settings
from hf_koleo.data.sources import count_records
from hf_koleo.evaluation.features import PIXELS, default_device
from hf_koleo.evaluation.run import evaluate_backbone, write_result
from hf_koleo.hub import prepare_upload_folder
from hf_koleo.training.arguments import arguments_from_settings
from hf_koleo.training.checkpoint import list_checkpoints
from hf_koleo.training.trainer import pretrain

logger = logging.getLogger(__name__)
PROTOTYPE_PREFIX = "prototypes/"


@dataclass(frozen=True)
class StudyRun:
    """One pretraining run of the study."""

    stage: str
    dataset: str
    method: str
    num_prototypes: int
    seed: int
    keep_backbone: bool = False
    reserve_seconds: float = 60.0  # a chunk starts the run only with more than this left (its evaluation)

    @property
    def name(self) -> str:
        return f"{self.dataset}-K{self.num_prototypes}-{self.method}-seed{self.seed}"


def load_gpu_study_config(path: str | Path, quick: bool = False) -> dict[str, Any]:
    """The study YAML (``quick`` merges its ``quick:`` section), with the recipe it names read in."""
    config = load_study_config(path, quick)
    recipe_path = Path(path).parent / config["recipe"]
    if not recipe_path.exists():
        raise FileNotFoundError(f"{path}: recipe {config['recipe']!r} not found beside it ({recipe_path})")
    config["recipe_settings"] = yaml.safe_load(recipe_path.read_text())
    for stage in config["stages"]:
        for key, known in (("datasets", config["datasets"]), ("methods", config["methods"])):
            unknown = [name for name in stage[key] if name not in known]
            if unknown:
                raise ValueError(f"{path}: stage {stage['name']!r} names unknown {key} {unknown}; known: {list(known)}")
    return config


def plan_runs(config: dict[str, Any]) -> list[StudyRun]:
    """Every run of every stage, in stage order then seed, dataset, K, method; each run once."""
    runs: dict[str, StudyRun] = {}
    for stage in config["stages"]:
        for seed in stage["seeds"]:
            for dataset in stage["datasets"]:
                for num_prototypes in stage["num_prototypes"]:
                    for method in stage["methods"]:
                        run = StudyRun(
                            stage["name"],
                            dataset,
                            method,
                            int(num_prototypes),
                            int(seed),
                            stage.get("keep_backbone", False),
                            float(stage.get("reserve_seconds", config.get("reserve_seconds", 60))),
                        )
                        runs.setdefault(run.name, run)
    return list(runs.values())


def run_settings(config: dict[str, Any], run: StudyRun, output_dir: Path) -> dict[str, Any]:
    """The run's pretraining settings: recipe < study ``run`` < dataset ``run`` < method < this run."""
    dataset = config["datasets"][run.dataset]
    settings = merge_settings(config["recipe_settings"], config.get("run") or {})
    settings = merge_settings(settings, dataset.get("run") or {})
    settings = merge_settings(settings, config["methods"][run.method] or {})
    return merge_settings(
        settings,
        {
            "data": dataset["train"],
            "output_dir": str(output_dir),
            "seed": run.seed,
            "resume": "latest",
            "model": {"num_prototypes": run.num_prototypes},
        },
    )


def record_status(config: dict[str, Any], run: StudyRun, results_dir: Path) -> str:
    """``pending`` (no result), ``done``, or ``stale``: a result trained with other settings than the
    config gives the run now (e.g. the recipe changed after it ran; delete it to run it again)."""
    path = results_dir / f"{run.name}.json"
    if not path.exists():
        return "pending"
    recorded = json.loads(path.read_text())["settings"]
    current = run_settings(config, run, Path(recorded["output_dir"]))
    return "done" if recorded == current else "stale"


def planned_images(config: dict[str, Any], run: StudyRun) -> int:
    """Images the run will see: its steps x global batch (one process), from its settings and source size."""
    arguments, _ = arguments_from_settings(run_settings(config, run, Path("unused")), source=run.name)
    steps_per_epoch = arguments.steps_per_epoch(1, arguments.dataset_size or count_records(arguments.data) or 0)
    return arguments.total_steps(steps_per_epoch) * arguments.global_batch_size(1)


def _history(run_dir: Path) -> tuple[list[dict[str, Any]], list[list[float]]]:
    """Per-epoch prototype statistics and ``[epoch, loss]`` pairs from the run's ``metrics.jsonl``.

    A step logged twice (a chunk that died after logging and resumed from an earlier checkpoint)
    keeps its last row.
    """
    prototype_rows: dict[int, dict[str, Any]] = {}
    losses: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if any(key.startswith(PROTOTYPE_PREFIX) for key in row):
            prototype_rows[row["step"]] = {
                key: value for key, value in row.items() if key.startswith(PROTOTYPE_PREFIX) or key in ("step", "epoch")
            }
        elif "loss" in row:
            losses[row["step"]] = [row["epoch"], row["loss"]]
    return [prototype_rows[step] for step in sorted(prototype_rows)], [losses[step] for step in sorted(losses)]


def _final_prototypes(report: dict[str, Any]) -> dict[str, Any]:
    """The headline entries of ``prototype_report.json`` for each head (teacher and student)."""
    keep = ("unique_prototypes", "unique_curve", "nn_distance_quantiles", "utilisation", "marginal_entropy")
    return {
        head: {key: entry[key] for key in keep if key in entry}
        for head, entry in report.items()
        if isinstance(entry, dict) and "unique_curve" in entry
    }


def device_description() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def run_record(run: StudyRun, settings: dict[str, Any], run_dir: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    """What one finished run leaves in ``results_dir``: small enough to bring back from a device."""
    prototype_history, losses = _history(run_dir)
    timing = json.loads((run_dir / "timing.json").read_text())
    return {
        "name": run.name,
        "stage": run.stage,
        "dataset": run.dataset,
        "method": run.method,
        "num_prototypes": run.num_prototypes,
        "seed": run.seed,
        "settings": settings,
        "device": device_description(),
        "torch": torch.__version__,
        "pretraining": timing,
        "prototype_history": prototype_history,
        "losses": losses,
        "final_prototypes": _final_prototypes(json.loads((run_dir / "prototype_report.json").read_text())),
        "evaluation": evaluation,
    }


def _add_timing(run_dir: Path, summary: dict[str, Any], seconds: float) -> None:
    """Pretraining seconds and images summed over the chunks a run took."""
    path = run_dir / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0, "chunks": 0}
    timing.update(
        seconds=timing["seconds"] + seconds,
        chunks=timing["chunks"] + 1,
        steps=summary["steps"],
        images_seen=summary["images_seen"],
    )
    timing["images_per_second"] = summary["images_seen"] / max(timing["seconds"], 1e-9)
    path.write_text(json.dumps(timing))


def _evaluation_settings(config: dict[str, Any]) -> dict[str, Any]:
    settings = dict(config["evaluation"])
    if settings.get("device", "cpu") == "auto":
        settings["device"] = default_device()
    return settings


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Written whole or not at all: a chunk killed mid-write leaves no half result to skip on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(record, indent=1))
    staging.replace(path)


def evaluate_pixels(config: dict[str, Any], dataset: str, results_dir: Path) -> None:
    """The raw-pixel baseline of ``dataset`` once (``pixels-<dataset>.json``)."""
    path = results_dir / f"pixels-{dataset}.json"
    if not path.exists():
        metrics = evaluate_run("pixels", config["datasets"][dataset], _evaluation_settings(config))
        _write_json(path, {"dataset": dataset, "evaluation": metrics})


def export_with_card(config: dict[str, Any], run: StudyRun, work_dir: Path, destination: Path) -> Path:
    """The run's backbone exported with its model card (model-index from ``scripts/evaluate.py all``
    results of the backbone and of raw pixels on the run's dataset): the folder a release publishes.

    Done on the machine that trained it: the checkpoint (heads, K prototypes) is too large to bring back.
    The pixel results are computed once per dataset (``work_dir/evaluation/``).
    """
    dataset, settings = config["datasets"][run.dataset], _evaluation_settings(config)
    run_dir = work_dir / run.name
    evaluation_files = []
    for model, path in (
        (str(run_dir / "backbone"), run_dir / "evaluation" / "backbone.json"),
        (PIXELS, work_dir / "evaluation" / f"pixels-{run.dataset}.json"),
    ):
        if model == PIXELS and path.exists():
            evaluation_files.append(path)
            continue
        result = evaluate_backbone(
            "all",
            model,
            dataset["train"],
            dataset["test"],
            settings.get("batch_size", 64),
            settings.get("limit_train"),
            settings.get("limit_test"),
            settings["device"],
        )
        evaluation_files.append(write_result(result, path))
    checkpoint = list_checkpoints(run_dir)[-1]
    return prepare_upload_folder(checkpoint, destination, f"hf_koleo/{run.name}", evaluation_files)


def run_chunk(
    config: dict[str, Any],
    work_dir: str | Path,
    results_dir: str | Path,
    budget_seconds: float,
    backbone_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train and evaluate pending runs, in plan order, for at most about ``budget_seconds``.

    A run starts only with more than ``reserve_seconds`` left; it trains for what is left minus
    that reserve, then stops with a checkpoint (resumed by the next chunk) or finishes and is
    evaluated (evaluation may overrun the budget by its own length: keep ``reserve_seconds`` above it).

    Returns ``{"finished": [names], "interrupted": name or None, "pending": [names]}``.
    """
    deadline = time.perf_counter() + budget_seconds
    work_dir, results_dir = Path(work_dir), Path(results_dir)
    evaluation = _evaluation_settings(config)
    outcome: dict[str, Any] = {"finished": [], "interrupted": None, "pending": []}
    for run in plan_runs(config):
        status = record_status(config, run, results_dir)
        if status == "stale":
            logger.warning("%s: its result was trained with other settings; delete it to run it again", run.name)
        if status != "pending":
            continue
        left = deadline - time.perf_counter() - run.reserve_seconds
        if outcome["interrupted"] or left <= 0:
            outcome["pending"].append(run.name)
            continue
        run_dir = work_dir / run.name
        settings = run_settings(config, run, run_dir)
        _claim_run_dir(run_dir, settings)
        arguments, model_config = arguments_from_settings({**settings, "max_time": left}, source=run.name)
        started = time.perf_counter()
        summary = pretrain(arguments, model_config)
        _add_timing(run_dir, summary, time.perf_counter() - started)
        if summary.get("stopped"):
            logger.info(
                "%s: stopped at step %d of %d (budget); the next chunk resumes it",
                run.name,
                summary["steps"],
                summary["total_steps"],
            )
            outcome["interrupted"] = run.name
            outcome["pending"].append(run.name)
            continue
        evaluate_pixels(config, run.dataset, results_dir)
        metrics = evaluate_run(str(run_dir / "backbone"), config["datasets"][run.dataset], evaluation)
        _write_json(results_dir / f"{run.name}.json", run_record(run, settings, run_dir, metrics))
        outcome["finished"].append(run.name)
        logger.info("%s: done, %s", run.name, json.dumps(metrics))
        if run.keep_backbone and backbone_dir is not None:
            try:  # the result is safe already; a failed export is redone by hand from the checkpoint
                export_with_card(config, run, work_dir, Path(backbone_dir) / run.name)
            except Exception:
                logger.exception("%s: export failed; redo it with scripts/export.py from %s", run.name, run_dir)
    return outcome


def _claim_run_dir(run_dir: Path, settings: dict[str, Any]) -> None:
    """A run folder holds one run's settings: a checkpoint left by other settings (the config changed
    since) would be resumed under the new ones, so it is removed and the run starts again."""
    path = run_dir / "settings.json"
    if path.exists() and json.loads(path.read_text()) != settings:
        logger.warning("%s was started with other settings: starting the run again from scratch", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings))


__all__ = [
    "StudyRun",
    "evaluate_pixels",
    "export_with_card",
    "load_gpu_study_config",
    "plan_runs",
    "planned_images",
    "record_status",
    "run_chunk",
    "run_settings",
]
