"""Run kinds ``pretrain_eval`` (pretrain, then evaluate the backbone) and ``evaluate_pixels``.

``pretrain_eval`` parameters::

    pretrain: {...}          # a pretraining config (run keys, model keys under model:), as a YAML config
    dataset: {train: SOURCE, test: SOURCE}
    evaluation: {device: cpu|auto, batch_size, limit_train, limit_test, limit_linear, linear_epochs, fewshot_draws,
                 protocols: [knn] (kNN only; default all three),
                 test_dataset: {train, test} (also every protocol there: dataset is then a validation split),
                 curve: true, curve_limit_train (kNN of every kept checkpoint, see checkpoint_curve)}
    keep_backbone: false     # also export a release folder (backbone + model card) into the run's folder

The run trains in its work folder through the library's own ``pretrain`` (``--resume latest``,
``--max_time`` = the seconds left), so a run the budget cuts keeps its checkpoint and the next
``run`` resumes it (:class:`~experiments.runner.Unfinished`). A run that finishes is evaluated
(kNN@20, linear probe, 1/5-shot, balanced accuracies) and its result holds the per-epoch prototype
statistics, the losses, the final prototype report's headline entries and the evaluation: small
enough to bring back from a device machine. ``evaluate_pixels`` evaluates raw pixels on a dataset.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from hf_koleo.data.sources import count_records
from hf_koleo.evaluation.clusters import cluster_metrics, teacher_assignments
from hf_koleo.evaluation.features import PIXELS, FeatureSet, default_device
from hf_koleo.evaluation.protocols import few_shot_protocol, knn_protocol, linear_protocol
from hf_koleo.evaluation.run import evaluate_backbone, extract_train_test, write_result
from hf_koleo.hub import export_checkpoint, load_pretraining_model, prepare_upload_folder
from hf_koleo.training.arguments import arguments_from_settings
from hf_koleo.training.checkpoint import list_checkpoints
from hf_koleo.training.run_outputs import read_metrics
from hf_koleo.training.trainer import pretrain

from .runner import RunContext, Unfinished
from .store import device_name

logger = logging.getLogger(__name__)
PROTOTYPE_PREFIX = "prototypes/"
FULL_PROTOCOLS = ("knn", "linear", "few_shot")


def evaluation_settings(params: dict[str, Any]) -> dict[str, Any]:
    settings = dict(params.get("evaluation") or {})
    if settings.get("device", "cpu") == "auto":
        settings["device"] = default_device()
    return settings


def _first(features: FeatureSet, count: int | None) -> FeatureSet:
    """The first ``count`` images' features (all of them when ``count`` is None)."""
    patch = None if features.patch_mean is None else features.patch_mean[:count]
    return FeatureSet(features.cls[:count], patch, features.labels[:count])


def _features(model_dir: str, dataset: dict, settings: dict, limit_train: int | None):
    return extract_train_test(
        model_dir,
        dataset["train"],
        dataset["test"],
        limit_train=limit_train,
        limit_test=settings.get("limit_test"),
        batch_size=settings.get("batch_size", 64),
        device=settings.get("device", "cpu"),
        progress=False,
    )


def evaluate_run(model_dir: str, dataset: dict, settings: dict) -> dict[str, Any]:
    """kNN@20, linear probe and 1/5-shot (top-1 and balanced) of ``model_dir`` (or ``"pixels"``)."""
    train, test = _features(model_dir, dataset, settings, settings.get("limit_train"))
    knn = knn_protocol(train, test, k_values=(20,))["by_k"]["20"]
    counts = torch.bincount(train.labels[train.labels >= 0])
    rarest = [int(label) for label in counts.argsort()[:3]]  # by training images (Fashion-MNIST-LT: 9, 8, 7)
    result = {
        "knn_top1": knn["accuracy"],
        "knn_balanced": knn["balanced_accuracy"],
        "knn_per_class": knn["per_class_accuracy"],
        "rarest_classes": {str(label): int(counts[label]) for label in rarest},
    }
    if model_dir != PIXELS and settings.get("checkpoint"):
        assignments = teacher_assignments(settings["checkpoint"], test.cls)
        result["clusters"] = cluster_metrics(assignments, test.labels)
    if "linear" not in settings.get("protocols", FULL_PROTOCOLS):
        return result  # a recipe search scores kNN only
    probe_train = _first(train, settings.get("limit_linear") or None)
    linear = linear_protocol(probe_train, test, epochs=settings["linear_epochs"])["test"]
    few = few_shot_protocol(
        train, test, shots=(1, 5), n_draws=settings["fewshot_draws"], epochs=settings["linear_epochs"]
    )["by_shots"]
    return {
        **result,
        "linear_top1": linear["accuracy"],
        "linear_balanced": linear["balanced_accuracy"],
        "shot1": few["1"]["accuracy_mean"],
        "shot5": few["5"]["accuracy_mean"],
        "shot5_balanced": few["5"]["balanced_accuracy_mean"],
    }


