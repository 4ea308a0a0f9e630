"""Metrics against values computed by hand: ties, reference exclusion, subsets, |GT| > K."""

import math

import numpy as np
import pytest
import torch

from isearle import metrics as M

INF = math.inf

# One query row used throughout: gallery indices 0..5.
#   index:  0    1    2    3    4    5
#   score: .5   .9   .5   .1   .9   .3
# Stable order (score desc, ties by gallery index): 1, 4, 0, 2, 5, 3
ROW = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9, 0.3]])


def test_target_ranks_ties_broken_by_gallery_order():
    ranks = M.target_ranks(ROW, torch.tensor([[1, 4, 0, 2, 5, 3]]))
    assert ranks.tolist() == [[1, 2, 3, 4, 5, 6]]


def test_target_ranks_reference_exclusion():
    # removing index 1 (the reference): order 4, 0, 2, 5, 3; the reference itself is a miss
    ranks = M.target_ranks(ROW, torch.tensor([[4, 2, 3, 1]]), exclude=torch.tensor([[1]]))
    assert ranks.tolist() == [[1, 3, 5, INF]]


def test_target_ranks_subset_and_padding():
    # ranking only {0, 2, 3, 5} minus the reference 0: order 2, 5, 3; item 4 is outside the subset; -1 pads
    ranks = M.target_ranks(ROW, torch.tensor([[3, 4, -1]]), exclude=torch.tensor([[0]]),
                           allowed=torch.tensor([[0, 2, 3, 5]]))
    assert ranks.tolist() == [[3, INF, INF]]


def test_top_k_order_matches_ranks_and_excludes():
    assert M.top_k(ROW, 4).tolist() == [[1, 4, 0, 2]]
    assert M.top_k(ROW, 3, exclude=torch.tensor([[1]])).tolist() == [[4, 0, 2]]
    assert M.top_k(ROW, 3, exclude=torch.tensor([[0]]), allowed=torch.tensor([[0, 2, 3, 5]])).tolist() == [[2, 5, 3]]
    # k beyond the ranked items pads with -1
    assert M.top_k(ROW, 4, exclude=torch.tensor([[0]]), allowed=torch.tensor([[0, 2, 3, -1]])).tolist() == \
        [[2, 3, -1, -1]]


def test_top_k_equals_a_stable_full_sort_with_many_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (32, 200), generator=gen).float()
    exclude = torch.randint(0, 200, (32, 2), generator=gen)
    masked = scores.clone()
    masked.scatter_(1, exclude, -INF)
    expected = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :50]
    assert torch.equal(M.top_k(scores, 50, exclude), expected)
    # and ranks read from the top list equal exact ranks wherever they are within it
    targets = torch.randint(-1, 200, (32, 5), generator=gen)
    exact = M.target_ranks(scores, targets, exclude)
    short = M.ranks_in_top(M.top_k(scores, 50, exclude), targets)
    assert torch.equal(torch.where(exact <= 50, exact, torch.full_like(exact, INF)), short)


def test_best_rank():
    relevant = torch.tensor([[True, False, True, False, False, True]])
    assert M.best_rank(ROW, relevant).tolist() == [3]  # items 0 (rank 3), 2 (4), 5 (5)
    assert M.best_rank(ROW, relevant, exclude=torch.tensor([[0]])).tolist() == [3]  # 1, 4, then 2
    assert M.best_rank(ROW, torch.zeros(1, 6, dtype=torch.bool)).tolist() == [INF]


def test_ranks_from_lists():
    lists = [["a", "b", "c"], ["c", "a"]]
    assert M.ranks_from_lists(lists, [["b", "z"], ["a"]]).tolist() == [[2, INF], [2, INF]]


def test_recall_first_and_any():
    ranks = torch.tensor([[1.0, 7.0], [6.0, 2.0], [60.0, INF], [INF, INF]])
    assert M.recall_at_k(ranks, (1, 5, 10, 50)) == {1: 25.0, 5: 25.0, 10: 50.0, 50: 50.0}
    assert M.recall_at_k(ranks, (1, 5, 10, 50), mode="any") == {1: 25.0, 5: 50.0, 10: 50.0, 50: 50.0}


def test_average_precision_more_ground_truths_than_k():
    # 7 ground truths at ranks 1, 3, 4, 6, 9, 12, 30 (one padding slot)
    ranks = torch.tensor([[4.0, 1.0, 30.0, 3.0, 9.0, 6.0, 12.0, INF]])
    n = [7]
    ap5 = (1 / 1 + 2 / 3 + 3 / 4) / 5  # min(|GT|, K) = K = 5
    ap10 = (1 / 1 + 2 / 3 + 3 / 4 + 4 / 6 + 5 / 9) / 7  # min(7, 10) = 7
    ap50 = (1 / 1 + 2 / 3 + 3 / 4 + 4 / 6 + 5 / 9 + 6 / 12 + 7 / 30) / 7
    assert M.average_precision_at_k(ranks, 5, n).item() == pytest.approx(ap5)
    assert M.average_precision_at_k(ranks, 10, n).item() == pytest.approx(ap10)
    assert M.average_precision_at_k(ranks, 50, n).item() == pytest.approx(ap50)
    # a ground truth absent from the gallery still counts in |GT| (official script: len(gt_img_ids))
    assert M.average_precision_at_k(torch.tensor([[1.0, INF]]), 10, [2]).item() == pytest.approx(0.5)


