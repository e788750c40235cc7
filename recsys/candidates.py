"""Candidate sources besides the towers' ANN, shared by the service and the evaluation.

Production retrieval merges several generators and lets the ranker order the union; recsys has
two besides the towers, each with its own quota (``serve.cooccurrence_candidates``,
``serve.popular_candidates``; 0 = off):

- **co-occurrence** (item-to-item): for each of the user's last ``serve.cooccurrence_recent``
  history items, its ``serve.cooccurrence_neighbours`` most co-clicked items (cosine of the
  items' user sets, ``ItemNeighbours``); a candidate's score is the sum over the recent items.
  The service builds the table at load from every click it knows; the evaluation builds its
  own from train + valid clicks only, so no test event shapes it.
- **popular**: the most clicked items the user has not seen.

Each source fills its quota with items that no earlier source (towers, then co-occurrence, then
popular) proposed and the user has not seen; the code of the source that proposed an item is
kept (``SOURCES``), and the co-occurrence score of every candidate can enter the blend
(``serve.blend_cooccurrence``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

SOURCES = ("towers", "cooccurrence", "popular")  # candidate source codes 0, 1, 2


class ItemNeighbours:
    """Each item's ``k`` most co-clicked items: ``ids (n_items, k)`` item_idx (0 = none) and cosine ``weights (n_items, k)``."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor):
        self.ids, self.weights = ids, weights

    @property
    def n_items(self) -> int:
        return self.ids.shape[0]

    @classmethod
    def from_clicks(cls, user_idx: np.ndarray, item_idx: np.ndarray, n_items: int, k: int, max_per_user: int = 200) -> "ItemNeighbours":
        """Cosine ``|U_i & U_j| / sqrt(|U_i| |U_j|)`` of the clicked (user, item) pairs, each item keeping its ``k`` largest.

        Repeated pairs count once; a user with more than ``max_per_user`` distinct items counts
        their last ``max_per_user`` by position in the input (pass pairs oldest first), which
        bounds the pairs a user adds to the product.
        """
        users, items = np.asarray(user_idx, dtype=np.int64), np.asarray(item_idx, dtype=np.int64)
        key = users * n_items + items
        _, first_from_end = np.unique(key[::-1], return_index=True)  # each distinct pair once, at its last position
        last = len(users) - 1 - first_from_end
        order = np.lexsort((-last, users[last]))  # by user, latest first
        kept = last[order]
        rank = np.arange(len(kept)) - np.searchsorted(users[kept], users[kept])
        kept = kept[rank < max_per_user]
        pairs = np.stack([users[kept], items[kept]], axis=1) if len(kept) else np.zeros((0, 2), dtype=np.int64)
        n_users = int(pairs[:, 0].max()) + 1 if len(pairs) else 1
        known = torch.sparse_coo_tensor(torch.from_numpy(pairs.T.copy()), torch.ones(len(pairs)), (n_users, n_items), check_invariants=True).coalesce()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta": the product is exact
            gram = torch.sparse.mm(known.t().coalesce(), known).coalesce()  # (n_items, n_items) co-click counts, sparse
        rows, cols = gram.indices().numpy()
        counts = gram.values().numpy()
        degree = np.bincount(pairs[:, 1], minlength=n_items).astype(np.float64)
        off_diagonal = rows != cols
        rows, cols, counts = rows[off_diagonal], cols[off_diagonal], counts[off_diagonal]
        cosine = counts / np.sqrt(degree[rows] * degree[cols])
        order = np.lexsort((-cosine, rows))  # by item, most similar first
        rows, cols, cosine = rows[order], cols[order], cosine[order]
        rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
        keep = rank < k
        ids, weights = torch.zeros(n_items, k, dtype=torch.int64), torch.zeros(n_items, k)
        ids[rows[keep], rank[keep]] = torch.from_numpy(cols[keep])
        weights[rows[keep], rank[keep]] = torch.from_numpy(cosine[keep]).float()
        return cls(ids, weights)

    def scores(self, recent: torch.Tensor) -> torch.Tensor:
        """``recent (U, R)`` item_idx, 0-padded -> ``(U, n_items)``: each item's summed cosine to the recent items (0 for none)."""
        recent = recent.clamp(0, self.n_items - 1)
        out = torch.zeros(recent.shape[0], self.n_items)
        ids, weights = self.ids[recent], self.weights[recent] * (recent != 0).unsqueeze(-1)  # (U, R, k)
        out.scatter_add_(1, ids.flatten(1), weights.flatten(1))
        out[:, 0] = 0.0  # "no neighbour" slots
        return out


