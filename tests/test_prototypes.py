import math

import pytest
import torch
import torch.nn.functional as F

from hf_koleo import count_unique_prototypes, marginal_entropy, unique_prototype_curve, utilisation


def grouped_prototypes(group_sizes, spread, dim=16):
    centres = F.normalize(torch.randn(len(group_sizes), dim, dtype=torch.float64), dim=-1)
    rows = [centre + spread * torch.randn(size, dim, dtype=torch.float64) for centre, size in zip(centres, group_sizes)]
    return torch.cat(rows)[torch.randperm(sum(group_sizes))]


def brute_force_components(prototypes, eps):
    unit = F.normalize(prototypes, dim=-1)
    adjacency = torch.cdist(unit, unit) < eps
    labels = list(range(len(unit)))

    def find(node):
        while labels[node] != node:
            labels[node] = labels[labels[node]]
            node = labels[node]
        return node

    for i, j in adjacency.nonzero().tolist():
        labels[find(i)] = find(j)
    return len({find(i) for i in range(len(unit))})


def test_tight_groups_count_as_one_prototype_each():
    prototypes = grouped_prototypes([5, 1, 12, 3, 7], spread=1e-4)
    assert count_unique_prototypes(prototypes, eps=0.025) == 5


def test_spread_prototypes_are_all_unique():
    assert count_unique_prototypes(torch.randn(100, 32), eps=0.025) == 100


def test_unique_count_grows_as_eps_shrinks():
    prototypes = grouped_prototypes([4, 4, 4], spread=0.01)
    curve = unique_prototype_curve(prototypes, [1e-6, 0.2, 1.9])
    assert curve[1e-6] == 12
    assert curve[0.2] == 3
    assert curve[1.9] == 1


@pytest.mark.parametrize("eps", [0.05, 0.3, 0.8])
@pytest.mark.parametrize("block_size", [1, 5, None])
def test_blocked_components_match_brute_force_union_find(eps, block_size):
    prototypes = torch.randn(60, 3, dtype=torch.float64)  # low dimension: long chains at large eps
    expected = brute_force_components(prototypes, eps)
    assert unique_prototype_curve(prototypes, [eps], block_size=block_size)[eps] == expected


@pytest.mark.parametrize("block_size", [7, None])
def test_merged_groups_spanning_blocks_match_brute_force(block_size):
    # Dense adjacency (most rows have many neighbours), groups cut across blocks, and groups that touch
    # at the larger eps only: the case where a collapsed run spends its time.
    torch.manual_seed(1)
    prototypes = grouped_prototypes([40, 25, 25, 10, 5, 1, 1, 30], spread=0.004)
    eps_values = [0.005, 0.02, 0.05, 1.2]
    curve = unique_prototype_curve(prototypes, eps_values, block_size=block_size)
    assert curve == {eps: brute_force_components(prototypes, eps) for eps in eps_values}
    assert curve[0.05] == 8


def test_chain_of_neighbours_forms_one_component():
    # Points on a circle 0.01 apart: only neighbours link, yet all are connected.
    angles = torch.arange(200, dtype=torch.float64) * 0.01
    chain = torch.stack([angles.cos(), angles.sin()], dim=1)[torch.randperm(200)]
    assert count_unique_prototypes(chain, eps=0.015) == 1
    assert count_unique_prototypes(chain, eps=0.005) == 200


def test_invalid_eps_is_rejected():
    with pytest.raises(ValueError, match="eps"):
        count_unique_prototypes(torch.randn(4, 3), eps=0.0)


def test_utilisation_counts_prototypes_used_at_least_once():
    stats = utilisation(torch.tensor([0, 0, 3, 3, 3, 7]), num_prototypes=10)
    assert stats["used"] == 3
    assert stats["used_fraction"] == pytest.approx(0.3)
    expected_entropy = -(2 / 6 * math.log(2 / 6) + 3 / 6 * math.log(3 / 6) + 1 / 6 * math.log(1 / 6))
    assert stats["assignment_entropy"] == pytest.approx(expected_entropy)


def test_marginal_entropy_of_uniform_rows_is_log_k():
    assert marginal_entropy(torch.full((5, 8), 1 / 8)) == pytest.approx(math.log(8))
    assert marginal_entropy(torch.eye(8)[torch.zeros(5, dtype=torch.long)]) == pytest.approx(0.0)


def test_unique_counts_inside_a_bf16_autocast_region_match_full_precision():
    torch.manual_seed(0)
    base = F.normalize(torch.randn(200, 16), dim=1)
    prototypes = torch.cat([base, base + 0.003 * torch.randn(200, 16), base + 0.02 * torch.randn(200, 16)])
    expected = unique_prototype_curve(prototypes, [0.01, 0.025, 0.05])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unique_prototype_curve(prototypes, [0.01, 0.025, 0.05]) == expected
