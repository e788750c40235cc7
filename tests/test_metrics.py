"""Metric functions against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys import metrics


# -- AUC -------------------------------------------------------------------------------
def test_auc_without_ties_counts_correctly_ordered_pairs():
    # pos 0.35 beats neg 0.1 only; pos 0.8 beats both: 3 of 4 pairs
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auc_counts_a_tied_pair_as_one_half():
    # pairs: (0.8 vs 0.8) 0.5, (0.8 vs 0.1) 1, (0.3 vs 0.8) 0, (0.3 vs 0.1) 1 -> 2.5 / 4
    assert metrics.auc([1, 0, 1, 0], [0.8, 0.8, 0.3, 0.1]) == pytest.approx(0.625)


def test_auc_is_nan_when_only_one_class_is_present():
    assert math.isnan(metrics.auc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert math.isnan(metrics.auc([0, 0], [0.2, 0.5]))


def test_auc_accepts_torch_tensors():
    assert metrics.auc(torch.tensor([0, 1]), torch.tensor([0.2, 0.7])) == pytest.approx(1.0)


# -- group AUC -------------------------------------------------------------------------
def test_group_auc_weights_groups_by_rows_and_skips_single_class_groups():
    groups = ["a", "a", "b", "b", "b", "b", "c", "c", "c"]
    labels = [1, 0, 1, 0, 0, 1, 1, 1, 1]
    scores = [0.9, 0.1, 0.2, 0.6, 0.1, 0.5, 0.3, 0.2, 0.1]
    # a: AUC 1 over 2 rows; b: pairs (0.2>0.6 no, 0.2>0.1 yes, 0.5>0.6 no, 0.5>0.1 yes) = 0.5 over 4 rows; c skipped
    gauc, used = metrics.group_auc(labels, scores, groups)
    assert gauc == pytest.approx((2 * 1.0 + 4 * 0.5) / 6)
    assert used == 2


def test_group_auc_of_one_group_equals_auc_with_ties():
    gauc, used = metrics.group_auc([1, 0, 1, 0], [0.8, 0.8, 0.3, 0.1], [7, 7, 7, 7])
    assert gauc == pytest.approx(0.625)
    assert used == 1


def test_group_auc_is_nan_when_no_group_has_both_classes():
    gauc, used = metrics.group_auc([1, 0], [0.5, 0.5], [1, 2])
    assert math.isnan(gauc) and used == 0


# -- logloss, RMSE, MAE ----------------------------------------------------------------
def test_logloss_is_mean_binary_cross_entropy():
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert metrics.logloss([1, 0], [0.8, 0.4]) == pytest.approx(expected)


def test_logloss_clips_certain_wrong_predictions():
    assert metrics.logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))


def test_rmse_and_mae_on_hand_computed_errors():
    # errors 1, 0, 2
    assert metrics.rmse([1, 2, 3], [2, 2, 5]) == pytest.approx(math.sqrt(5 / 3))
    assert metrics.mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)


# -- calibration -----------------------------------------------------------------------
def test_ece_is_zero_for_perfectly_calibrated_predictions():
    probs = [0.25] * 4 + [0.75] * 4
    labels = [1, 0, 0, 0] + [1, 1, 1, 0]
    assert metrics.expected_calibration_error(labels, probs) == pytest.approx(0.0)


def test_ece_is_the_row_weighted_gap_for_miscalibrated_predictions():
    probs = [0.9] * 4 + [0.25] * 4
    labels = [1, 0, 0, 0] + [1, 0, 0, 0]
    # bin 0.9: |0.9 - 0.25| = 0.65 over half the rows; bin 0.25: gap 0
    assert metrics.expected_calibration_error(labels, probs) == pytest.approx(0.325)


def test_reliability_bins_report_counts_and_observed_rates():
    bins = metrics.reliability_bins([1, 0, 1, 1], [0.05, 0.15, 0.95, 1.0], n_bins=2)
    np.testing.assert_allclose(bins["count"], [2, 2])
    np.testing.assert_allclose(bins["mean_pred"], [0.1, 0.975])
    np.testing.assert_allclose(bins["frac_pos"], [0.5, 1.0])


# -- retrieval -------------------------------------------------------------------------
# One user ranks items 0..4 by [0.9, 0.1, 0.8, 0.7, 0.3]; item 0 is a training positive (excluded),
# relevant are items 3 and 4. Ranking without item 0: 2, 3, 4, 1 -> relevant at ranks 1 and 2 (0-based).
SCORES = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.3], [0.5, 0.4, 0.3, 0.2, 0.1]])
EXCLUDE = torch.tensor([[True, False, False, False, False], [False] * 5])
RELEVANT = torch.tensor([[False, False, False, True, True], [False] * 5])  # user 2 has none: not averaged


def test_top_k_never_returns_an_excluded_item_and_pads_with_minus_one():
    top = metrics.top_k(SCORES[:1], 5, EXCLUDE[:1])
    assert top.tolist() == [[2, 3, 4, 1, -1]]


def test_recall_ndcg_mrr_hit_rate_on_hand_made_ranking_with_excluded_training_positive():
    result = metrics.retrieval_metrics(SCORES, RELEVANT, EXCLUDE, ks=(1, 2, 3))
    g1, g2 = 1 / math.log2(3), 1 / math.log2(4)  # gains at ranks 1 and 2
    assert result["recall@1"] == 0.0
    assert result["recall@2"] == pytest.approx(0.5)
    assert result["recall@3"] == pytest.approx(1.0)
    assert result["ndcg@2"] == pytest.approx(g1 / (1 + g1))
    assert result["ndcg@3"] == pytest.approx((g1 + g2) / (1 + g1))
    assert result["mrr@1"] == 0.0
    assert result["mrr@3"] == pytest.approx(0.5)
    assert result["hit_rate@1"] == 0.0 and result["hit_rate@2"] == 1.0


def test_a_relevant_item_that_is_also_excluded_does_not_count_as_relevant():
    relevant = RELEVANT.clone()
    relevant[0, 0] = True  # the training positive reappears in test
    assert metrics.retrieval_metrics(SCORES, relevant, EXCLUDE, ks=(2,))["recall@2"] == pytest.approx(0.5)


def test_without_exclusion_the_top_scored_training_positive_would_take_rank_zero():
    result = metrics.retrieval_metrics(SCORES, RELEVANT, None, ks=(2,))
    assert result["recall@2"] == 0.0  # ranking 0, 2 pushes both relevant items out of the top 2


@pytest.mark.parametrize("chunk", [1, 3, 7, 40, 1000])
def test_blocked_top_k_equals_the_dense_top_k_over_chunks_with_exclusions(chunk):
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(9, 4, generator=g), torch.randn(40, 4, generator=g)
    exclude = torch.rand(9, 40, generator=g) < 0.3
    exclude[2, :] = True  # a user with nothing eligible
    exclude[3, 5:] = True  # ... and one with fewer than k
    rows, cols = torch.nonzero(exclude, as_tuple=True)
    for k in (1, 6, 40, 60):
        dense = metrics.top_k(queries @ keys.T, k, exclude)
        blocked = metrics.top_k_blocked(queries, keys, k, rows, cols, chunk=chunk)
        assert torch.equal(blocked, dense), (k, chunk)
    assert (metrics.top_k_blocked(queries, keys, 6, rows, cols, chunk)[2] == -1).all()


def test_drop_excluded_removes_pairs_from_top_k_lists_and_moves_later_items_up():
    top = np.array([[0, 2, 3, 1], [0, 1, 2, 3]])
    compacted = metrics.drop_excluded(top, exclude_user=np.array([0, 1]), exclude_item=np.array([0, 2]))
    assert compacted.tolist() == [[2, 3, 1, -1], [0, 1, 3, -1]]


def test_relevant_ranks_mark_items_not_retrieved():
    ranks = metrics.relevant_ranks(np.array([[4, 2, -1]]), np.array([0, 0]), np.array([2, 7]))
    assert ranks.tolist() == [1, metrics.NOT_RETRIEVED]


def test_an_item_missing_from_a_short_list_is_not_a_hit_at_a_larger_k():
    ranks = metrics.relevant_ranks(np.array([[4, 2]]), np.array([0]), np.array([7]))
    assert metrics.retrieval_per_user(ranks, np.array([0]), 1, ks=(10,))["recall@10"].tolist() == [0.0]


# -- coverage and popularity -----------------------------------------------------------
def test_catalogue_coverage_counts_distinct_recommended_items():
    assert metrics.catalogue_coverage(np.array([[0, 1], [1, 2], [-1, -1]]), n_items=10) == pytest.approx(0.3)


def test_gini_is_zero_for_equal_exposure_and_three_quarters_for_one_of_four():
    assert metrics.gini([2, 2, 2, 2]) == pytest.approx(0.0)
    assert metrics.gini([0, 0, 0, 1]) == pytest.approx(0.75)


def test_popularity_bias_reports_mean_log_popularity_and_exposure_gini():
    bias = metrics.popularity_bias(np.array([[1, 2]]), item_popularity=[0, 1, 3])
    assert bias["mean_log_popularity"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert bias["catalogue_mean_log_popularity"] == pytest.approx((0 + math.log(2) + math.log(4)) / 3)
    assert bias["gini"] == pytest.approx(1 / 3)  # exposure [0, 1, 1]


# -- bootstrap -------------------------------------------------------------------------
def test_bootstrap_90_percent_interval_covers_the_true_mean_about_90_percent_of_the_time():
    true_mean, covered, repetitions = 1.0, 0, 100
    for rep in range(repetitions):
        values = np.random.default_rng(1000 + rep).normal(true_mean, 2.0, size=200)
        low, high = metrics.bootstrap_interval(lambda idx: values[idx].mean(), values.size, n_boot=200, level=0.9, seed=rep)
        covered += low <= true_mean <= high
    assert 0.80 <= covered / repetitions <= 0.97


def test_bootstrap_with_groups_resamples_whole_groups():
    groups = np.array([5, 5, 9, 9, 9, 7])
    sizes = {5: 2, 9: 3, 7: 1}
    seen: list[np.ndarray] = []

    def statistic(idx: np.ndarray) -> float:
        seen.append(idx)
        return float(idx.size)

    metrics.bootstrap_interval(statistic, groups.size, groups=groups, n_boot=20, seed=0)
    for idx in seen:
        picked, counts = np.unique(groups[idx], return_counts=True)
        assert all(count % sizes[g] == 0 for g, count in zip(picked.tolist(), counts.tolist()))


def test_bootstrap_is_reproducible_for_a_seed_and_skips_nan_resamples():
    labels = np.array([1, 0, 0, 0, 0, 0, 1, 0])
    scores = np.linspace(0, 1, 8)
    stat = lambda idx: metrics.auc(labels[idx], scores[idx])  # noqa: E731  (single-class resamples give nan)
    first = metrics.bootstrap_interval(stat, 8, n_boot=50, seed=3)
    assert first == metrics.bootstrap_interval(stat, 8, n_boot=50, seed=3)
    assert all(math.isfinite(v) for v in first)


def test_resampled_auc_equals_the_auc_of_the_drawn_rows_ties_included():
    rng = np.random.default_rng(3)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.random(500), 2)  # many ties
    presorted = metrics.ResampledAUC(labels, scores)
    assert presorted(np.ones(500, dtype=np.int64)) == pytest.approx(metrics.auc(labels, scores), abs=1e-12)
    for _ in range(5):
        drawn = rng.integers(0, 500, 500)
        assert presorted(np.bincount(drawn, minlength=500)) == pytest.approx(metrics.auc(labels[drawn], scores[drawn]), abs=1e-12)
    assert np.isnan(presorted(np.where(labels, 1, 0)))  # one class drawn
