import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.koleo_reference import dinov2_koleo_loss
from hf_koleo import dino_loss, ibot_patch_loss, koleo_proto_loss, masked_patch_slots, sinkhorn_knopp
from hf_koleo.koleo_neighbours import NeighbourCandidates, nearest_candidates
from hf_koleo.losses import nearest_neighbours
from hf_koleo.prototypes import unique_prototype_curve


def dense_koleo_oracle(prototypes: torch.Tensor) -> torch.Tensor:
    """The KoLeo formula read literally: min over the full differentiable ``K x K`` distance matrix."""
    unit = F.normalize(prototypes, p=2, dim=-1)
    distances = torch.cdist(unit, unit)
    distances = distances + torch.diag(torch.full((unit.shape[0],), float("inf"), dtype=unit.dtype))
    return -torch.log(distances.min(dim=1).values + 1e-8).mean()


def _value_and_gradient(loss_fn, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = prototypes.clone().requires_grad_(True)
    loss = loss_fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("block_size", [1, 7, 64, None])
def test_blocked_koleo_proto_matches_dense_oracle_value_and_gradient(block_size):
    prototypes = torch.randn(50, 6, dtype=torch.float64)
    blocked, blocked_grad = _value_and_gradient(lambda p: koleo_proto_loss(p, block_size=block_size), prototypes)
    dense, dense_grad = _value_and_gradient(dense_koleo_oracle, prototypes)
    assert torch.allclose(blocked, dense, rtol=1e-12, atol=1e-12)
    assert torch.allclose(blocked_grad, dense_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block_size", [1, 7, None])
def test_koleo_proto_matches_dinov2_algorithm_with_our_regularisation(block_size):
    prototypes = torch.randn(50, 6, dtype=torch.float64)
    ours, ours_grad = _value_and_gradient(lambda p: koleo_proto_loss(p, block_size=block_size), prototypes)
    dinov2, dinov2_grad = _value_and_gradient(
        lambda p: dinov2_koleo_loss(p, pairwise_eps=0.0, normalize_eps=1e-12), prototypes
    )
    assert torch.allclose(ours, dinov2, rtol=1e-12, atol=1e-12)
    assert torch.allclose(ours_grad, dinov2_grad, rtol=1e-9, atol=1e-12)


def test_dinov2_regularisation_differs_from_ours_only_at_its_eps_scale():
    # DINOv2's PairwiseDistance adds 1e-8 to every component of u_i - u_j; ours measures the plain distance.
    prototypes = torch.randn(50, 6, dtype=torch.float64)
    ours, ours_grad = _value_and_gradient(koleo_proto_loss, prototypes)
    dinov2, dinov2_grad = _value_and_gradient(dinov2_koleo_loss, prototypes)
    assert 0 < abs(float(ours - dinov2)) < 1e-6
    assert torch.allclose(ours_grad, dinov2_grad, rtol=1e-5, atol=1e-7)


def test_koleo_proto_is_scale_invariant_per_row():
    prototypes = torch.randn(20, 4, dtype=torch.float64)
    scales = torch.rand(20, 1, dtype=torch.float64) * 10 + 0.1
    assert torch.allclose(koleo_proto_loss(prototypes), koleo_proto_loss(prototypes * scales))


def test_collapsed_prototypes_score_worse_than_spread_ones():
    spread = torch.randn(32, 8)
    collapsed = spread.clone()
    collapsed[16:] = collapsed[:16] + 1e-3 * torch.randn(16, 8)
    assert koleo_proto_loss(collapsed) > koleo_proto_loss(spread) + 1.0


def test_gradient_step_on_duplicated_prototypes_increases_their_distance():
    base = torch.randn(8, 16, dtype=torch.float64)
    prototypes = torch.cat([base, base + 1e-3 * torch.randn(8, 16, dtype=torch.float64)]).requires_grad_(True)
    _, before = nearest_neighbours(F.normalize(prototypes.detach(), dim=-1))
    koleo_proto_loss(prototypes).backward()
    with torch.no_grad():
        stepped = prototypes - 1e-3 * prototypes.grad
    _, after = nearest_neighbours(F.normalize(stepped, dim=-1))
    assert after.min() > before.min() * 1.5


def test_exactly_equal_prototypes_give_finite_loss_and_gradient():
    prototypes = torch.ones(4, 3, requires_grad=True)
    loss = koleo_proto_loss(prototypes)
    loss.backward()
    assert math.isclose(loss.item(), -math.log(1e-8), rel_tol=1e-6)
    assert torch.isfinite(prototypes.grad).all()


def test_nearest_neighbours_excludes_self_and_matches_brute_force():
    unit = F.normalize(torch.randn(30, 5, dtype=torch.float64), dim=-1)
    indices, distances = nearest_neighbours(unit, block_size=4)
    brute = torch.cdist(unit, unit).fill_diagonal_(float("inf"))
    assert torch.equal(indices, brute.argmin(dim=1))
    assert torch.allclose(distances, brute.min(dim=1).values, atol=1e-7)


def test_nearest_neighbours_are_searched_in_full_precision_inside_a_bf16_forward():
    # Close pairs at distances 0.01-0.05: bf16 similarities (steps of 2**-8 near 1) cannot rank them.
    torch.manual_seed(0)
    base = F.normalize(torch.randn(256, 32), dim=1)
    vectors = F.normalize(torch.cat([base + 0.004 * k * torch.randn(256, 32) for k in range(1, 4)]), dim=1)
    expected = nearest_neighbours(vectors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = nearest_neighbours(vectors)
        loss = koleo_proto_loss(vectors)
    assert torch.equal(found[0], expected[0]) and torch.allclose(found[1], expected[1])
    assert loss.item() == pytest.approx(koleo_proto_loss(vectors).item(), rel=1e-6)


class MatmulPrecisionSpy(TorchDispatchMode):
    """Records the fp32 matmul precision in force at every matrix product run inside it."""

    PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::dot")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.PRODUCTS:
            self.seen.append(torch.get_float32_matmul_precision())
        return func(*args, **(kwargs or {}))


def test_searches_and_unique_counts_stay_ieee_fp32_where_the_user_allows_tf32():
    rows = F.normalize(torch.randn(300, 16, dtype=torch.float64), dim=-1).float()
    cache = NeighbourCandidates(300, 16, 4)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls on a GPU (bf16 passes on some CPUs)
    try:
        with MatmulPrecisionSpy() as spy:
            nearest_neighbours(rows, block_size=64)
            nearest_candidates(rows, 4, block_size=64)
            unique_prototype_curve(rows, [0.01, 0.1], block_size=64)
            cache.refresh(rows)
            cache.choose(rows)  # ranks candidates with products and sums: no matmul at all
        after = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert len(spy.seen) >= 3 and set(spy.seen) == {"highest"}, spy.seen
    assert after == "high"  # the user's setting is restored


def test_koleo_proto_rejects_a_single_prototype():
    with pytest.raises(ValueError, match="at least 2"):
        koleo_proto_loss(torch.randn(1, 4))


def test_dino_loss_matches_hand_computed_value():
    # batch 1, two global views, one local view, K = 2.
    teacher_probs = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    student_logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]]])

    # student softmax at temperature 1: view0 (.5,.5), view1 (.75,.25), view2 (.25,.75)
    def cross_entropy(p, q):
        return -sum(pi * math.log(qi) for pi, qi in zip(p, q))

    pairs = [
        cross_entropy((0.75, 0.25), (0.75, 0.25)),  # teacher 0 vs student 1
        cross_entropy((0.75, 0.25), (0.25, 0.75)),  # teacher 0 vs student 2
        cross_entropy((0.5, 0.5), (0.5, 0.5)),  # teacher 1 vs student 0
        cross_entropy((0.5, 0.5), (0.25, 0.75)),  # teacher 1 vs student 2
    ]
    expected = sum(pairs) / 4
    assert math.isclose(float(dino_loss(student_logits, teacher_probs, 1.0)), expected, rel_tol=1e-6)


