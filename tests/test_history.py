"""One padded-history conversion for every reader (recsys/history.py)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from recsys.errors import DataError
from recsys.history import RaggedHistory, pad_sequences, padded_history


def test_lists_become_rows_oldest_first_padded_with_zero_keeping_the_last_items():
    column = pl.Series([[1, 2, 3], None, [4, None, 5], [], [6, 7, 8, 9, 10, 11]], dtype=pl.List(pl.Int64))
    assert padded_history(column, 4).tolist() == [[1, 2, 3, 0], [0, 0, 0, 0], [4, 5, 0, 0], [0, 0, 0, 0], [8, 9, 10, 11]]


def test_prepared_splits_refuse_lists_longer_than_the_history_length():
    with pytest.raises(DataError, match="1 row"):
        padded_history(pl.Series([[1, 2, 3], [1]], dtype=pl.List(pl.Int64)), 2, longer="error")


def test_request_histories_pad_exactly_as_list_columns():
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, 50, rng.integers(0, 9)).tolist() for _ in range(40)]
    expected = padded_history(pl.Series(sequences, dtype=pl.List(pl.Int64)), 5)
    np.testing.assert_array_equal(pad_sequences(sequences, 5), expected)
    np.testing.assert_array_equal(pad_sequences([np.asarray(s) for s in sequences], 5), expected)


def _column(n: int, longest: int, high: int = 50, seed: int = 0) -> pl.Series:
    rng = np.random.default_rng(seed)
    lists = [rng.integers(1, high, rng.integers(0, longest + 1)).tolist() if i % 7 else None for i in range(n)]
    lists[3] = [4, None, 5]  # a null entry is dropped, as padded_history drops it
    return pl.Series(lists, dtype=pl.List(pl.Int64))


@pytest.mark.parametrize("length", [1, 5, 9])
def test_ragged_rows_pad_exactly_as_the_padded_matrix(length):
    column = _column(300, 9)  # some lists longer than length: their last items are kept
    ragged, padded = RaggedHistory.from_column(column, length), torch.from_numpy(padded_history(column, length))
    rows = torch.tensor([0, 3, 299, 6, 6, 150, 1])  # repeats and any order
    assert ragged.shape == (300, length) and len(ragged) == 300
    assert torch.equal(ragged[rows], padded[rows]) and ragged[rows].dtype == torch.int64
    assert torch.equal(ragged[10:40], padded[10:40]) and torch.equal(ragged[:], padded)
    assert torch.equal(ragged[torch.zeros(0, dtype=torch.int64)], padded[:0])


def test_ragged_take_and_cat_keep_every_row_with_its_items():
    column = _column(120, 6)
    ragged, padded = RaggedHistory.from_column(column, 6), torch.from_numpy(padded_history(column, 6))
    picked = torch.tensor([5, 119, 0, 5, 42])
    taken = ragged.take(picked)
    assert torch.equal(taken[:], padded[picked])
    joined = RaggedHistory.cat([taken, ragged, ragged.take(torch.zeros(0, dtype=torch.int64)), ragged.take(torch.tensor([7]))])
    assert torch.equal(joined[:], torch.cat([padded[picked], padded, padded[7:8]]))


def test_ragged_memory_follows_the_real_lengths_and_item_ids_beyond_int32_stay_exact():
    short = RaggedHistory.from_column(pl.Series([[1, 2]] * 1000, dtype=pl.List(pl.Int64)), 50)
    assert short.values.dtype == torch.int32 and short.nbytes == 1000 * 2 * 4 + 1001 * 8  # not 1000 x 50 x 8
    big = [[2**40 + 3, 7], [], [2**33]]
    wide = RaggedHistory.from_column(pl.Series(big, dtype=pl.List(pl.Int64)), 3)
    assert wide.values.dtype == torch.int64 and wide[:].tolist() == [[2**40 + 3, 7, 0], [0, 0, 0], [2**33, 0, 0]]
    assert RaggedHistory.cat([short.take(torch.tensor([0])), wide])[:][:, :2].tolist() == [[1, 2], [2**40 + 3, 7], [0, 0], [2**33, 0]]  # widened to int64


def test_prepared_splits_refuse_lists_longer_than_the_history_length_ragged_too():
    with pytest.raises(DataError, match="1 row"):
        RaggedHistory.from_column(pl.Series([[1, 2, 3], [1]], dtype=pl.List(pl.Int64)), 2, longer="error")
