"""recsys.candidates: the co-occurrence table, the union of the sources, the co-occurrence feature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.candidates import ItemNeighbours, cooccurrence_feature, merge_sources, recent_items

# user 1 clicks items 1, 2, 3; user 2 clicks 1, 2; user 3 clicks 3 and 4 (4 twice: counted once)
USERS, ITEMS = np.array([1, 1, 1, 2, 2, 3, 3, 3]), np.array([1, 2, 3, 1, 2, 3, 4, 4])


def test_neighbours_are_the_most_co_clicked_items_by_cosine_of_their_user_sets():
    table = ItemNeighbours.from_clicks(USERS, ITEMS, n_items=6, k=2)
    # users: item 1 {1, 2}, 2 {1, 2}, 3 {1, 3}, 4 {3}; cosine(1, 2) = 2 / 2, cosine(1, 3) = 1 / 2, cosine(3, 4) = 1 / sqrt(2)
    assert table.ids[1].tolist() == [2, 3] and table.weights[1].tolist() == pytest.approx([1.0, 0.5])
    assert table.ids[3, 0].item() == 4 and table.weights[3, 0].item() == pytest.approx(1 / math.sqrt(2))
    assert table.ids[4].tolist() == [3, 0] and table.weights[4].tolist() == pytest.approx([1 / math.sqrt(2), 0.0])  # one neighbour only
    assert table.ids[5].tolist() == [0, 0]  # nobody clicked item 5


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


def test_recent_items_are_each_rows_last_items_oldest_first():
    history = torch.tensor([[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert recent_items(history, 2).tolist() == [[2, 3], [0, 4], [0, 0]]


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
