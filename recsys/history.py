"""Behaviour histories as model input: a ``list[int64]`` column -> a padded ``(N, L)`` matrix.

One conversion for every reader (training batches, evaluation, the index's query sample, the
service): oldest first, left-aligned, padded with 0 (index 0 is padding / unknown everywhere).
Splits of many rows hold their histories ragged (``RaggedHistory``) and pad them per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import polars as pl
import torch

from recsys.errors import DataError


def _lists(column: pl.Series, length: int, longer: Literal["keep_last", "error"]) -> pl.Series:
    """The column's lists cut to their last ``length`` items (or an error, see ``padded_history``), nulls as empty."""
    if longer == "error":
        too_long = int((column.list.len().fill_null(0) > length).sum())
        if too_long:
            raise DataError(f"history column: {too_long} row(s) hold more than {length} item indices (meta.json history_len); rerun `recsys prepare`")
    return column.list.drop_nulls().list.tail(length)


def padded_history(column: pl.Series, length: int, longer: Literal["keep_last", "error"] = "keep_last") -> np.ndarray:
    """``list[int64]`` column -> ``(N, length)`` int64, oldest first, left-aligned, 0-padded.

    Lists longer than ``length`` keep their last ``length`` items, or (``longer="error"``) raise:
    the prepared splits are written with at most ``history_len`` items, so a longer list there
    means the file and ``meta.json`` disagree. Null lists and null entries count as empty.
    """
    lists = _lists(column, length, longer)
    lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = lists.explode().drop_nulls().to_numpy().astype(np.int64)
    padded = np.zeros((len(column), length), dtype=np.int64)
    rows = np.repeat(np.arange(len(column)), lengths)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    padded[rows, cols] = flat
    return padded


class RaggedHistory:
    """The histories of N rows as one flat array of item indices and N + 1 offsets, padded per batch.

    What a split holds instead of the ``(N, L)`` int64 matrix of ``padded_history``: 8 bytes of
    offset a row plus 4 (int32; int64 above 2^31 items) a history item, so the memory follows the
    histories' real lengths instead of L (on the synthetic scale data of ``benchmarks/scale.py``
    a train row holds 5.8 items of L = 50: 31 bytes instead of 400). ``history[rows]`` (an int64
    index tensor or a slice) is those rows' ``(B, L)`` int64 matrix, equal to the same rows of
    ``padded_history`` (tested); ``take`` and ``cat`` keep it ragged.
    """

    def __init__(self, values: torch.Tensor, offsets: torch.Tensor, length: int):
        self.values, self.offsets, self.length = values, offsets, length

    @classmethod
    def from_column(cls, column: pl.Series, length: int, longer: Literal["keep_last", "error"] = "keep_last") -> RaggedHistory:
        lists = _lists(column, length, longer)
        lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
        flat = lists.explode().drop_nulls().to_numpy()
        dtype = np.int32 if flat.size == 0 or int(flat.max()) < 2**31 else np.int64
        offsets = np.zeros(len(column) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(torch.from_numpy(flat.astype(dtype)), torch.from_numpy(offsets), length)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.length

    @property
    def nbytes(self) -> int:
        return self.values.element_size() * self.values.numel() + 8 * self.offsets.numel()

    def _rows(self, rows: torch.Tensor | slice) -> torch.Tensor:
        return torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.int64)

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        rows = self._rows(rows)
        start, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        if self.values.numel() == 0 or self.length == 0:
            return torch.zeros(len(rows), self.length, dtype=torch.int64)
        position = torch.arange(self.length)
        at = (start.unsqueeze(1) + position).clamp_(max=self.values.numel() - 1)  # (B, L) into values
        return self.values[at].long().masked_fill_(position >= lengths.unsqueeze(1), 0)

    def take(self, rows: torch.Tensor | slice) -> RaggedHistory:
        """The rows ``rows``, still ragged."""
        rows = self._rows(rows)
        start, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        at = torch.repeat_interleave(start - offsets[:-1], lengths) + torch.arange(int(offsets[-1]))
        return RaggedHistory(self.values[at], offsets, self.length)

    @staticmethod
    def cat(parts: Sequence[RaggedHistory]) -> RaggedHistory:
        """The rows of ``parts`` one after another."""
        shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = torch.cat([parts[0].offsets[:1]] + [p.offsets[1:] + int(shift) for p, shift in zip(parts, shifts)])
        dtype = torch.int64 if any(p.values.dtype == torch.int64 for p in parts) else torch.int32
        return RaggedHistory(torch.cat([p.values.to(dtype) for p in parts]), offsets, parts[0].length)


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