def add_source(taken: torch.Tensor, scores: torch.Tensor, excluded: torch.Tensor, quota: int) -> torch.Tensor:
    """The ``quota`` best-scored items per row that are neither ``excluded (U, n)`` nor in ``taken (U, N)`` (-1 = empty) -> ``(U, quota)``, -1 where fewer score above 0."""
    if quota <= 0:
        return torch.full((scores.shape[0], 0), -1, dtype=torch.int64)
    scores = scores.masked_fill(excluded, float("-inf"))
    rows = torch.arange(scores.shape[0]).unsqueeze(1).expand_as(taken)
    valid = taken >= 0
    scores[rows[valid], taken[valid]] = float("-inf")
    values, columns = torch.topk(scores, min(quota, scores.shape[1]), dim=1)
    columns = torch.where(values > 0, columns, torch.full_like(columns, -1))
    if columns.shape[1] < quota:
        columns = torch.nn.functional.pad(columns, (0, quota - columns.shape[1]), value=-1)
    return columns


def recent_items(history: torch.Tensor, count: int) -> torch.Tensor:
    """``history (U, L)`` left-aligned, 0-padded, oldest first -> each row's last ``count`` items ``(U, count)``, 0-padded."""
    length = (history != 0).sum(1, keepdim=True)
    position = length - count + torch.arange(count)  # (U, count) columns of the last items
    picked = history.gather(1, position.clamp(0, history.shape[1] - 1))
    return torch.where(position >= 0, picked, torch.zeros_like(picked))


def cooccurrence_feature(neighbours: ItemNeighbours, recent: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Mean co-occurrence cosine of each candidate ``(U, N)`` item_idx to the user's ``recent (U, R)`` items -> ``(U, N)`` in [0, 1]."""
    scores = neighbours.scores(recent)
    count = (recent != 0).sum(1, keepdim=True).clamp(min=1)
    return scores.gather(1, candidates.clamp(min=0)) / count


def merge_sources(
    towers: torch.Tensor,
    excluded: torch.Tensor,
    cooccurrence: torch.Tensor | None = None,
    cooccurrence_quota: int = 0,
    popularity: torch.Tensor | None = None,
    popular_quota: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of the sources, in item_idx space: ``towers (U, N)`` (-1 = empty), then each source's quota of new items.

    ``excluded (U, n_items)`` bool (the user's seen items; column 0, padding, is never proposed:
    scores must be 0 there), ``cooccurrence (U, n_items)`` from ``ItemNeighbours.scores``,
    ``popularity (n_items,)`` click counts. Returns the candidates ``(U, N + quotas)`` with the
    -1 padding at the end of each row, and each candidate's source code (``SOURCES``; -1 padding).
    """
    parts, codes = [towers], [torch.full_like(towers, SOURCES.index("towers"))]
    sources = [("cooccurrence", cooccurrence, cooccurrence_quota)]
    if popularity is not None:
        sources.append(("popular", popularity.float().expand(towers.shape[0], -1), popular_quota))
    for name, scores, quota in sources:
        if scores is not None and quota > 0:
            parts.append(add_source(torch.cat(parts, 1), scores, excluded, quota))
            codes.append(torch.full_like(parts[-1], SOURCES.index(name)))
    candidates, codes = torch.cat(parts, 1), torch.cat(codes, 1)
    codes[candidates < 0] = -1
    order = torch.argsort((candidates < 0).to(torch.int8), dim=1, stable=True)
    return candidates.gather(1, order), codes.gather(1, order)


def one_user_scores(neighbours: ItemNeighbours, recent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ItemNeighbours.scores`` of one user without an ``n_items`` row: ``recent (R,)`` item_idx -> (item_idx (u,) sorted, summed cosine (u,)).

    Costs O(R k), not O(n_items): the service's path, one request at a time.
    """
    recent = recent[(recent > 0) & (recent < neighbours.n_items)]
    ids, weights = neighbours.ids[recent].numpy().ravel(), neighbours.weights[recent].numpy().ravel()
    keep = ids > 0
    items, inverse = np.unique(ids[keep], return_inverse=True)
    return items, np.bincount(inverse, weights=weights[keep], minlength=len(items))


def top_new(items: np.ndarray, scores: np.ndarray, excluded: np.ndarray, quota: int) -> np.ndarray:
    """The ``quota`` best-scored ``items`` (scores above 0) not in ``excluded``, best first (ties: lower item_idx first, as ``torch.topk`` need not be)."""
    keep = (scores > 0) & ~np.isin(items, excluded)
    items, scores = items[keep], scores[keep]
    return items[np.lexsort((items, -scores))][:quota]
