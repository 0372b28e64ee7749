"""The DINO-family evaluation protocols on frozen features, returning JSON-ready results."""

from __future__ import annotations

import statistics

import torch

from .features import FeatureSet
from .knn import DEFAULT_K, weighted_knn_predict
from .linear import (
    DEFAULT_SWEEP,
    predict,
    sample_few_shot,
    standardise,
    stratified_split,
    train_linear_classifier,
    train_linear_classifiers,
)
from .metrics import classification_metrics

DEFAULT_SHOTS = (1, 2, 5, 10)


def _num_classes(train: FeatureSet, test: FeatureSet) -> int:
    return int(max(train.labels.max(), test.labels.max())) + 1


def knn_protocol(train: FeatureSet, test: FeatureSet, k_values=DEFAULT_K, temperature: float = 0.07) -> dict:
    """Weighted kNN on CLS features for every k."""
    predictions = weighted_knn_predict(
        train.cls, train.labels, test.cls, k_values, temperature, _num_classes(train, test)
    )
    results = {str(k): classification_metrics(predictions[k], test.labels) for k in k_values}
    best_k = max(results, key=lambda k: results[k]["accuracy"])
    return {
        "setup": {"k_values": list(k_values), "temperature": temperature, "features": "cls"},
        "by_k": results,
        "best_k": int(best_k),
    }


def linear_protocol(
    train: FeatureSet,
    test: FeatureSet,
    sweep=DEFAULT_SWEEP,
    epochs: int = 100,
    validation_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Sweep lr / weight decay on a validation split of the training set, retrain, test once."""
    num_classes = _num_classes(train, test)
    train_x, test_x = standardise(train.probe_features(), test.probe_features())
    fit_index, validation_index = stratified_split(train.labels, validation_fraction, seed)
    fit_x, validation_x = standardise(train.probe_features()[fit_index], train.probe_features()[validation_index])
    sweep_results = []
    classifiers = train_linear_classifiers(fit_x, train.labels[fit_index], num_classes, sweep, epochs, seed=seed)
    for setting, classifier in zip(sweep, classifiers):
        accuracy = classification_metrics(
            predict(classifier, validation_x), train.labels[validation_index], use_evaluate=False
        )["accuracy"]
        sweep_results.append({"lr": setting.lr, "weight_decay": setting.weight_decay, "validation_accuracy": accuracy})
    best = max(sweep_results, key=lambda row: row["validation_accuracy"])
    chosen = next(s for s in sweep if s.lr == best["lr"] and s.weight_decay == best["weight_decay"])
    classifier = train_linear_classifier(train_x, train.labels, num_classes, chosen, epochs, seed=seed)
    return {
        "setup": {
            "features": "cls+patch_mean" if train.patch_mean is not None else "pixels",
            "epochs": epochs,
            "validation_fraction": validation_fraction,
            "seed": seed,
            "optimizer": "AdamW, cosine lr",
        },
        "sweep": sweep_results,
        "chosen": {"lr": chosen.lr, "weight_decay": chosen.weight_decay},
        "test": classification_metrics(predict(classifier, test_x), test.labels),
    }


def few_shot_protocol(
    train: FeatureSet,
    test: FeatureSet,
    shots=DEFAULT_SHOTS,
    n_draws: int = 5,
    epochs: int = 100,
    setting=DEFAULT_SWEEP[4],
    seed: int = 0,
) -> dict:
    """For each shot count, ``n_draws`` random labelled subsets; linear classifier; mean ± std."""
    num_classes = _num_classes(train, test)
    results = {}
    for n_shots in shots:
        accuracies, balanced = [], []
        for draw in range(n_draws):
            index = sample_few_shot(train.labels, n_shots, seed + draw)
            train_x, test_x = standardise(train.probe_features()[index], test.probe_features())
            classifier = train_linear_classifier(
                train_x, train.labels[index], num_classes, setting, epochs, batch_size=len(index), seed=seed + draw
            )
            metrics = classification_metrics(predict(classifier, test_x), test.labels, use_evaluate=False)
            accuracies.append(metrics["accuracy"])
            balanced.append(metrics["balanced_accuracy"])
        results[str(n_shots)] = {
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "balanced_accuracy_mean": statistics.mean(balanced),
            "accuracies": accuracies,
        }
    return {
        "setup": {
            "shots": list(shots),
            "draws": n_draws,
            "seeds": [seed + d for d in range(n_draws)],
            "lr": setting.lr,
            "weight_decay": setting.weight_decay,
            "epochs": epochs,
        },
        "by_shots": results,
    }


PROTOCOLS = {"knn": knn_protocol, "linear": linear_protocol, "fewshot": few_shot_protocol}


def run_protocols(names, train: FeatureSet, test: FeatureSet, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    results = {}
    for name in names:
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)} or 'all'")
        results[name] = PROTOCOLS[name](train, test) if name == "knn" else PROTOCOLS[name](train, test, seed=seed)
    return results
