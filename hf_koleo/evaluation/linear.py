"""Linear classifiers on frozen features: the linear probe (with a small sweep) and few-shot."""

from __future__ import annotations

import itertools
import math
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


def train_linear_classifiers(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    settings: tuple[ProbeSetting, ...] | list[ProbeSetting],
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
) -> list[nn.Linear]:
    """One multinomial logistic regression per setting, trained together: AdamW with a cosine
    learning rate (``torch.optim.AdamW`` + ``CosineAnnealingLR``, written out over a stack of
    classifiers so a sweep costs one pass over the minibatches instead of one per setting).

    Every classifier starts from the same initialisation and sees the same minibatches (seeded by
    ``seed``), so each equals the one trained alone with its setting.
    """
    generator = torch.Generator().manual_seed(seed)
    n_settings, dim = len(settings), features.shape[1]
    weight = torch.empty(num_classes, dim).normal_(0, 0.01, generator=generator)
    weight = weight.to(features.device).expand(n_settings, -1, -1).clone()  # (S, C, D)
    bias = torch.zeros(n_settings, 1, num_classes, device=features.device)
    shape = (n_settings, 1, 1)
    base_lr = torch.tensor([s.lr for s in settings], device=features.device).reshape(shape)
    decay = torch.tensor([s.weight_decay for s in settings], device=features.device).reshape(shape)
    state = [(torch.zeros_like(weight), torch.zeros_like(weight)), (torch.zeros_like(bias), torch.zeros_like(bias))]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    steps_per_epoch = max(1, -(-len(labels) // batch_size))
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size].to(features.device)
            weight.requires_grad_(True)
            bias.requires_grad_(True)
            logits = torch.baddbmm(bias, features[index].expand(n_settings, -1, -1), weight.transpose(1, 2))
            targets = labels[index].expand(n_settings, -1)
            # sum over settings of each one's mean cross-entropy: each classifier gets its own gradient
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / len(index)
            gradients = torch.autograd.grad(loss, (weight, bias))
            lr = base_lr * (1 + math.cos(math.pi * step / total)) / 2
            step += 1
            with torch.no_grad():
                weight, bias = weight.detach(), bias.detach()
                for parameter, gradient, (first, second) in zip((weight, bias), gradients, state):
                    parameter.mul_(1 - lr * decay)
                    first.lerp_(gradient, 1 - beta1)
                    second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
                    denominator = (second / (1 - beta2**step)).sqrt_().add_(eps)
                    parameter.sub_(lr / (1 - beta1**step) * first / denominator)
    classifiers = []
    for index in range(n_settings):
        classifier = nn.Linear(dim, num_classes).to(features.device)
        with torch.no_grad():
            classifier.weight.copy_(weight[index])
            classifier.bias.copy_(bias[index, 0])
        classifiers.append(classifier)
    return classifiers


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
    return train_linear_classifiers(features, labels, num_classes, [setting], epochs, batch_size, seed)[0]


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
