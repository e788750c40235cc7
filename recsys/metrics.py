"""Metric functions: ranking (AUC, group AUC), calibration, regression, retrieval, beyond-accuracy, bootstrap.

Pure functions of arrays; no files, no config. Probabilities and labels are 1-d numpy arrays
(torch tensors are accepted and converted). Retrieval works on top-k item lists, where ``-1``
pads a list that ran out of eligible items.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | list
NOT_RETRIEVED = np.iinfo(np.int64).max  # rank of a relevant item missing from the top-k list: never < any K


def _np(values: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


# -- classification --------------------------------------------------------------------
def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC by the Mann-Whitney U statistic; tied scores count one half; nan when one class is absent."""
    return ResampledAUC(labels, scores).once()


class ResampledAUC:
    """The AUC of many resamples (with replacement) of one labelled, scored set, each in O(n) without a sort.

    A resample is given as integer weights (how often each row was drawn): the weighted AUC then
    equals ``auc`` of the resampled rows exactly (every copy of a positive against every copy of a
    negative, ties one half). The scores are sorted once, here.
    """

    def __init__(self, labels: ArrayLike, scores: ArrayLike):
        y, s = _np(labels) > 0.5, _np(scores)
        self.order = np.argsort(s)
        ordered = s[self.order]
        self.positive = y[self.order]
        self.starts = np.concatenate([[0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1]) if ordered.size else np.zeros(0, np.int64)

    def once(self) -> float:
        """AUC of the rows as they are (each drawn once), by the rank sum of the positives: ``auc``."""
        n_pos = int(self.positive.sum())
        n_neg = self.positive.size - n_pos
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        ends = np.concatenate([self.starts[1:], [self.order.size]])
        average_rank = np.repeat((self.starts + ends + 1) / 2.0, ends - self.starts)  # 1-based mean rank of each tie group, per sorted row
        return float((average_rank[self.positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))

    def __call__(self, weights: np.ndarray) -> float:
        """AUC of the resample drawing row i ``weights[i]`` times; nan when it has one class."""
        if self.order.size == 0:
            return float("nan")
        w = weights[self.order].astype(np.float64)
        pos, neg = np.where(self.positive, w, 0.0), np.where(self.positive, 0.0, w)
        if self.starts.size < self.order.size:  # tie groups to sum (none: every row is its own group)
            pos, neg = np.add.reduceat(pos, self.starts), np.add.reduceat(neg, self.starts)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives strictly below each tie group
        return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def group_auc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> tuple[float, int]:
    """Per-group AUC weighted by the group's row count, over groups with both classes; returns (gauc, groups used)."""
    y = _np(labels) > 0.5
    s = _np(scores)
    _, gid = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
    order = np.lexsort((s, gid))
    g, s, y = gid[order], s[order], y[order]
    n = g.size
    if n == 0:
        return float("nan"), 0
    position = np.arange(n)
    group_start_flag = np.r_[True, g[1:] != g[:-1]]
    group_start = np.maximum.accumulate(np.where(group_start_flag, position, 0))
    rank_in_group = position - group_start + 1.0  # 1-based
    run_id = np.cumsum(np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])]) - 1  # runs of tied scores within a group
    run_mean_rank = np.bincount(run_id, weights=rank_in_group) / np.bincount(run_id)
    n_groups = int(g.max()) + 1
    rank_sum_pos = np.bincount(g, weights=run_mean_rank[run_id] * y, minlength=n_groups)
    n_pos = np.bincount(g, weights=y.astype(np.float64), minlength=n_groups)
    size = np.bincount(g, minlength=n_groups).astype(np.float64)
    n_neg = size - n_pos
    used = (n_pos > 0) & (n_neg > 0)
    if not used.any():
        return float("nan"), 0
    group_aucs = (rank_sum_pos[used] - n_pos[used] * (n_pos[used] + 1) / 2.0) / (n_pos[used] * n_neg[used])
    return float(np.average(group_aucs, weights=size[used])), int(used.sum())


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy with probabilities clipped to [eps, 1 - eps]; nan on empty input."""
    y = _np(labels)
    p = np.clip(_np(probs), eps, 1.0 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


# -- regression ------------------------------------------------------------------------
def rmse(targets: ArrayLike, predictions: ArrayLike) -> float:
    """Root mean squared error; nan on empty input."""
    err = _np(predictions) - _np(targets)
    return float(np.sqrt(np.mean(err**2))) if err.size else float("nan")


def mae(targets: ArrayLike, predictions: ArrayLike) -> float:
    """Mean absolute error; nan on empty input."""
    err = _np(predictions) - _np(targets)
    return float(np.mean(np.abs(err))) if err.size else float("nan")


# -- calibration -----------------------------------------------------------------------
def reliability_bins(labels: ArrayLike, probs: ArrayLike, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins over [0, 1]: ``lower``, ``upper``, ``count``, ``mean_pred``, ``frac_pos`` (nan for empty bins)."""
    y = _np(labels)
    p = np.clip(_np(probs), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_of = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bin_of, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(bin_of, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(bin_of, weights=y, minlength=n_bins) / count
    return {"lower": edges[:-1], "upper": edges[1:], "count": count, "mean_pred": mean_pred, "frac_pos": frac_pos}


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, n_bins: int = 10) -> float:
    """ECE: row-weighted mean |mean predicted - observed rate| over equal-width bins; nan on empty input."""
    bins = reliability_bins(labels, probs, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return float("nan")
    filled = bins["count"] > 0
    gap = np.abs(bins["mean_pred"][filled] - bins["frac_pos"][filled])
    return float((bins["count"][filled] * gap).sum() / total)


# -- retrieval -------------------------------------------------------------------------
def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k column indices of each row of ``scores`` (U, I), never an excluded one; -1 pads rows with < k eligible."""
    masked = scores.float()
    if exclude is not None:
        masked = masked.masked_fill(exclude.bool(), float("-inf"))
    k = min(k, masked.shape[1])
    values, indices = torch.topk(masked, k, dim=1)
    return indices.masked_fill(torch.isneginf(values), -1)


def top_k_blocked(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_rows: torch.Tensor, exclude_cols: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    """``top_k(queries @ keys.T, k, exclude)`` without the ``(U, N)`` score and mask matrices: the keys in chunks, a running top-k.

    ``exclude_rows`` / ``exclude_cols`` (P,) int64: the excluded (query row, key column) pairs.
    Memory ``U x chunk``; on a 1M-item catalogue about half the time of the dense form (the top-k
    of a chunk stays in cache). Returns ``(U, k)`` column indices, -1 where fewer are eligible.
    """
    n = keys.shape[0]
    k = min(k, n)
    order = torch.argsort(exclude_cols)
    rows, cols = exclude_rows[order], exclude_cols[order]
    best_values = torch.empty(queries.shape[0], 0)
    best_indices = torch.empty(queries.shape[0], 0, dtype=torch.int64)
    for start in range(0, n, chunk):
        scores = (queries @ keys[start : start + chunk].T).float()
        lo, hi = torch.searchsorted(cols, torch.tensor([start, start + chunk])).tolist()
        scores[rows[lo:hi], cols[lo:hi] - start] = float("-inf")
        values, indices = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        values, indices = torch.cat([best_values, values], 1), torch.cat([best_indices, indices + start], 1)
        best_values, keep = torch.topk(values, min(k, values.shape[1]), dim=1)
        best_indices = indices.gather(1, keep)
    return best_indices.masked_fill(torch.isneginf(best_values), -1)


def drop_excluded(top_items: np.ndarray, exclude_user: np.ndarray, exclude_item: np.ndarray) -> np.ndarray:
    """Remove excluded (user row, item) pairs from top-k lists (U, K), moving later items up; -1 pads the end."""
    top_items = np.asarray(top_items, dtype=np.int64)
    n_users, k = top_items.shape
    if len(exclude_user) == 0:
        return top_items.copy()
    n_cols = max(int(top_items.max()), int(np.max(exclude_item))) + 2

    def pair_key(user: np.ndarray, item: np.ndarray) -> np.ndarray:  # one int64 per (user, item); -1 pads map apart
        return np.asarray(user, np.int64) * n_cols + np.asarray(item, np.int64) + 1

    rows = np.repeat(np.arange(n_users), k)
    excluded = np.isin(pair_key(rows, top_items.reshape(-1)), pair_key(exclude_user, exclude_item))
    keep = (~excluded.reshape(n_users, k)) & (top_items >= 0)
    new_pos = np.cumsum(keep, axis=1) - 1
    compacted = np.full_like(top_items, -1)
    compacted[np.nonzero(keep)[0], new_pos[keep]] = top_items[keep]
    return compacted


def relevant_ranks(top_items: np.ndarray | torch.Tensor, pair_user: np.ndarray, pair_item: np.ndarray) -> np.ndarray:
    """0-based rank of each relevant (user row, item) pair in its user's top-k list, or NOT_RETRIEVED."""
    if isinstance(top_items, torch.Tensor):
        top_items = top_items.cpu().numpy()
    top_items = np.asarray(top_items, dtype=np.int64)
    match = top_items[np.asarray(pair_user, np.int64)] == np.asarray(pair_item, np.int64)[:, None]  # (P, K)
    return np.where(match.any(axis=1), match.argmax(axis=1), NOT_RETRIEVED)


def retrieval_per_user(ranks: np.ndarray, pair_user: np.ndarray, n_users: int, ks: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Per-user recall@K, ndcg@K, hit_rate@K, mrr@K from relevant-pair ranks; nan for users with no relevant item."""
    ranks = np.asarray(ranks, dtype=np.int64)
    pair_user = np.asarray(pair_user, dtype=np.int64)
    n_relevant = np.bincount(pair_user, minlength=n_users).astype(np.float64)
    has_relevant = n_relevant > 0
    gain = 1.0 / np.log2(ranks.astype(np.float64) + 2.0)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = ranks < k
        hits = np.bincount(pair_user, weights=hit.astype(np.float64), minlength=n_users)
        dcg = np.bincount(pair_user, weights=np.where(hit, gain, 0.0), minlength=n_users)
        ideal_len = np.minimum(n_relevant, k).astype(np.int64)
        ideal_cumulative = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))]
        idcg = ideal_cumulative[ideal_len]
        best_rank = np.full(n_users, np.inf)
        np.minimum.at(best_rank, pair_user[hit], ranks[hit].astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"recall@{k}"] = np.where(has_relevant, hits / n_relevant, np.nan)
            out[f"ndcg@{k}"] = np.where(has_relevant, dcg / idcg, np.nan)
            out[f"hit_rate@{k}"] = np.where(has_relevant, (hits > 0).astype(np.float64), np.nan)
            out[f"mrr@{k}"] = np.where(has_relevant, 1.0 / (best_rank + 1.0), np.nan)
    return out


def retrieval_metrics(
    scores: torch.Tensor, relevant: torch.Tensor, exclude: torch.Tensor | None, ks: tuple[int, ...]
) -> dict[str, float]:
    """Mean recall/ndcg/hit_rate/mrr@K over users with a relevant item, from a full score matrix (U, I).

    ``relevant`` and ``exclude`` are boolean (U, I). Excluded items are never ranked; a relevant
    item that is also excluded (e.g. a training positive seen again) is not counted as relevant.
    """
    relevant = relevant.bool() & ~exclude.bool() if exclude is not None else relevant.bool()
    top_items = top_k(scores, max(ks), exclude).numpy()
    pair_user, pair_item = (t.numpy() for t in torch.nonzero(relevant, as_tuple=True))
    per_user = retrieval_per_user(relevant_ranks(top_items, pair_user, pair_item), pair_user, scores.shape[0], ks)
    return {name: float(np.nanmean(values)) if np.isfinite(values).any() else float("nan") for name, values in per_user.items()}


# -- beyond accuracy -------------------------------------------------------------------
def catalogue_coverage(top_items: np.ndarray, n_items: int) -> float:
    """Share of the catalogue's ``n_items`` items that appear in at least one top-k list."""
    items = np.asarray(top_items).reshape(-1)
    return float(np.unique(items[items >= 0]).size / n_items) if n_items else float("nan")


def gini(counts: ArrayLike) -> float:
    """Gini coefficient of non-negative counts: 0 when equal, (n-1)/n when one holds everything."""
    x = np.sort(_np(counts))
    n = x.size
    if n == 0 or x.sum() == 0:
        return float("nan")
    return float(2.0 * np.sum(np.arange(1, n + 1) * x) / (n * x.sum()) - (n + 1.0) / n)


def popularity_bias(top_items: np.ndarray, item_popularity: ArrayLike) -> dict[str, float]:
    """Mean log(1 + popularity) of recommended items (vs the catalogue's) and Gini of exposure over the catalogue."""
    popularity = _np(item_popularity)
    items = np.asarray(top_items).reshape(-1)
    items = items[items >= 0]
    exposure = np.bincount(items, minlength=popularity.size)
    return {
        "mean_log_popularity": float(np.log1p(popularity[items]).mean()) if items.size else float("nan"),
        "catalogue_mean_log_popularity": float(np.log1p(popularity).mean()) if popularity.size else float("nan"),
        "gini": gini(exposure),
    }


# -- uncertainty -----------------------------------------------------------------------
def bootstrap_intervals(
    statistic: Callable[[np.ndarray], dict[str, float]],
    n_rows: int,
    *,
    groups: ArrayLike | None = None,
    n_boot: int = 200,
    level: float = 0.9,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of each value of ``statistic(row_indices)``; rows, or whole groups (users), resampled.

    Resamples where a value is nan (e.g. a single-class AUC) are dropped for that value; (nan, nan) if all are.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        samples = (rng.integers(0, n_rows, n_rows) for _ in range(n_boot))
    else:
        _, gid = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
        order = np.argsort(gid, kind="stable")
        size = np.bincount(gid)
        start = np.cumsum(size) - size
        samples = (_rows_of(rng.integers(0, size.size, size.size), order, start, size) for _ in range(n_boot))
    replicates = [statistic(idx) for idx in samples]
    tail = (1.0 - level) / 2.0 * 100.0
    out: dict[str, tuple[float, float]] = {}
    for name in replicates[0] if replicates else ():
        values = np.array([r[name] for r in replicates], dtype=np.float64)
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [tail, 100.0 - tail]) if values.size else (np.nan, np.nan)
        out[name] = (float(low), float(high))
    return out


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n_rows: int,
    *,
    groups: ArrayLike | None = None,
    n_boot: int = 200,
    level: float = 0.9,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of one scalar ``statistic(row_indices)`` (see ``bootstrap_intervals``)."""
    result = bootstrap_intervals(lambda idx: {"value": statistic(idx)}, n_rows, groups=groups, n_boot=n_boot, level=level, seed=seed)
    return result.get("value", (float("nan"), float("nan")))


def _rows_of(picked: np.ndarray, order: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Row indices of the picked groups, concatenated (groups repeat when picked twice)."""
    lengths = size[picked]
    offsets = np.cumsum(lengths) - lengths
    within = np.arange(lengths.sum()) - np.repeat(offsets, lengths)
    return order[np.repeat(start[picked], lengths) + within]
