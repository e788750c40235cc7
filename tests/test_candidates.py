"""recsys.candidates: the co-occurrence table, the union of the sources, the co-occurrence feature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.candidates import ItemNeighbours, cooccurrence_feature, merge_sources

# user 1 clicks items 1, 2, 3; user 2 clicks 1, 2; user 3 clicks 3 and 4 (4 twice: counted once)
USERS, ITEMS = np.array([1, 1, 1, 2, 2, 3, 3, 3]), np.array([1, 2, 3, 1, 2, 3, 4, 4])


def test_neighbours_are_the_most_co_clicked_items_by_cosine_of_their_user_sets():
    table = ItemNeighbours.from_clicks(USERS, ITEMS, n_items=6, k=2)
    # users: item 1 {1, 2}, 2 {1, 2}, 3 {1, 3}, 4 {3}; cosine(1, 2) = 2 / 2, cosine(1, 3) = 1 / 2, cosine(3, 4) = 1 / sqrt(2)
    assert table.ids[1].tolist() == [2, 3] and table.weights[1].tolist() == pytest.approx([1.0, 0.5])
    assert table.ids[3, 0].item() == 4 and table.weights[3, 0].item() == pytest.approx(1 / math.sqrt(2))
    assert table.ids[4].tolist() == [3, 0] and table.weights[4].tolist() == pytest.approx([1 / math.sqrt(2), 0.0])  # one neighbour only
    assert table.ids[5].tolist() == [0, 0]  # nobody clicked item 5


@pytest.mark.parametrize("gram_block", [1, 7, 300])
def test_the_co_click_counts_built_block_by_block_give_the_table_of_the_whole_product(gram_block):
    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 60, 2000), rng.zipf(1.4, 2000) % 90  # popular items co-clicked often, ties in the cosines
    for cap in (25, 90):  # 25 leaves some users' oldest items out; 90 (the catalogue) keeps them all
        whole = ItemNeighbours.from_clicks(users, items, n_items=90, k=6, max_per_user=cap, gram_block=10**9)
        blocked = ItemNeighbours.from_clicks(users, items, n_items=90, k=6, max_per_user=cap, gram_block=gram_block)
        assert torch.equal(blocked.ids, whole.ids) and torch.equal(blocked.weights, whole.weights)
    # against the cosines written out (cap 90): item i's first neighbour is argmax_j |U_i & U_j| / sqrt(|U_i| |U_j|)
    holders = {i: set(users[items == i].tolist()) for i in range(90)}
    for i in (1, 2, 5):
        cos = [len(holders[i] & holders[j]) / math.sqrt(len(holders[i]) * len(holders[j])) if j != i and holders[j] and holders[i] else 0.0 for j in range(90)]
        assert blocked.weights[i, 0].item() == pytest.approx(max(cos)) and cos[blocked.ids[i, 0].item()] == pytest.approx(max(cos))


def test_a_users_items_beyond_max_per_user_are_their_oldest_and_left_out():
    table = ItemNeighbours.from_clicks(USERS, ITEMS, n_items=6, k=2, max_per_user=2)
    # user 1 keeps 2 and 3 (latest), user 2 keeps 1, 2, user 3 keeps 3, 4: item 1 is co-clicked with 2 only
    assert table.ids[1].tolist() == [2, 0]
    assert table.ids[3].tolist() in ([2, 4], [4, 2])


def test_scores_sum_the_cosines_of_the_recent_items_and_the_feature_is_their_mean():
    table = ItemNeighbours.from_clicks(USERS, ITEMS, n_items=6, k=2)
    scores = table.scores(torch.tensor([[3, 4], [0, 0]]))
    # item 3's neighbours: 4 (.707) and one of 1, 2 (.5, tied); item 4's: 3 (.707)
    assert scores[0, 3].item() == pytest.approx(1 / math.sqrt(2)) and scores[0, 4].item() == pytest.approx(1 / math.sqrt(2))
    assert scores[0, 1].item() + scores[0, 2].item() == pytest.approx(0.5)
    assert scores[1].abs().sum() == 0  # no recent items, no scores
    feature = cooccurrence_feature(table, torch.tensor([[3, 4]]), torch.tensor([[4, 5]]))
    assert feature[0].tolist() == pytest.approx([1 / math.sqrt(2) / 2, 0.0])


def test_each_source_fills_its_quota_with_unseen_items_no_earlier_source_proposed():
    table = ItemNeighbours.from_clicks(USERS, ITEMS, n_items=6, k=2)
    excluded = torch.zeros(2, 6, dtype=torch.bool)
    excluded[:, 0] = True
    excluded[0, 1] = True  # user row 0 has seen item 1
    cooccurrence = table.scores(torch.tensor([[1, 0], [3, 4]]))
    popularity = torch.tensor([0, 9, 8, 7, 6, 5])
    candidates, codes = merge_sources(torch.tensor([[2, -1], [5, 1]]), excluded, cooccurrence, 2, popularity, 1)
    # row 0: towers 2; co-occurrence of item 1: 2 (taken), 3 (.5), nothing else above 0; popular: 4 (1 seen, 2 and 3 taken)
    # row 1: towers 5, 1; co-occurrence: 3 and 4 (.707 each), 1 taken; popular: 2
    assert candidates[0].tolist() == [2, 3, 4, -1, -1] and codes[0].tolist() == [0, 1, 2, -1, -1]
    assert sorted(candidates[1, 2:4].tolist()) == [3, 4] and candidates[1, [0, 1, 4]].tolist() == [5, 1, 2]
    assert codes[1].tolist() == [0, 0, 1, 1, 2]
    plain, plain_codes = merge_sources(torch.tensor([[2, -1]]), excluded[:1])
    assert plain.tolist() == [[2, -1]] and plain_codes.tolist() == [[0, -1]]


def _ease_by_hand(users: np.ndarray, items: np.ndarray, n_items: int, l2: float) -> np.ndarray:
    x = np.zeros((users.max() + 1, n_items))
    x[users, items] = 1.0
    precision = np.linalg.inv(x.T @ x + l2 * np.eye(n_items))
    b = -precision / np.diag(precision)
    np.fill_diagonal(b, 0.0)
    return b


def test_ease_table_holds_the_closed_form_weights_negative_ones_included():
    table = ItemNeighbours.from_ease(USERS, ITEMS, n_items=6, k=6, l2=0.5)
    dense = torch.zeros(6, 6).scatter_add_(1, table.ids, table.weights).numpy()
    dense[:, 0] = 0.0  # the "no neighbour" slot
    expected = _ease_by_hand(USERS, ITEMS, 6, 0.5)
    expected[0], expected[:, 0] = 0.0, 0.0  # padding row and column
    np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-6)
    assert table.kind == "ease" and (table.weights < 0).any()  # knowing 3 makes 1 and 2 less likely, and so on


def test_a_short_ease_table_keeps_each_items_weights_largest_in_magnitude():
    full = _ease_by_hand(USERS, ITEMS, 6, 0.5)
    table = ItemNeighbours.from_ease(USERS, ITEMS, n_items=6, k=2, l2=0.5)
    for item in range(1, 5):
        magnitudes = np.sort(np.abs(full[item]))[::-1][:2]  # items 1 and 2 are twins: ties, so compare magnitudes
        np.testing.assert_allclose(np.sort(table.weights[item].abs().numpy())[::-1], magnitudes, rtol=1e-5)
        np.testing.assert_allclose(table.weights[item].numpy(), full[item, table.ids[item].numpy()], rtol=1e-5)


def test_the_item_item_kind_is_ease_up_to_its_catalogue_limit():
    from recsys.candidates import item_item_kind
    from recsys.config import ServeConfig

    serve = ServeConfig(ease_max_items=10)
    assert item_item_kind(11, serve) == "ease" and item_item_kind(12, serve) == "cosine"  # row 0 is padding, not an item
    assert item_item_kind(12, ServeConfig(item_item="ease", ease_max_items=10)) == "ease"


def test_a_users_known_items_are_distinct_at_their_latest_click_oldest_first():
    from recsys.candidates import KnownItems, distinct_recent

    assert distinct_recent(np.array([3, 1, 3, 2, 1, 5]), 0).tolist() == [3, 2, 1, 5]
    assert distinct_recent(np.array([3, 1, 3, 2, 1, 5]), 2).tolist() == [1, 5]
    known = KnownItems(np.array([1, 1, 1, 3, 3]), np.array([4, 2, 4, 7, 7]), n_users=5, count=0)
    assert [known.of(u).tolist() for u in range(5)] == [[], [2, 4], [], [7], []]
    assert known.batch(torch.tensor([3, 1, 0])).tolist() == [[7, 0], [2, 4], [0, 0]]
    assert known.of(99).tolist() == []  # a user beyond the known ones knows nothing


def test_one_user_scores_are_the_same_dense_or_sparse(monkeypatch):
    import recsys.candidates as candidates

    table = ItemNeighbours.from_ease(USERS, ITEMS, n_items=6, k=3, l2=0.5)
    recent = np.array([3, 4, 0])
    dense_items, dense_scores = candidates.one_user_scores(table, recent)
    monkeypatch.setattr(candidates, "DENSE_SCORES", 0)
    sparse_items, sparse_scores = candidates.one_user_scores(table, recent)
    assert dense_items.tolist() == sparse_items.tolist()
    np.testing.assert_allclose(dense_scores, sparse_scores, rtol=1e-6)
    np.testing.assert_allclose(dense_scores, table.scores(torch.tensor([[3, 4]]))[0, dense_items].numpy(), rtol=1e-5)


def test_scores_summed_over_blocks_of_recent_items_are_the_same(monkeypatch):
    import recsys.candidates as candidates

    table = ItemNeighbours.from_ease(USERS, ITEMS, n_items=6, k=4, l2=0.5)
    recent = torch.tensor([[1, 2, 3, 4], [4, 0, 0, 0]])
    whole = table.scores(recent)
    monkeypatch.setattr(candidates, "SCORE_BLOCK", 1)  # one recent item at a time
    torch.testing.assert_close(table.scores(recent), whole)


def _random_clicks(seed: int, users: int = 40, items: int = 30, clicks: int = 300):
    rng = np.random.default_rng(seed)
    user, item = rng.integers(1, users, clicks), rng.integers(1, items, clicks)
    order = np.argsort(user, kind="stable")
    return user[order], item[order]


@pytest.mark.parametrize("kind", ["cosine", "ease"])
def test_the_sparse_merge_and_feature_equal_the_dense_ones(kind, monkeypatch):
    import recsys.candidates as candidates
    from recsys.candidates import merge_sources_sparse

    users, items = _random_clicks(0)
    n_items = 30
    table = ItemNeighbours.from_clicks(users, items, n_items, k=8) if kind == "cosine" else ItemNeighbours.from_ease(users, items, n_items, k=8, l2=5.0)
    rng = np.random.default_rng(1)
    recent = torch.from_numpy(np.stack([np.r_[rng.choice(np.arange(1, n_items), 4, replace=False), 0, 0] for _ in range(6)]))
    towers = torch.from_numpy(np.stack([np.r_[rng.choice(np.arange(1, n_items), 5, replace=False), -1] for _ in range(6)]))
    excluded = torch.zeros(6, n_items, dtype=torch.bool)
    excluded[:, 0] = True
    excluded[torch.from_numpy(rng.integers(0, 6, 20)), torch.from_numpy(rng.integers(1, n_items, 20))] = True
    excluded[torch.arange(6).unsqueeze(1), recent.clamp(min=0)] = True  # the recent items are seen
    excluded[:, 0] = True
    popularity = torch.from_numpy(rng.permutation(n_items).astype(np.int64))  # distinct counts: no ties to break
    popularity[0] = 0
    by_clicks = np.lexsort((np.arange(n_items), -popularity.numpy()))
    popular = by_clicks[popularity.numpy()[by_clicks] > 0]

    dense, dense_codes = merge_sources(towers, excluded, table.scores(recent), 4, popularity, 3)
    rows, cols = torch.nonzero(excluded[:, 1:], as_tuple=True)
    sparse, sparse_codes = merge_sources_sparse(towers, rows, cols + 1, table, recent, 4, popular, 3)
    assert torch.equal(sparse, dense) and torch.equal(sparse_codes, dense_codes)

    candidates_ = torch.cat([towers.clamp(min=0), sparse[:, :4].clamp(min=0)], 1)
    want = cooccurrence_feature(table, recent, candidates_)
    monkeypatch.setattr(candidates, "DENSE_SCORES", 0)
    torch.testing.assert_close(cooccurrence_feature(table, recent, candidates_), want, rtol=1e-5, atol=1e-6)
