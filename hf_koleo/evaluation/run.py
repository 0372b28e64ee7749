"""One evaluation run: features -> protocols -> a JSON result the model card can turn into model-index."""

from __future__ import annotations

import json
import math
import numbers
import os
import platform
from pathlib import Path
from typing import Any

import transformers

from .features import PIXELS, FeatureSet, extract_features
from .protocols import PROTOCOLS, run_protocols


def extract_train_test(
    model: str,
    train_data: str,
    test_data: str,
    batch_size: int = 64,
    limit_train: int | None = None,
    limit_test: int | None = None,
    device: str = "cpu",
    use_cache: bool = True,
    progress: bool = True,
    allow_pickle: bool = False,
) -> tuple[FeatureSet, FeatureSet]:
    """Training and test features; raw test pixels are resized to the training images' size.

    Raises ``ValueError`` when either split has images without labels (checked on the training
    data before the test data is read).
    """
    options = dict(use_cache=use_cache, progress=progress, allow_pickle=allow_pickle)
    train = extract_features(model, train_data, batch_size, limit_train, device, **options)
    check_labels(train, train_data, "training")
    pixel_size = int(math.isqrt(train.cls.shape[1] // 3)) if model == PIXELS else None
    test = extract_features(model, test_data, batch_size, limit_test, device, pixel_size, **options)
    check_labels(test, test_data, "test")
    return train, test


def check_labels(features: FeatureSet, data: str, split: str) -> None:
    """Refuse features with unknown labels (-1): accuracy against them would be a meaningless 0."""
    unlabelled, total = int((features.labels < 0).sum()), len(features.labels)
    if unlabelled == 0:
        return
    which = "its images have" if unlabelled == total else f"{unlabelled} of its {total} images have"
    raise ValueError(
        f"{split} data {data!r}: {which} no labels; kNN, linear and few-shot evaluation need a label for "
        "every image (an image folder with one subfolder per class, or a 'label' column)"
    )


def check_counts(batch_size: int, limit_train: int | None, limit_test: int | None) -> None:
    """Refuse a batch size or an image limit below 1 (``None`` means every image), naming the option."""
    for option, value in (("--batch-size", batch_size), ("--limit-train", limit_train), ("--limit-test", limit_test)):
        is_limit = option != "--batch-size"
        if value is None and is_limit:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            leave_out = " (leave it out to use every image)" if is_limit else ""
            raise ValueError(f"{option} must be an integer >= 1{leave_out}, got {value!r}")


def evaluate_backbone(
    protocol: str,
    model: str,
    train_data: str,
    test_data: str,
    batch_size: int = 64,
    limit_train: int | None = None,
    limit_test: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    use_cache: bool = True,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Run ``protocol`` (``knn``, ``linear``, ``fewshot`` or ``all``) and return the result record.

    ``allow_pickle`` lets a model folder with only ``pytorch_model.bin`` load (pickle runs code).
    A batch size or limit below 1, and data with unlabelled images, raise ``ValueError`` naming
    the option or the data source.
    """
    names = list(PROTOCOLS) if protocol == "all" else [protocol]
    if protocol != "all" and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)} or 'all', got {protocol!r}")
    check_counts(batch_size, limit_train, limit_test)
    train, test = extract_train_test(
        model, train_data, test_data, batch_size, limit_train, limit_test, device, use_cache, allow_pickle=allow_pickle
    )
    result = {
        "model": model,
        "data": {
            "train": train_data,
            "test": test_data,
            "n_train": len(train.labels),
            "n_test": len(test.labels),
            "skipped_train": train.skipped,
            "skipped_test": test.skipped,
            "limit_train": limit_train,
            "limit_test": limit_test,
        },
        "feature_dim": {"cls": train.cls.shape[1], "probe": train.probe_features().shape[1]},
        "seed": seed,
        "protocols": run_protocols(names, train, test, seed),
        "environment": {"transformers": transformers.__version__, "python": platform.python_version()},
    }
    result["model_index"] = model_index_results(result)
    return result


def model_index_results(result: dict[str, Any]) -> list[dict[str, Any]]:
    """``model-index`` entries (huggingface_hub ``EvalResult`` fields) for one result record."""
    metrics: list[dict[str, Any]] = []
    protocols = result["protocols"]
    if "knn" in protocols:
        knn = protocols["knn"]
        k = "20" if "20" in knn["by_k"] else str(knn["best_k"])
        metrics.append({"type": "accuracy", "name": f"kNN top-1 (k={k})", "value": knn["by_k"][k]["accuracy"]})
        metrics.append(
            {
                "type": "balanced_accuracy",
                "name": f"kNN balanced accuracy (k={k})",
                "value": knn["by_k"][k]["balanced_accuracy"],
            }
        )
    if "linear" in protocols:
        test = protocols["linear"]["test"]
        metrics.append({"type": "accuracy", "name": "linear probe top-1", "value": test["accuracy"]})
        metrics.append(
            {"type": "balanced_accuracy", "name": "linear probe balanced accuracy", "value": test["balanced_accuracy"]}
        )
    if "fewshot" in protocols:
        for shots, row in protocols["fewshot"]["by_shots"].items():
            metrics.append(
                {"type": "accuracy", "name": f"{shots}-shot linear top-1 (mean)", "value": row["accuracy_mean"]}
            )
    data = result["data"]
    dataset_type = data["test"].split(":")[0]
    return [
        {
            "task_type": "image-classification",
            "task_name": "Frozen-feature classification",
            "dataset_type": dataset_type,
            "dataset_name": data["test"],
            "dataset_split": data["test"].split(":")[1] if ":" in data["test"] else "test",
            "metric_type": metric["type"],
            "metric_name": metric["name"],
            "metric_value": round(metric["value"], 2),
        }
        for metric in metrics
    ]


def check_result_path(output: str | os.PathLike) -> Path:
    """Refuse, before any work, a result path that cannot be written as a file (a folder, or under a file)."""
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output {output} is a folder: give the result file to write, e.g. {path / 'result.json'}")
    existing = next((parent for parent in path.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"--output {output}: {existing} is a file, not a folder")
    return path


def write_result(result: dict[str, Any], output: str | os.PathLike) -> Path:
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
