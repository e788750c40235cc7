"""One padded-history conversion for every reader (recsys/history.py)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.errors import DataError
from recsys.history import pad_sequences, padded_history


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
