"""KoLeo-proto's candidate search (hf_koleo/koleo_neighbours.py): exact where it says so, cheap between refreshes."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from hf_koleo import KoLeoDinoForPreTraining
from hf_koleo.koleo_neighbours import (
    NeighbourCandidates,
    candidate_similarities,
    koleo_proto_with_candidates,
    nearest_candidates,
    neighbour_refresh,
    search_dtype,
)
from hf_koleo.losses import koleo_proto_loss, nearest_neighbours


def unit(rows: int = 300, dim: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1).float()


def dense_distances(vectors: torch.Tensor) -> torch.Tensor:
    distances = torch.cdist(vectors.double(), vectors.double())
    distances.fill_diagonal_(float("inf"))
    return distances


def test_the_candidates_are_each_rows_nearest_others_and_the_boundary_the_next_distance():
    vectors = unit()
    candidates, boundary = nearest_candidates(vectors, m=5, block_size=64)
    ranked = dense_distances(vectors).sort(dim=1)
    assert torch.equal(candidates, ranked.indices[:, :5])
    assert torch.allclose(boundary.double(), ranked.values[:, 5], atol=1e-5)
    everyone, no_boundary = nearest_candidates(vectors[:4], m=8)  # fewer rows than candidates: all of them
    assert everyone.shape == (4, 3) and torch.isinf(no_boundary).all()


def test_right_after_a_refresh_the_choice_is_the_exact_search_and_certified():
    vectors = unit()
    cache = NeighbourCandidates(300, 8, candidates=4)
    cache.refresh(vectors)
    index, certified = cache.choose(vectors)
    assert torch.equal(index, nearest_neighbours(vectors)[0]) and certified.all()


@pytest.mark.parametrize("drift", [0.0, 0.01, 0.05, 0.2, 1.0])
def test_wherever_a_choice_is_certified_it_is_the_exact_nearest_neighbour(drift):
    vectors = unit(seed=1)
    cache = NeighbourCandidates(300, 8, candidates=6)
    cache.refresh(vectors)
    generator = torch.Generator().manual_seed(2)
    moved = F.normalize(vectors + drift * torch.randn(vectors.shape, generator=generator) / 8**0.5, dim=1)
    index, certified = cache.choose(moved)
    exact = dense_distances(moved).argmin(dim=1)
    assert torch.equal(index[certified], exact[certified])
    if drift <= 0.01:
        assert certified.float().mean() > 0.5  # small moves keep most rows certified
    if drift >= 1.0:
        assert not certified.all()  # a large move is never certified blindly
    # the chosen neighbour is always the nearest of the row's candidates, certified or not
    chosen = dense_distances(moved).gather(1, index[:, None]).squeeze(1)
    best_candidate = dense_distances(moved).gather(1, cache.candidates).min(dim=1).values
    assert torch.allclose(chosen, best_candidate)


def test_the_loss_and_its_gradient_after_a_refresh_equal_the_exact_search():
    prototypes = torch.randn(200, 8, requires_grad=True)
    exact = koleo_proto_loss(prototypes)
    (exact_gradient,) = torch.autograd.grad(exact, prototypes)
    cache = NeighbourCandidates(200, 8, candidates=4)
    loss, fraction = koleo_proto_with_candidates(prototypes, cache, refresh=True)
    (gradient,) = torch.autograd.grad(loss, prototypes)
    assert torch.allclose(loss, exact) and torch.allclose(gradient, exact_gradient) and fraction == 1.0


def test_the_model_refreshes_when_asked_reuses_the_candidates_between_and_reports_the_certified_fraction():
    config = tiny_config(koleo_proto_weight=0.1, koleo_proto_search="candidates", koleo_proto_candidates=4)
    model = KoLeoDinoForPreTraining(config).train()
    exact_model = KoLeoDinoForPreTraining(tiny_config(koleo_proto_weight=0.1)).train()
    exact_model.load_state_dict(model.state_dict(), strict=False)
    crops = torch.randn(4, 2, 3, 16, 16)
    output = model(crops, refresh_neighbours=True)
    assert torch.allclose(output.koleo_proto_loss, exact_model(crops).koleo_proto_loss)
    assert output.koleo_proto_exact == 1.0 and exact_model(crops).koleo_proto_exact == 1.0
    cache = model.koleo_neighbours[0]
    candidates = cache.candidates.clone()
    with torch.no_grad():
        model.student_head.prototypes.add_(0.5 * torch.randn_like(model.student_head.prototypes))
    moved = model(crops, refresh_neighbours=False)
    assert torch.equal(cache.candidates, candidates)  # no search between refreshes
    assert 0.0 <= moved.koleo_proto_exact <= 1.0
    assert "koleo_neighbours.0.candidates" in model.state_dict()  # saved: a resumed run ranks the same lists


def test_a_bfloat16_search_keeps_its_boundary_a_lower_bound_so_certified_choices_stay_exact():
    vectors = unit(rows=400, dim=16, seed=3)
    candidates, boundary = nearest_candidates(vectors, m=6, dtype=torch.bfloat16)
    distances = dense_distances(vectors)
    outside = distances.clone()
    outside.scatter_(1, candidates, float("inf"))  # every row that is not a candidate
    assert (outside.min(dim=1).values >= boundary.double() - 1e-6).all()
    cache = NeighbourCandidates(400, 16, candidates=6, dtype=torch.bfloat16)
    cache.refresh(vectors)
    index, certified = cache.choose(vectors)
    assert certified.float().mean() > 0.5 and torch.equal(index[certified], distances.argmin(dim=1)[certified])


@pytest.mark.parametrize("native", [True, False])
def test_an_auto_search_is_bfloat16_only_where_the_cpu_multiplies_it(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert search_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert search_dtype("bfloat16", cpu) == torch.bfloat16 and search_dtype(torch.float32, cpu) == torch.float32
    vectors = unit(rows=400, dim=16, seed=3)
    cache = NeighbourCandidates(400, 16, candidates=6, dtype="auto")
    cache.refresh(vectors)
    expected = nearest_candidates(vectors, m=6, dtype=torch.bfloat16 if native else torch.float32)
    assert torch.equal(cache.candidates, expected[0]) and torch.equal(cache.boundary, expected[1])


def test_the_config_takes_auto_and_refuses_other_refresh_dtypes():
    from hf_koleo import KoLeoDinoConfig

    assert KoLeoDinoConfig(koleo_proto_refresh_dtype="auto").koleo_proto_refresh_dtype == "auto"
    with pytest.raises(ValueError, match="koleo_proto_refresh_dtype"):
        KoLeoDinoConfig(koleo_proto_refresh_dtype="float16")


def drifted(vectors: torch.Tensor, drift: float, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(vectors.shape, generator=generator) / vectors.shape[1] ** 0.5
    return F.normalize(vectors + drift * noise, dim=1)


@pytest.mark.parametrize("drift", [0.0, 0.02, 0.1, 0.5])
def test_fast_movers_and_repair_only_add_certified_rows_and_every_certified_choice_is_exact(drift):
    vectors = unit(seed=4)
    moved = drifted(vectors, drift)
    moved[:5] = unit(rows=5, seed=9)  # five prototypes jump far: they set max(moved) for everyone
    exact = dense_distances(moved).argmin(dim=1)
    certified_by = {}
    for movers, repair in ((0, 0), (8, 0), (8, 20)):
        cache = NeighbourCandidates(300, 8, candidates=6, movers=movers, repair=repair)
        cache.refresh(vectors)
        index, certified = cache.choose(moved)
        assert torch.equal(index[certified], exact[certified])
        certified_by[movers, repair] = certified
    plain, with_movers, repaired = certified_by.values()
    assert (with_movers | ~plain).all() and (repaired | ~with_movers).all()  # supersets
    assert repaired.sum() >= min(300, with_movers.sum() + 20)  # 20 more rows, or all of them
    if drift <= 0.02:  # the jumps left the others near: without movers the bound certifies nothing
        assert plain.sum() == 0 and with_movers.float().mean() > 0.5


def test_a_fast_mover_that_lands_next_to_a_row_is_chosen_even_though_it_is_not_a_candidate():
    vectors = unit(seed=5)
    cache = NeighbourCandidates(300, 8, candidates=4, movers=3)
    cache.refresh(vectors)
    outsider = int(dense_distances(vectors)[0].argsort()[-2])  # row 0's farthest ([-1]: itself, at inf)
    moved = vectors.clone()
    moved[outsider] = F.normalize(vectors[0] + 1e-3 * unit(rows=1, seed=6)[0], dim=0)
    index, certified = cache.choose(moved)
    assert index[0] == outsider and certified[0]
    assert torch.equal(index[certified], dense_distances(moved).argmin(dim=1)[certified])


def test_repairing_every_row_is_the_exact_search_however_far_the_prototypes_moved():
    vectors = unit(seed=7)
    cache = NeighbourCandidates(300, 8, candidates=2, repair=300)
    cache.refresh(vectors)
    moved = drifted(vectors, 1.0)
    index, certified = cache.choose(moved)
    assert certified.all() and torch.equal(index, dense_distances(moved).argmin(dim=1))


def test_the_cpu_ranking_is_ieee_fp32_whatever_the_matmul_precision_setting():
    vectors = unit(rows=500, dim=32, seed=8)
    candidates, _ = nearest_candidates(vectors, m=8)
    reference = (vectors[:, None, :].double() * vectors[candidates].double()).sum(-1)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # bf16 passes allowed where the CPU has them
        similarities = candidate_similarities(vectors, candidates)
        assert torch.get_float32_matmul_precision() == "medium"  # the user's setting is restored
    finally:
        torch.set_float32_matmul_precision(previous)
    assert (similarities.double() - reference).abs().max() < 1e-5


def test_the_model_passes_movers_and_repair_to_its_candidate_lists_and_rejects_negative_values():
    config = tiny_config(
        koleo_proto_weight=0.1, koleo_proto_search="candidates", koleo_proto_movers=4, koleo_proto_repair=2
    )
    cache = KoLeoDinoForPreTraining(config).koleo_neighbours[0]
    assert (cache.movers, cache.repair) == (4, 2)
    with pytest.raises(ValueError, match="koleo_proto_movers"):
        tiny_config(koleo_proto_movers=-1)


@pytest.mark.parametrize("drift", [0.0, 0.05, 0.2, 1.0])
def test_an_update_keeps_the_boundary_a_lower_bound_and_certified_choices_exact(drift):
    vectors = unit(rows=400, dim=8, seed=10)
    cache = NeighbourCandidates(400, 8, candidates=5)
    cache.refresh(vectors)
    moved = drifted(vectors, drift, seed=11)
    cache.update(moved)
    distances = dense_distances(moved)
    outside = distances.clone()
    outside.scatter_(1, cache.candidates, float("inf"))  # every prototype not in the new lists
    assert (outside.min(dim=1).values >= cache.boundary.double() - 1e-6).all()
    assert torch.equal(cache.reference, moved)
    lists = cache.candidates.sort(dim=1).values
    assert (lists[:, 1:] != lists[:, :-1]).all()  # no prototype twice in a list
    assert (cache.candidates != torch.arange(400)[:, None]).all()  # nor a prototype in its own list
    further = drifted(moved, drift / 2, seed=12)  # and after the update the prototypes move on
    index, certified = cache.choose(further)
    assert torch.equal(index[certified], dense_distances(further).argmin(dim=1)[certified])


def test_an_update_finds_neighbours_that_left_the_lists_and_a_full_search_resets_it():
    vectors = unit(rows=400, dim=8, seed=13)
    stale = NeighbourCandidates(400, 8, candidates=8)
    stale.refresh(vectors)
    updated = NeighbourCandidates(400, 8, candidates=8)
    updated.load_state_dict(stale.state_dict())
    moved = vectors
    for seed in range(5):  # five small moves, an update after each
        moved = drifted(moved, 0.1, seed=20 + seed)
        updated.update(moved)
    exact = dense_distances(moved).argmin(dim=1)
    stale_exact = (stale.choose(moved)[0] == exact).float().mean()
    updated_exact = (updated.choose(moved)[0] == exact).float().mean()
    assert updated_exact > stale_exact and updated_exact > 0.95
    # right after an update, each list holds the nearest of the ranked prototypes, nearest first
    ranked = dense_distances(moved).gather(1, updated.candidates)
    assert (ranked[:, 1:] >= ranked[:, :-1]).all()
    updated.refresh(moved)
    assert torch.equal(updated.candidates, nearest_candidates(moved, 8)[0])
    few = NeighbourCandidates(20, 8, candidates=8)  # m + m² candidates' candidates outnumber the prototypes
    few.refresh(vectors[:20])
    few.update(moved[:20])
    assert torch.equal(few.candidates, nearest_candidates(moved[:20], 8)[0])  # every other one was ranked


def test_the_refresh_schedule_full_every_period_updates_between_and_rejects_unknown_kinds():
    schedule = [neighbour_refresh(step, 6, 2) for step in range(7)]
    assert schedule == ["full", "none", "update", "none", "update", "none", "full"]
    assert [neighbour_refresh(step, 3) for step in range(4)] == ["full", "none", "none", "full"]
    cache = NeighbourCandidates(50, 8, candidates=4)
    prototypes = torch.randn(50, 8)
    koleo_proto_with_candidates(prototypes, cache, "full")
    before = cache.candidates.clone()
    koleo_proto_with_candidates(prototypes, cache, False)
    assert torch.equal(cache.candidates, before)
    with pytest.raises(ValueError, match="refresh must be one of"):
        koleo_proto_with_candidates(prototypes, cache, "partial")
    with pytest.raises(ValueError, match="koleo_proto_update_every"):
        tiny_config(koleo_proto_update_every=-1)
