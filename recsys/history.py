"""Behaviour histories as model input: a ``list[int64]`` column -> a padded ``(N, L)`` matrix.

One conversion for every reader (training batches, evaluation, the index's query sample, the
service): oldest first, left-aligned, padded with 0 (index 0 is padding / unknown everywhere).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl

from recsys.errors import DataError

if TYPE_CHECKING:
    import torch


def padded_history(column: pl.Series, length: int, longer: Literal["keep_last", "error"] = "keep_last") -> np.ndarray:
    """``list[int64]`` column -> ``(N, length)`` int64, oldest first, left-aligned, 0-padded.

    Lists longer than ``length`` keep their last ``length`` items, or (``longer="error"``) raise:
    the prepared splits are written with at most ``history_len`` items, so a longer list there
    means the file and ``meta.json`` disagree. Null lists and null entries count as empty.
    """
    if longer == "error":
        too_long = int((column.list.len().fill_null(0) > length).sum())
        if too_long:
            raise DataError(f"history column: {too_long} row(s) hold more than {length} item indices (meta.json history_len); rerun `recsys prepare`")
    lists = column.list.drop_nulls().list.tail(length)
    lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = lists.explode().drop_nulls().to_numpy().astype(np.int64)
    padded = np.zeros((len(column), length), dtype=np.int64)
    rows = np.repeat(np.arange(len(column)), lengths)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    padded[rows, cols] = flat
    return padded


def pad_sequences(sequences: list[list[int]] | list[np.ndarray], length: int) -> np.ndarray:
    """Python lists of item indices (a request's history) -> ``(N, length)``, as ``padded_history``.

    Plain numpy (a request's one row costs microseconds, not a polars round trip).
    """
    padded = np.zeros((len(sequences), length), dtype=np.int64)
    for row, items in enumerate(sequences):  # N is the number of requests in hand: one, or a few
        tail = np.asarray(items, dtype=np.int64)[-length:] if length else np.zeros(0, np.int64)
        padded[row, : len(tail)] = tail
    return padded


def mean_content(content_vecs: torch.Tensor | None, history: torch.Tensor) -> torch.Tensor | None:
    """``content_vecs (n, C)`` (row = item_idx, from ``catalogue_states``), ``history (B, L)`` 0-padded -> ``(B, C)`` mean over each row's items; 0 for an empty history.

    What ``user_state`` reads as ``history_content``; None without content vectors.
    """
    if content_vecs is None:
        return None
    present = (history != 0).unsqueeze(-1).to(content_vecs.dtype)  # (B, L, 1)
    return (content_vecs[history] * present).sum(1) / present.sum(1).clamp(min=1)
