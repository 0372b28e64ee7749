import pytest
import torch
from conftest import tiny_config

from hf_koleo import KoLeoDinoForPreTraining
from hf_koleo.evaluation.clusters import (
    adjusted_rand_index,
    cluster_metrics,
    contingency,
    normalized_mutual_information,
    teacher_assignments,
)
from hf_koleo.prototypes import cosine_to_prototypes


def test_nmi_and_ari_match_their_definitions_on_a_worked_example():
    # classes {0,0,0,1,1,1}, clusters {0,0,1,1,2,2}: MI = (2/3) ln 2, H = ln 2 and ln 3, so
    # NMI = (2/3) ln 2 / ((ln 2 + ln 3) / 2) = 0.5158; ARI = (2 - 1.2) / (4.5 - 1.2) = 0.2424
    # (the values scikit-learn gives for this pair).
    table, _ = contingency(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert normalized_mutual_information(table) == pytest.approx(0.5158037, abs=1e-6)
    assert adjusted_rand_index(table) == pytest.approx(0.2424242, abs=1e-6)


def test_perfect_and_trivial_clusterings():
    labels = torch.tensor([3, 3, 5, 5, 7, 7])
    perfect = cluster_metrics(torch.tensor([10, 10, 4, 4, 99, 99]), labels)  # any cluster ids
    assert (perfect["nmi"], perfect["ari"], perfect["purity"]) == (pytest.approx(1.0), pytest.approx(1.0), 1.0)
    assert perfect["clusters_used"] == 3 and perfect["clusters_for_coverage"] == {3: 1, 5: 1, 7: 1}
    one = cluster_metrics(torch.zeros(6, dtype=torch.long), labels)
    assert one["nmi"] == 0.0 and one["ari"] == pytest.approx(0.0) and one["purity"] == pytest.approx(1 / 3)


def test_a_rare_class_absorbed_into_a_frequent_ones_clusters_owns_none():
    # class 1 (2 images) shares cluster 0 with 8 images of class 0; class 0 also fills cluster 1.
    labels = torch.tensor([0] * 8 + [1] * 2 + [0] * 4)
    assignments = torch.tensor([0] * 10 + [1] * 4)
    metrics = cluster_metrics(assignments, labels)
    assert metrics["own_clusters"] == {0: 2, 1: 0} and metrics["in_own_clusters"] == {0: 1.0, 1: 0.0}
    # 90 % of class 0's 12 images needs both clusters (8 + 4); class 1's two fit in one.
    assert metrics["clusters_for_coverage"] == {0: 2, 1: 1}
    with pytest.raises(ValueError, match="one assignment per label"):
        cluster_metrics(assignments[:3], labels)


def test_teacher_assignments_are_the_teachers_arg_max_over_its_prototypes():
    model = KoLeoDinoForPreTraining(tiny_config()).eval()
    pixels = torch.randn(12, 3, 8, 8)
    with torch.no_grad():
        cls = model.teacher(pixels).pooler_output
        head = model.prototype_heads("teacher")["cls"]
        expected = cosine_to_prototypes(model.head_embeddings(pixels), head.prototype_vectors()).argmax(dim=1)
    assert torch.equal(teacher_assignments(model, cls), expected)
