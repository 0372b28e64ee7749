"""Classification metrics: accuracy, balanced accuracy and per-class accuracy."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)


def _import_evaluate_library():
    """The ``evaluate`` package, even when ``scripts/evaluate.py`` shadows it.

    A script run from ``scripts/`` puts that folder first on ``sys.path``, where our CLI is named
    ``evaluate.py`` (the name the docs give it).
    """
    module = importlib.import_module("evaluate")
    if hasattr(module, "load"):
        return module
    shadow_dir = os.path.dirname(os.path.abspath(module.__file__))
    saved_path = list(sys.path)
    del sys.modules["evaluate"]
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != shadow_dir]
    try:
        return importlib.import_module("evaluate")
    finally:
        sys.path[:] = saved_path


@functools.lru_cache(maxsize=1)
def _evaluate_accuracy_metric():
    """``evaluate``'s accuracy metric, or None when its script cannot be loaded (it may need the Hub).

    Looked up once per process: an offline attempt costs more than a second.
    """
    try:
        return _import_evaluate_library().load("accuracy")
    except Exception as error:  # noqa: BLE001 - any failure to fetch or build the script falls back
        logger.info("evaluate's accuracy is unavailable (%s); using the built-in computation", error)
        return None


def _evaluate_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float | None:
    metric = _evaluate_accuracy_metric()
    if metric is None:
        return None
    return float(metric.compute(predictions=predictions.tolist(), references=labels.tolist())["accuracy"])


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor, use_evaluate: bool = True) -> dict:
    """Accuracy, balanced accuracy (mean of per-class recalls) and per-class accuracy, in percent.

    Args:
        predictions: ``(n,)`` predicted class ids.
        labels: ``(n,)`` true class ids.
        use_evaluate: try ``evaluate.load("accuracy")`` first (falls back offline).
    """
    predictions, labels = predictions.long().cpu(), labels.long().cpu()
    correct = predictions == labels
    classes = labels.unique()
    per_class = {int(c): 100.0 * float(correct[labels == c].float().mean()) for c in classes}
    accuracy = _evaluate_accuracy(predictions, labels) if use_evaluate else None
    backend = "evaluate" if accuracy is not None else "builtin"
    if accuracy is None:
        accuracy = float(correct.float().mean())
    return {
        "accuracy": 100.0 * accuracy,
        "balanced_accuracy": sum(per_class.values()) / len(per_class),
        "per_class_accuracy": per_class,
        "metrics_backend": backend,
    }