def test_dino_loss_is_mean_over_batch():
    student = torch.randn(3, 4, 10)
    teacher = torch.softmax(torch.randn(3, 2, 10), dim=-1)
    per_image = [dino_loss(student[i : i + 1], teacher[i : i + 1], 0.1) for i in range(3)]
    assert torch.allclose(dino_loss(student, teacher, 0.1), torch.stack(per_image).mean(), atol=1e-6)


def test_dino_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="does not match"):
        dino_loss(torch.randn(2, 3, 5), torch.randn(2, 2, 6), 0.1)


def test_masked_patch_slots_put_masked_patches_first_and_average_per_image_then_over_images():
    masks = torch.tensor([[False, True, False, True], [False, False, False, True], [False] * 4])
    slot_index, weights = masked_patch_slots(masks, n_slots=5)
    assert slot_index.shape == (5,) and weights.shape == (5,)
    assert slot_index[:3].tolist() == [1, 3, 7]
    assert torch.allclose(weights, torch.tensor([1 / 6, 1 / 6, 1 / 3, 0.0, 0.0]))
    # Fewer slots than masked patches: the last ones leave the loss, the others are re-weighted.
    slot_index, weights = masked_patch_slots(masks, n_slots=2)
    assert slot_index.tolist() == [1, 3] and torch.allclose(weights, torch.tensor([1 / 6, 1 / 6]))


def test_sinkhorn_knopp_ignores_invalid_rows_and_survives_none_valid():
    logits = torch.randn(6, 5)
    valid = torch.tensor([True, True, False, True, False, False])
    probs = sinkhorn_knopp(logits, 0.1, 3, valid=valid)
    assert torch.allclose(probs[valid], sinkhorn_knopp(logits[valid], 0.1, 3), atol=1e-6)
    assert (probs[~valid] == 0).all()
    assert torch.isfinite(sinkhorn_knopp(logits, 0.1, 3, valid=torch.zeros(6, dtype=torch.bool))).all()


def test_ibot_patch_loss_equals_weighted_cross_entropy():
    student = torch.randn(5, 7)
    teacher = torch.softmax(torch.randn(5, 7), dim=-1)
    weights = torch.rand(5)
    expected = (-(teacher * F.log_softmax(student / 0.1, dim=-1)).sum(-1) * weights).sum()
    assert torch.allclose(ibot_patch_loss(student, teacher, weights, 0.1), expected)


def test_sinkhorn_knopp_rows_sum_to_one_and_columns_balance():
    logits = torch.randn(64, 8) * 3
    assignments = sinkhorn_knopp(logits, teacher_temperature=1.0, n_iterations=50)
    assert torch.allclose(assignments.sum(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(assignments.sum(dim=0), torch.full((8,), 8.0), atol=1e-3)
