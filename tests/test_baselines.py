"""Retrieval baselines (most popular, item-kNN, EASE, BPR-MF) on the model's own full-ranking protocol."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys.config import EvalConfig
from recsys.rundir import RunDir, read_json, write_json
from recsys import candidates
from training import baseline
from training.baseline import ItemItem, MFSpec, MostPopular, ease_weights, item_knn_weights, known_matrix
from training.evaluate import baselines, evaluate
from training.retrieval import rank_catalogue, retrieval_section

from test_evaluate import make_run  # tests/ is on sys.path under pytest


def _pairs(pairs: list[tuple[int, int]]) -> pl.DataFrame:
    return pl.DataFrame(pairs, schema={"user_idx": pl.Int64, "item_idx": pl.Int64}, orient="row")


def _split(rows: list[tuple[int, int, int, bool]]) -> pl.DataFrame:
    """(user_idx, item_idx, click, sampled) rows as a prepared split; timestamps in row order."""
    frame = pl.DataFrame(rows, schema={"user_idx": pl.Int64, "item_idx": pl.Int64, "click": pl.Int8, "sampled": pl.Boolean}, orient="row")
    return frame.with_columns(timestamp=pl.int_range(pl.len(), dtype=pl.Int64))


def _run(root: Path, train: list, valid: list) -> RunDir:
    run = RunDir(root)
    run.data.mkdir(parents=True)
    _split(train).write_parquet(run.data / "train.parquet")
    _split(valid).write_parquet(run.data / "valid.parquet")
    return run


def _clicks(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int, bool]]:
    return [(u, i, 1, False) for u, i in pairs]


# -- EASE -----------------------------------------------------------------------------------
def test_ease_equals_the_closed_form_computed_directly_and_its_diagonal_is_zero():
    # Items 1..4 (column 0 is padding) with unequal popularity, so dividing P's rows instead of its columns shows.
    pairs = [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (2, 3), (2, 4), (3, 1), (4, 1), (4, 4)]
    x = np.zeros((5, 5))
    for u, i in pairs:
        x[u, i] = 1.0
    lam = 0.7
    p = np.linalg.inv(x.T @ x + lam * np.eye(5))
    expected = np.eye(5) - p @ np.diag(1.0 / np.diag(p))

    weights = ease_weights(known_matrix(_pairs(pairs), 5, 5), lam).numpy()
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    assert np.all(np.diag(weights) == 0.0)
    assert not np.allclose(weights, weights.T, atol=1e-3)  # B is not symmetric: the test can tell rows from columns


def test_cooccurrence_summed_over_blocks_of_users_is_x_transpose_x(monkeypatch):
    rng = np.random.default_rng(0)
    pairs = _pairs(list(zip(rng.integers(0, 50, 300).tolist(), rng.integers(1, 20, 300).tolist())))
    known = known_matrix(pairs, 53, 20)  # users 50..52 know nothing: the last block is empty
    x = known.to_dense()
    monkeypatch.setattr(candidates, "DENSE_BLOCK_ENTRIES", 7 * 20)  # blocks of 7 users
    assert torch.equal(candidates.gram_matrix(known), x.T @ x)


# -- item-kNN -------------------------------------------------------------------------------
# Users 0..3 know items 1..4: u0 {1, 2}, u1 {1, 2, 3}, u2 {3, 4}, u3 {1}.
# Users per item: 1: 3, 2: 2, 3: 2, 4: 1. Co-occurrence: (1,2) 2, (1,3) 1, (2,3) 1, (3,4) 1, others 0.
# Cosines: (1,2) 2/sqrt(6) = .8165, (1,3) 1/sqrt(6) = .4082, (2,3) 1/2, (3,4) 1/sqrt(2) = .7071.
KNN_PAIRS = [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (2, 3), (2, 4), (3, 1)]


def test_item_knn_keeps_each_items_most_similar_items_with_their_cosines():
    weights = item_knn_weights(known_matrix(_pairs(KNN_PAIRS), 4, 5), neighbours=2).numpy()
    c12, c13, c23, c34 = 2 / math.sqrt(6), 1 / math.sqrt(6), 0.5, 1 / math.sqrt(2)
    expected = np.array(
        [
            [0, 0, 0, 0, 0],  # padding: nobody knows it
            [0, 0, c12, c13, 0],  # item 1: 2 and 3 (4 never co-occurs)
            [0, c12, 0, c23, 0],  # item 2: 1 and 3
            [0, 0, c23, 0, c34],  # item 3: 4 (.707) and 2 (.5); 1 (.408) is the third, dropped
            [0, 0, 0, c34, 0],  # item 4: only 3 co-occurs
        ]
    )
    np.testing.assert_allclose(weights, expected, atol=1e-6)


def test_item_knn_scores_a_user_by_the_similarities_of_their_items_and_ranks_the_nearest_first(tmp_path):
    run = _run(tmp_path / "run", train=_clicks(KNN_PAIRS), valid=[])
    spec = MFSpec(n_users=4, n_items=5, history_len=2)
    known = known_matrix(_pairs(KNN_PAIRS), 4, 5)
    knn = ItemItem(spec, known, item_knn_weights(known, neighbours=2))
    # u3 knows {1}: 2 (.8165), 3 (.4082), 4 (0). u2 knows {3, 4}: 2 gets .5 from 3, 1 nothing (pruned from 3's list).
    np.testing.assert_allclose(knn.user_vectors(torch.tensor([3])) @ knn.item_vectors().T, [[0, 0, 2 / math.sqrt(6), 1 / math.sqrt(6), 0]], atol=1e-6)
    test = _split([(3, 4, 1, False), (2, 2, 1, False)])
    result = rank_catalogue(run, knn, knn.item_vectors(), test, EvalConfig(ks=(1, 2)))
    assert result.user_idx.tolist() == [2, 3]
    assert result.top_items[:, 0].tolist() == [2, 2]  # the known top item of each; their own items excluded
    assert result.top_items[1].tolist() == [2, 3]
    assert retrieval_section(result, (1, 2))["recall@1"] == 0.5  # u2's item 2 first, u3's item 4 third


def test_item_knn_and_ease_score_users_by_their_valid_clicks_too(tmp_path):
    # User 5's only known click is item 4, in valid; items 3 and 4 go together in train. Without the valid
    # click their scores would all be 0, and item 3 (the test click) would have no reason to come first.
    train = _clicks([(0, 1), (0, 2), (1, 1), (1, 2), (2, 3), (2, 4), (3, 3), (3, 4)])
    run = _run(tmp_path / "run", train=train, valid=_clicks([(5, 4)]))
    spec = MFSpec(n_users=6, n_items=5, history_len=2)
    cfg = EvalConfig(ks=(1,), baselines=("item_knn", "ease"))
    out = baselines(run, spec, _split([(5, 3, 1, False)]), cfg, np.zeros(5, dtype=np.int64), bpr=None)
    assert out["item_knn"]["retrieval"]["recall@1"] == out["ease"]["retrieval"]["recall@1"] == 1.0


@torch.inference_mode()  # as in rank_catalogue; torch's sparse index_select fails there at this size
def test_item_item_user_vectors_are_the_users_rows_of_the_known_click_matrix():
    rng = np.random.default_rng(0)
    pairs = _pairs(list(zip(rng.integers(0, 900, 80_000).tolist(), rng.integers(1, 1683, 80_000).tolist())))
    known = known_matrix(pairs, 950, 1683)  # users 900..949 know nothing
    users = torch.from_numpy(rng.permutation(950)[:400])
    vectors = ItemItem(MFSpec(950, 1683, 5), known, torch.zeros(1683, 1683)).user_vectors(users)
    assert torch.equal(vectors, known.to_dense()[users])


# -- most popular ---------------------------------------------------------------------------
def test_most_popular_ranks_by_clicked_train_rows_ties_by_index_and_never_an_excluded_item(tmp_path):
    train = _clicks([(1, 3), (2, 3), (3, 3), (1, 5), (2, 5), (3, 2), (4, 4)])
    train += [(4, 1, 0, False), (4, 1, 0, True), (5, 1, 0, True)]  # an unclicked and sampled negatives: no popularity
    valid = _clicks([(5, 6), (6, 6), (7, 6), (8, 6), (1, 2)])  # valid clicks: known (excluded) but not popularity
    run = _run(tmp_path / "run", train=train, valid=valid)
    popularity = np.bincount([3, 3, 3, 5, 5, 2, 4], minlength=8)  # clicked train rows per item_idx 0..7
    popular = MostPopular(MFSpec(n_users=9, n_items=8, history_len=2), popularity)
    test = _split([(1, 7, 1, False), (3, 6, 1, False), (5, 4, 1, False), (8, 1, 1, False)])
    result = rank_catalogue(run, popular, popular.item_vectors(), test, EvalConfig(ks=(7,)))

    assert result.item_popularity.tolist() == popularity.tolist()  # the protocol's popularity, which evaluate hands over
    order = [3, 5, 2, 4, 1, 6, 7]  # 3 clicks, 2, then 1 each (2 before 4), then no clicks by item_idx
    known = {1: {3, 5, 2}, 3: {3, 2}, 5: {6}, 8: {6}}
    assert result.user_idx.tolist() == [1, 3, 5, 8]
    for user, top in zip(result.user_idx, result.top_items):
        assert [i for i in top if i] == [i for i in order if i not in known[user]]  # the order, minus their own items


# -- on a planted structure -----------------------------------------------------------------
GROUPS, USERS_PER_GROUP, ITEMS_PER_GROUP = 6, 8, 10  # 60 items; users click only their own group's items


def _planted_run(root: Path) -> tuple[RunDir, pl.DataFrame, MFSpec]:
    """Each user: 5 train and 1 valid click among their group's 10 items, 2 test clicks among the 4 left."""
    rng = np.random.default_rng(0)
    train, valid, test = [], [], []
    for group in range(GROUPS):
        items = 1 + group * ITEMS_PER_GROUP + np.arange(ITEMS_PER_GROUP)
        for member in range(USERS_PER_GROUP):
            user = 1 + group * USERS_PER_GROUP + member
            clicked = rng.permutation(items)[:8].tolist()
            train += [(user, i, 1, False) for i in clicked[:5]]
            valid += [(user, clicked[5], 1, False)]
            test += [(user, i, 1, False) for i in clicked[6:]]
    spec = MFSpec(n_users=1 + GROUPS * USERS_PER_GROUP, n_items=1 + GROUPS * ITEMS_PER_GROUP, history_len=5)
    return _run(root, train, valid), _split(test), spec


