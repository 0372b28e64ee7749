"""Linear classifiers on frozen features: the linear probe (with a small sweep) and few-shot."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ProbeSetting:
    lr: float
    weight_decay: float


DEFAULT_SWEEP = tuple(ProbeSetting(lr, wd) for lr, wd in itertools.product((1e-3, 3e-3, 1e-2), (0.0, 1e-4, 1e-3)))


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every feature with the training set's statistics."""
    mean, std = train.mean(dim=0, keepdim=True), train.std(dim=0, keepdim=True).clamp(min=1e-6)
    return [(features - mean) / std for features in (train, *others)]


def train_linear_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    setting: ProbeSetting,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> nn.Linear:
    """Multinomial logistic regression trained with AdamW and a cosine learning rate."""
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0, 0.01, generator=generator)
        classifier.bias.zero_()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=setting.lr, weight_decay=setting.weight_decay)
    steps_per_epoch = max(1, -(-len(labels) // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(classifier(features[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return classifier


@torch.no_grad()
def predict(classifier: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    return classifier(features).argmax(dim=1)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_index, validation_index)`` with ``fraction`` of every class held out (at least one)."""
    generator = torch.Generator().manual_seed(seed)
    train_index, validation_index = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        n_validation = max(1, int(round(fraction * len(members)))) if len(members) > 1 else 0
        validation_index.append(members[:n_validation])
        train_index.append(members[n_validation:])
    return torch.cat(train_index), torch.cat(validation_index)


def sample_few_shot(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of ``shots`` random examples per class (all of a class if it has fewer)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique():
        members = (labels == label).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen)