def evaluate_backbone_of(run_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The evaluation ``params["evaluation"]`` asks for (:func:`evaluate_run` on the dataset's test split,
    then once on ``test_dataset`` when the dataset is a validation split; the ``curve`` when asked)."""
    settings = evaluation_settings(params)
    checkpoints = list_checkpoints(run_dir)
    settings["checkpoint"] = str(checkpoints[-1]) if checkpoints else None  # the teacher's clusters
    backbone = str(run_dir / "backbone")
    evaluation = evaluate_run(backbone, params["dataset"], settings)
    if settings.get("test_dataset"):  # chosen on a validation split, then tested once with every protocol
        evaluation["test"] = evaluate_run(backbone, settings["test_dataset"], {**settings, "protocols": FULL_PROTOCOLS})
    if settings.get("curve"):
        evaluation["curve"] = checkpoint_curve(run_dir, params, settings)
    return evaluation


def checkpoint_curve(run_dir: Path, params: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """kNN@20 of every kept checkpoint's teacher against the pretraining seconds it took to reach it.

    ``evaluation.curve: true`` with ``pretrain.save_every`` (say one epoch) and a ``keep_last`` that keeps
    them all; ``evaluation.curve_limit_train`` images of the training data are the kNN bank (default
    all). The seconds are the logged windows' (images / img/s) up to the checkpoint's step: training
    only, no evaluation and no checkpoint writing.
    """
    pretraining = params["pretrain"]
    images_per_step = pretraining["per_device_batch_size"] * pretraining.get("gradient_accumulation_steps", 1)
    windows = _training_windows(run_dir, images_per_step)
    curve = []
    for checkpoint in list_checkpoints(run_dir):
        model = load_pretraining_model(checkpoint)
        backbone = export_checkpoint(checkpoint, run_dir / "curve" / checkpoint.name, model=model)
        train, test = _features(str(backbone), params["dataset"], settings, settings.get("curve_limit_train"))
        knn = knn_protocol(train, test, k_values=(20,))["by_k"]["20"]
        step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
        clusters = cluster_metrics(teacher_assignments(model, test.cls), test.labels)
        curve.append(
            {
                "step": step,
                "seconds": sum(seconds for end, seconds in windows if end <= step),
                "knn_top1": knn["accuracy"],
                "knn_balanced": knn["balanced_accuracy"],
                **{key: clusters[key] for key in ("clusters_used", "nmi", "ari", "purity")},
            }
        )
        shutil.rmtree(backbone)
    return curve


def _training_windows(run_dir: Path, images_per_step: int) -> list[tuple[int, float]]:
    """``(last step, seconds of training)`` of each logged window of ``metrics.jsonl``."""
    windows, previous = [], 0
    for row in read_metrics(run_dir):
        if "images_per_second" in row and "loss" in row:
            images = (row["step"] - previous) * images_per_step
            windows.append((row["step"], images / max(row["images_per_second"], 1e-9)))
            previous = row["step"]
    return windows


def run_settings(params: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """The pretraining settings of a run: its ``pretrain`` section on its dataset, in its folder, resumable."""
    return {**params["pretrain"], "data": params["dataset"]["train"], "output_dir": str(output_dir), "resume": "latest"}


def planned_images(params: dict[str, Any]) -> str:
    """``plan``'s note: the images the run will see (steps x global batch, one process)."""
    arguments, _ = arguments_from_settings(run_settings(params, Path("unused")), source="plan")
    steps_per_epoch = arguments.steps_per_epoch(1, arguments.dataset_size or count_records(arguments.data) or 0)
    return f"{arguments.total_steps(steps_per_epoch) * arguments.global_batch_size(1) / 1e6:6.2f} M images"


def pretrain_and_evaluate(params: dict[str, Any], context: RunContext) -> dict[str, Any]:
    """Train (or resume) within ``context.seconds_left``, then evaluate; see the module docstring."""
    run_dir = context.work_dir
    settings = run_settings(params, run_dir)
    _claim_run_dir(run_dir, settings)
    arguments, model_config = arguments_from_settings(
        {**settings, "max_time": max(context.seconds_left, 1e-9)}, source=context.run.name
    )
    started = time.perf_counter()
    summary = pretrain(arguments, model_config)
    timing = _add_timing(run_dir, summary, time.perf_counter() - started)
    if summary.get("stopped"):
        raise Unfinished(f"stopped at step {summary['steps']} of {summary['total_steps']} (budget)")
    evaluation = evaluate_backbone_of(run_dir, params)
    result = {
        "settings": settings,
        "device": timing["device"],
        "pretraining": timing,
        **training_history(run_dir, json.loads((run_dir / "prototype_report.json").read_text())),
        "collapse_alarms": summary.get("collapse_alarms") or [],  # every chunk's, as the trainer restores them
        "evaluation": evaluation,
    }
    if params.get("keep_backbone"):
        try:  # the result stands either way; a failed export is redone by hand from the checkpoint
            result["release"] = str(export_with_card(params, context))
        except Exception:
            logger.exception("%s: export failed; redo it with scripts/export.py from %s", context.run.name, run_dir)
    return result


def evaluate_pixels(params: dict[str, Any], context: RunContext) -> dict[str, Any]:
    """The raw-pixel baseline of ``params["dataset"]``, with the same protocols as a backbone."""
    return {"evaluation": evaluate_run(PIXELS, params["dataset"], evaluation_settings(params))}


def export_with_card(params: dict[str, Any], context: RunContext) -> Path:
    """The run's backbone exported with its model card (model-index from ``scripts/evaluate.py all``
    results of the backbone and of raw pixels on the run's dataset) into ``<run folder>/release``.

    Done on the machine that trained it: the checkpoint (heads, K prototypes) is too large to bring
    back. The pixel results are computed once per dataset, beside the run folders (``evaluation/``).
    """
    settings, run_dir = evaluation_settings(params), context.work_dir
    dataset = settings.get("test_dataset") or params["dataset"]
    scores = run_dir / "evaluation" / "backbone.json"
    pixels = run_dir.parent / "evaluation" / f"pixels-{_slug(dataset['train'])}.json"
    for model, path in ((str(run_dir / "backbone"), scores), (PIXELS, pixels)):
        if model != PIXELS or not path.exists():
            result = evaluate_backbone(
                "all",
                model,
                dataset["train"],
                dataset["test"],
                settings.get("batch_size", 64),
                settings.get("limit_train"),
                settings.get("limit_test"),
                settings.get("device", "cpu"),
            )
            write_result(result, path)
    checkpoint = list_checkpoints(run_dir)[-1]
    return prepare_upload_folder(checkpoint, run_dir / "release", f"hf_koleo/{context.run.name}", [scores, pixels])


def _slug(source: str) -> str:
    return "".join(character if character.isalnum() else "_" for character in source)


def training_history(run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Per-epoch prototype statistics and ``[epoch, loss]`` pairs from the run's ``metrics.jsonl``, and the
    headline entries of its prototype ``report`` (``prototype_report.json``) for each head (teacher and student)."""
    prototype_rows: dict[int, dict[str, Any]] = {}
    losses: dict[int, list[float]] = {}
    for row in read_metrics(run_dir):
        if any(key.startswith(PROTOTYPE_PREFIX) for key in row):
            prototype_rows[row["step"]] = {
                key: value for key, value in row.items() if key.startswith(PROTOTYPE_PREFIX) or key in ("step", "epoch")
            }
        elif "loss" in row:
            losses[row["step"]] = [row["epoch"], row["loss"]]
    keep = ("unique_prototypes", "unique_curve", "nn_distance_quantiles", "utilisation", "marginal_entropy")
    return {
        "prototype_history": [prototype_rows[step] for step in sorted(prototype_rows)],
        "losses": [losses[step] for step in sorted(losses)],
        "final_prototypes": {
            head: {key: entry[key] for key in keep if key in entry}
            for head, entry in report.items()
            if isinstance(entry, dict) and "unique_curve" in entry
        },
    }


def _add_timing(run_dir: Path, summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Pretraining seconds and images summed over the budgeted calls a run took."""
    path = run_dir / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0, "chunks": 0}
    timing.update(
        seconds=timing["seconds"] + seconds,
        chunks=timing["chunks"] + 1,
        steps=summary["steps"],
        images_seen=summary["images_seen"],
        device=device_name(),
    )
    timing["images_per_second"] = summary["images_seen"] / max(timing["seconds"], 1e-9)
    path.write_text(json.dumps(timing))
    return timing


def _claim_run_dir(run_dir: Path, settings: dict[str, Any]) -> None:
    """A run folder holds one run's settings: a checkpoint left by other settings (the spec changed
    since) would be resumed under the new ones, so it is removed and the run starts again."""
    path = run_dir / "settings.json"
    if path.exists() and json.loads(path.read_text()) != settings:
        logger.warning("%s was started with other settings: starting the run again from scratch", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings))


__all__ = [
    "evaluate_backbone_of",
    "evaluate_pixels",
    "evaluate_run",
    "export_with_card",
    "planned_images",
    "pretrain_and_evaluate",
]