def test_item_knn_and_ease_find_the_planted_groups_far_above_most_popular_and_random(tmp_path):
    run, test, spec = _planted_run(tmp_path / "run")
    train = pl.read_parquet(run.data / "train.parquet")
    popularity = np.bincount(train["item_idx"].to_numpy(), minlength=spec.n_items)
    cfg = EvalConfig(ks=(10,), baselines=("most_popular", "item_knn", "ease"))
    recall = {name: entry["retrieval"]["recall@10"] for name, entry in baselines(run, spec, test, cfg, popularity, bpr=None).items()}

    eligible = spec.n_items - 1 - 6  # catalogue minus a user's 6 known items
    random_recall = 10 / eligible  # a uniform ranking finds each relevant item in the top 10 with this chance: 0.19
    assert recall["ease"] == recall["item_knn"] == 1.0, recall  # the 4 unknown items of the own group rank first
    assert recall["most_popular"] < 0.4, recall
    assert min(recall["ease"], recall["item_knn"]) > 2.5 * max(recall["most_popular"], random_recall), (recall, random_recall)


def test_item_item_baselines_above_their_item_limit_are_skipped_with_a_note(tmp_path):
    run, test, spec = _planted_run(tmp_path / "run")
    cfg = EvalConfig(ks=(10,), baselines=("most_popular", "item_knn", "ease"), ease_max_items=59, knn_max_items=60)
    out = baselines(run, spec, test, cfg, np.ones(spec.n_items, dtype=np.int64), bpr=None)
    assert out["ease"] == {"skipped": "catalogue of 60 items > eval.ease_max_items = 59"}
    assert "recall@10" in out["item_knn"]["retrieval"] and "recall@10" in out["most_popular"]["retrieval"]  # 60 is not above 60