def test_map_and_aspects():
    ranks = torch.tensor([[2.0, 5.0], [INF, INF], [1.0, INF]])
    n = [2, 1, 1]
    ap10 = [(1 / 2 + 2 / 5) / 2, 0.0, 1.0]
    out = M.circo_metrics(ranks, n, [["addition", "negation"], ["addition"], ["viewpoint"]])
    assert out["mAP@10"] == pytest.approx(100 * sum(ap10) / 3)
    assert out["mAP@5"] == pytest.approx(100 * sum(ap10) / 3)
    assert out["R@5"] == pytest.approx(200 / 3)  # first targets at 2, inf, 1
    assert out["per_aspect"]["addition"] == pytest.approx(100 * (ap10[0] + ap10[1]) / 2)
    assert out["per_aspect"]["negation"] == pytest.approx(100 * ap10[0])
    assert out["per_aspect"]["viewpoint"] == pytest.approx(100.0)
    assert math.isnan(out["per_aspect"]["cardinality"])
    assert list(out["per_aspect"]) == list(M.CIRCO_ASPECTS)


def test_circo_map_equals_the_official_script_on_random_rankings():
    """The official CIRCO evaluation (np.isin + cumsum on top-50 lists), re-typed here, on random data."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(40, 300, generator=gen)
    gts = [torch.randperm(300, generator=gen)[: int(torch.randint(1, 25, (1,), generator=gen))].tolist()
           for _ in range(40)]
    top = M.top_k(scores, 50)
    ranks = M.ranks_in_top(top, M.pad_indices(gts))
    ours = M.map_at_k(ranks, (5, 10, 25, 50), [len(g) for g in gts])
    for k in (5, 10, 25, 50):
        aps = []
        for pred, gt in zip(top.numpy(), gts, strict=True):
            labels = np.isin(pred, gt)
            precisions = np.cumsum(labels) * labels / np.arange(1, len(labels) + 1)
            aps.append(np.sum(precisions[:k]) / min(len(gt), k))
        assert ours[k] == pytest.approx(100 * np.mean(aps))


def test_cirr_metrics():
    out = M.cirr_metrics(torch.tensor([[1.0], [3.0], [7.0], [60.0]]), torch.tensor([1.0, 2.0, 4.0, 1.0]))
    assert {k: out[k] for k in ("R@1", "R@5", "R@10", "R@50")} == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0, "R@50": 75.0}
    assert {k: out[k] for k in ("Rs@1", "Rs@2", "Rs@3")} == {"Rs@1": 50.0, "Rs@2": 75.0, "Rs@3": 75.0}
    assert out["avg"] == 50.0


def test_fashioniq_average_and_domains():
    out = M.fashioniq_metrics({"dress": torch.tensor([5.0, 12.0]), "shirt": torch.tensor([2.0]),
                               "toptee": torch.tensor([13.0, INF])})
    assert out["per_category"]["dress"] == {"R@10": 50.0, "R@50": 100.0}
    assert out["R@10"] == pytest.approx((50 + 100 + 0) / 3)
    assert out["R@50"] == pytest.approx((100 + 100 + 50) / 3)
    # Pic2Word recall: fraction of the relevant images in the top K; no relevant image -> 0
    rel = torch.zeros(3, 50, dtype=torch.bool)
    rel[0, [0, 20]] = True  # 1 of 2 in the top 10, 2 of 2 in the top 50
    rel[1, 12] = True  # 0 of 4 in the top 10, 1 of 4 in the top 50
    out = M.domain_metrics({"toy": (rel, [2, 4, 0])})
    assert out["per_domain"]["toy"]["R@10"] == pytest.approx(100 * (1 / 2) / 3)
    assert out["per_domain"]["toy"]["R@50"] == pytest.approx(100 * (1 + 1 / 4) / 3)


def test_any_gt_metrics_per_edit():
    ranks = torch.tensor([[3.0, 1.0], [INF, 8.0]])
    out = M.any_gt_metrics(ranks, [2, 2], ["colour", "shape"])
    assert out["R@1"] == 50.0 and out["R_first@1"] == 0.0 and out["R_first@5"] == 50.0
    assert out["per_edit"] == {"colour": pytest.approx(100 * (1 + 2 / 3) / 2), "shape": pytest.approx(100 / 16)}
    assert out["mAP@10"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + (1 / 8) / 2) / 2)
