"""Weighted k-nearest-neighbour classification on frozen features, exactly as DINO evaluates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_K = (10, 20, 100, 200)


@torch.no_grad()
def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k_values=DEFAULT_K,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Predictions for every k: cosine similarity, top-k neighbours, votes ``exp(sim / T)``.

    Args:
        train_features: ``(n_train, d)``; test_features: ``(n_test, d)`` (normalised here).
        train_labels: ``(n_train,)`` class ids.
        k_values: neighbour counts (each capped at ``n_train``).
        temperature: DINO's 0.07.

    Returns:
        ``{k: (n_test,) predicted class ids}``.
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    num_classes = num_classes or int(train_labels.max()) + 1
    max_k = min(max(k_values), train.shape[0])
    predictions: dict[int, list[torch.Tensor]] = {k: [] for k in k_values}
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start : start + chunk_size] @ train.t()
        top_similarity, top_index = similarity.topk(max_k, dim=1)
        neighbour_labels = train_labels[top_index]
        weights = (top_similarity / temperature).exp()
        for k in k_values:
            k_used = min(k, max_k)
            votes = torch.zeros(top_index.shape[0], num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :k_used], weights[:, :k_used])
            predictions[k].append(votes.argmax(dim=1))
    return {k: torch.cat(chunks) for k, chunks in predictions.items()}