def test_bpr_mf_finds_the_planted_groups_and_its_budget_bounds_the_work(tmp_path):
    run, test, spec = _planted_run(tmp_path / "run")
    train = pl.read_parquet(run.data / "train.parquet")
    cfg = EvalConfig(ks=(10,), baselines=("bpr_mf",))
    model, schedule = baseline.train_bpr(train, spec)
    assert (schedule.epochs, schedule.rows) == (30, train.height)  # within the default budget: every epoch on every row
    from training.retrieval import rank_catalogue, retrieval_section

    recall = retrieval_section(rank_catalogue(run, model, model.item_vectors(), test, cfg), (10,))["recall@10"]
    assert recall > 2.5 * 10 / (spec.n_items - 7), recall  # far above a uniform ranking
    _, few = baseline.train_bpr(train, spec, max_samples=3 * train.height + 5)
    assert (few.epochs, few.rows, few.of_rows) == (3, train.height, train.height) and "3 epoch(s)" in few.note
    _, sampled = baseline.train_bpr(train, spec, max_samples=train.height // 2)
    assert (sampled.epochs, sampled.rows) == (1, train.height // 2) and "sample of" in sampled.note


def test_a_schedule_visits_its_rows_once_per_epoch():
    schedule = baseline.Schedule.fit(10, epochs=3, max_samples=100)
    steps = list(schedule.batches(4, "test", seed=0))
    assert len(steps) == 9 and [len(s) for s in steps[:3]] == [4, 4, 2]
    for epoch in range(3):
        assert sorted(torch.cat(steps[3 * epoch : 3 * epoch + 3]).tolist()) == list(range(10))
    assert baseline.Schedule.fit(0, 30, 10).rows == 0


# -- in `recsys evaluate` -------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, dict, int]:
    """The evaluate tests' tiny run, as prepared from data without impressions; BPR-MF trainings counted."""
    run = make_run(tmp_path_factory.mktemp("baselines") / "run")
    write_json(run.data / "meta.json", read_json(run.data / "meta.json") | {"impressions": False})
    trainings, train_bpr = [], baseline.train_bpr

    def counted_train_bpr(*args, **kwargs):
        trainings.append(1)
        return train_bpr(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(baseline, "train_bpr", counted_train_bpr)
        evaluate(run)
    return run, read_json(run.metrics_path), len(trainings)


def test_metrics_json_holds_every_baselines_retrieval_on_the_models_keys(sampled_run):
    _, metrics, _ = sampled_run
    assert metrics["baselines"].keys() == {"most_popular", "item_knn", "ease", "bpr_mf"}
    for name, entry in metrics["baselines"].items():
        assert entry["retrieval"].keys() == metrics["retrieval"].keys(), name
        assert 0.0 <= entry["retrieval"]["recall@20"] <= 1.0 and entry["seconds"] >= 0.0, name


def test_bpr_mf_is_trained_once_for_baseline_mf_and_baselines(sampled_run):
    _, metrics, trainings = sampled_run
    assert trainings == 1
    assert metrics["baselines"]["bpr_mf"]["retrieval"] == metrics["baseline_mf"]["retrieval"]
    assert metrics["baseline_mf"].keys() == {"retrieval", "rating", "seconds"}  # baseline_mf stays as it was
    assert metrics["baseline_training"]["bpr_mf"]["epochs"] == 30 and metrics["baseline_training"]["rating_mf"]["epochs"] == 15
    assert metrics["baselines"]["bpr_mf"]["training"] == metrics["baseline_training"]["bpr_mf"]


def test_aucs_against_sampled_negatives_are_labelled_so_in_metrics_and_report(sampled_run):
    run, metrics, _ = sampled_run
    assert metrics["click"]["auc_sampled"] == metrics["click"]["auc"] and metrics["ctcvr"]["auc_sampled"] == metrics["ctcvr"]["auc"]
    assert "auc_sampled" not in metrics["conversion"]  # among clicked rows: real outcomes, no sampled negative
    summary = run.report_md.read_text()
    assert f"| Click AUC (against sampled negatives) | {metrics['click']['auc']:.3f} |" in summary
    assert "| Click-and-convert AUC (against sampled negatives) |" in summary and "| Conversion AUC (CVR) |" in summary
