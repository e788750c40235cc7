"""Candidate sources besides the towers' ANN, shared by the service and the evaluation.

Production retrieval merges several generators and lets the ranker order the union; recsys has
two besides the towers, each with its own quota (``serve.cooccurrence_candidates``,
``serve.popular_candidates``; 0 = off):

- **co-occurrence** (item-to-item): an item x item table ``ItemNeighbours`` read over the items the
  user clicked (``distinct_recent``: each once, at its latest click; the last
  ``serve.cooccurrence_recent``, 0 = all). Its kind is ``serve.item_item``: EASE's closed form
  (``ease_weights``; each item keeps its ``serve.ease_neighbours`` weights largest in magnitude,
  negative ones too) on catalogues up to ``serve.ease_max_items``, else the cosine of the items'
  user sets (each item's ``serve.cooccurrence_neighbours`` most co-clicked items). A candidate's
  score is the sum of its weights from the user's items. The service builds the table at load
  from every click it knows; the evaluation builds its own from train + valid clicks only, so no
  test event shapes it.
- **popular**: the most clicked items the user has not seen.

Each source fills its quota with items that no earlier source (towers, then co-occurrence, then
popular) proposed and the user has not seen; the code of the source that proposed an item is
kept (``SOURCES``), and the co-occurrence score of every candidate, divided by the number of the
user's items, can enter the blend (``serve.blend_ease`` or ``serve.blend_cooccurrence``).
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.config import ServeConfig

SOURCES = ("towers", "cooccurrence", "popular")  # candidate source codes 0, 1, 2
DENSE_SCORES = 65_536  # one_user_scores sums into a dense n_items row up to this catalogue size
DENSE_BLOCK_ENTRIES = 20_000_000  # users x items of one dense block while counting co-occurrences (~80 MB of float32)
GRAM_BLOCK = 4_000_000  # ItemNeighbours.from_clicks: (item, co-clicked item) entries of one block of the co-click counts
SCORE_BLOCK = 4_000_000  # ItemNeighbours.scores: (user, item, neighbour) entries gathered at once


class ItemNeighbours:
    """Each item's ``k`` neighbours: ``ids (n_items, k)`` item_idx (0 = none) and ``weights (n_items, k)`` (cosines, or EASE's signed weights)."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor, kind: str = "cosine"):
        self.ids, self.weights, self.kind = ids, weights, kind  # kind: "cosine" or "ease", which blend weight its scores take

    @property
    def n_items(self) -> int:
        return self.ids.shape[0]

    @classmethod
    def from_top(cls, weights: torch.Tensor, k: int, kind: str = "ease") -> "ItemNeighbours":
        """Each row of a dense item x item ``weights (n_items, n_items)`` (row i: how much knowing i adds to each j) kept at its ``k`` entries largest in magnitude.

        Negative weights are kept too: EASE's say that knowing i makes j less likely, and dropping them costs ranking quality.
        """
        n_items = weights.shape[0]
        weights = weights.float()
        _, columns = torch.topk(weights.abs(), min(k, n_items), dim=1)
        values = weights.gather(1, columns)
        keep = values != 0
        ids = torch.where(keep, columns, torch.zeros_like(columns))
        out = torch.where(keep, values, torch.zeros_like(values))
        if ids.shape[1] < k:
            ids, out = torch.nn.functional.pad(ids, (0, k - ids.shape[1])), torch.nn.functional.pad(out, (0, k - out.shape[1]))
        ids[0], out[0] = 0, 0.0  # padding knows nothing
        return cls(ids, out, kind)

    @classmethod
    def from_ease(cls, user_idx: np.ndarray, item_idx: np.ndarray, n_items: int, k: int, l2: float) -> "ItemNeighbours":
        """EASE's item-item weights (``ease_weights``) of the clicked (user, item) pairs, each item keeping its ``k`` largest."""
        return cls.from_top(ease_weights(click_gram(user_idx, item_idx, n_items, torch.float64), l2), k)

    @classmethod
    def from_clicks(cls, user_idx: np.ndarray, item_idx: np.ndarray, n_items: int, k: int, max_per_user: int = 200, gram_block: int = 0) -> "ItemNeighbours":
        """Cosine ``|U_i & U_j| / sqrt(|U_i| |U_j|)`` of the clicked (user, item) pairs, each item keeping its ``k`` largest.

        Repeated pairs count once; a user with more than ``max_per_user`` distinct items counts
        their last ``max_per_user`` by position in the input (pass pairs oldest first), which
        bounds the pairs a user adds to the product. The co-click counts ``X^T X`` are built for a
        block of items at a time, at most about ``gram_block`` (item, co-clicked item) entries each
        (a block holds one item at least), so memory stays bounded whatever the catalogue: at 1M
        items and 4M clicks, building the whole sparse product at once raised evaluate's RSS by 4.4 GB.
        """
        users, items = np.asarray(user_idx, dtype=np.int64), np.asarray(item_idx, dtype=np.int64)
        key = users * n_items + items
        _, first_from_end = np.unique(key[::-1], return_index=True)  # each distinct pair once, at its last position
        last = len(users) - 1 - first_from_end
        order = np.lexsort((-last, users[last]))  # by user, latest first
        kept = last[order]
        rank = np.arange(len(kept)) - np.searchsorted(users[kept], users[kept])
        kept = kept[rank < max_per_user]
        users, items = users[kept], items[kept]  # each (user, item) once
        n_users = int(users.max()) + 1 if len(users) else 1
        user_degree = np.bincount(users, minlength=n_users)
        degree = np.bincount(items, minlength=n_items).astype(np.float64)
        by_user = np.lexsort((items, users))
        user_items, user_start = items[by_user], np.concatenate([[0], np.cumsum(user_degree)])
        by_item = np.lexsort((users, items))
        item_sorted, item_users, item_start = items[by_item], users[by_item], np.concatenate([[0], np.cumsum(degree.astype(np.int64))])
        ids, weights = torch.zeros(n_items, k, dtype=torch.int64), torch.zeros(n_items, k)
        # X^T X row block by row block: item i's row lists, for each of its users, all of that user's items
        products = np.concatenate([[0], np.cumsum(np.bincount(items, weights=user_degree[users], minlength=n_items).astype(np.int64))])
        first = 0
        while first < n_items:
            last = max(first + 1, int(np.searchsorted(products, products[first] + (gram_block or GRAM_BLOCK), side="right")) - 1)  # items [first, last)
            span = slice(item_start[first], item_start[last])
            block_items, block_users = item_sorted[span], item_users[span]
            per_pair = user_degree[block_users]
            total = int(per_pair.sum())
            offsets = np.arange(total) - np.repeat(np.cumsum(per_pair) - per_pair, per_pair)
            key = np.repeat(block_items, per_pair) * n_items + user_items[np.repeat(user_start[block_users], per_pair) + offsets]
            key, counts = np.unique(key, return_counts=True)  # (row, col) co-click counts, sorted by row then col
            rows, cols = key // n_items, key % n_items
            off_diagonal = rows != cols
            rows, cols, counts = rows[off_diagonal], cols[off_diagonal], counts[off_diagonal]
            cosine = counts / np.sqrt(degree[rows] * degree[cols])
            order = np.lexsort((-cosine, rows))  # by item, most similar first (ties: lower item_idx)
            rows, cols, cosine = rows[order], cols[order], cosine[order]
            rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
            keep = rank < k
            ids[rows[keep], rank[keep]] = torch.from_numpy(cols[keep])
            weights[rows[keep], rank[keep]] = torch.from_numpy(cosine[keep]).float()
            first = last
        return cls(ids, weights)

    def scores(self, recent: torch.Tensor) -> torch.Tensor:
        """``recent (U, R)`` item_idx, 0-padded -> ``(U, n_items)``: each item's weights from the recent items, summed (0 for none).

        Summed over blocks of R so that at most SCORE_BLOCK (user, item, neighbour) entries are held at once.
        """
        recent = recent.clamp(0, self.n_items - 1)
        out = torch.zeros(recent.shape[0], self.n_items)
        step = max(1, SCORE_BLOCK // max(recent.shape[0] * self.ids.shape[1], 1))
        for start in range(0, recent.shape[1], step):
            part = recent[:, start : start + step]
            ids, weights = self.ids[part], self.weights[part] * (part != 0).unsqueeze(-1)  # (U, r, k)
            out.scatter_add_(1, ids.flatten(1), weights.flatten(1))
        out[:, 0] = 0.0  # "no neighbour" slots
        return out


def item_neighbours(user_idx: np.ndarray, item_idx: np.ndarray, n_items: int, serve: ServeConfig) -> ItemNeighbours:
    """The co-occurrence source's table as ``serve`` asks (``serve.item_item``), from clicked (user, item) pairs, oldest first."""
    if item_item_kind(n_items, serve) == "ease":
        return ItemNeighbours.from_ease(user_idx, item_idx, n_items, serve.ease_neighbours, serve.ease_lambda)
    return ItemNeighbours.from_clicks(user_idx, item_idx, n_items, serve.cooccurrence_neighbours)


def item_item_wanted(n_items: int, serve: ServeConfig) -> bool:
    """Whether the co-occurrence source is used at all: its quota or its kind's blend weight is on."""
    return serve.cooccurrence_candidates > 0 or serve.item_item_blend(item_item_kind(n_items, serve)) > 0


def item_item_kind(n_items: int, serve: ServeConfig) -> str:
    """``serve.item_item`` resolved: ``auto`` is ``ease`` for catalogues up to ``serve.ease_max_items`` (row 0, padding, not counted)."""
    if serve.item_item != "auto":
        return serve.item_item
    return "ease" if n_items - 1 <= serve.ease_max_items else "cosine"


def click_gram(user_idx: np.ndarray, item_idx: np.ndarray, n_items: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X^T X`` of the distinct clicked (user, item) pairs -> dense ``(n_items, n_items)``: users who clicked both items."""
    users, items = np.asarray(user_idx, dtype=np.int64), np.asarray(item_idx, dtype=np.int64)
    pairs = np.unique(np.stack([users, items], axis=1), axis=0) if len(users) else np.zeros((0, 2), dtype=np.int64)
    n_users = int(pairs[:, 0].max()) + 1 if len(pairs) else 1
    known = torch.sparse_coo_tensor(torch.from_numpy(pairs.T.copy()), torch.ones(len(pairs)), (n_users, n_items), check_invariants=True)
    return gram_matrix(known.coalesce(), dtype)


def compressed_rows(known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_start (n_users + 1,), items (nnz,))`` of a sparse user x item X: user u's items are ``items[row_start[u]:row_start[u + 1]]``."""
    users, items = known.coalesce().indices()  # coalesced: sorted by user, then item
    return torch.searchsorted(users, torch.arange(known.shape[0] + 1)), items


def gram_matrix(known: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X^T X`` ``(n_items, n_items)`` of a sparse binary user x item X: users who know both items.

    Summed over blocks of users, each at most DENSE_BLOCK_ENTRIES dense: never a dense users x items
    matrix, nor a sparse product with an entry per co-clicked pair.
    """
    n_users, n_items = known.shape
    row_start, items = compressed_rows(known)
    gram = torch.zeros(n_items, n_items, dtype=dtype)
    users_per_block = max(1, DENSE_BLOCK_ENTRIES // max(n_items, 1))
    for start in range(0, n_users, users_per_block):
        stop = min(start + users_per_block, n_users)
        lo, hi = int(row_start[start]), int(row_start[stop])
        users = torch.repeat_interleave(torch.arange(stop - start), row_start[start + 1 : stop + 1] - row_start[start:stop])
        by_item = torch.sparse_coo_tensor(torch.stack([items[lo:hi], users]), torch.ones(hi - lo), (n_items, stop - start), check_invariants=False)  # X_block^T; valid by construction
        gram += torch.sparse.mm(by_item, by_item.T.to_dense())  # integer counts: exact in float32 below 2^24
    return gram


def ease_weights(gram: torch.Tensor, l2: float) -> torch.Tensor:
    """EASE (Steck, WWW 2019): ``B = I - P diag(1 / diag(P))``, ``P = (G + l2 I)^-1`` of a Gram ``G = X^T X``, ``diag(B) = 0`` -> float32.

    Solved in float64, in place of ``gram``: two dense n_items x n_items matrices at the peak (16 n_items^2 bytes).
    ``B[i, j]`` is what knowing item i adds to item j's score; a user's score of j is the sum over the items they know.
    """
    gram = gram.double()
    gram.diagonal().add_(l2)
    precision = torch.linalg.inv(gram)  # P
    del gram
    weights = precision.div_(-precision.diagonal().clone())  # column j / -P_jj: B off the diagonal
    weights.fill_diagonal_(0.0)  # 1 - P_jj / P_jj
    return weights.float()


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


def distinct_recent(items: np.ndarray, count: int) -> np.ndarray:
    """A user's clicked ``items`` (oldest first) as the co-occurrence source reads them: each item once, at its
    latest click, oldest first, the last ``count`` of them (0 = all)."""
    items = np.asarray(items, dtype=np.int64)
    return distinct_recent_csr(np.zeros(len(items), dtype=np.int64), items, 1, count)[1]


def distinct_recent_csr(user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``distinct_recent`` of every user at once: clicked pairs sorted by user, oldest first within a user -> CSR (ptr (n_users + 1,), items)."""
    users, items = np.asarray(user_idx, dtype=np.int64), np.asarray(item_idx, dtype=np.int64)
    position = np.arange(len(users))
    order = np.lexsort((position, items, users))  # each (user, item) group, its clicks in time order
    last = np.ones(len(order), dtype=bool)
    last[:-1] = (users[order][1:] != users[order][:-1]) | (items[order][1:] != items[order][:-1])
    kept = np.sort(order[last])  # each distinct pair at its latest click, back in (user, time) order
    users, items = users[kept], items[kept]
    ptr = np.searchsorted(users, np.arange(n_users + 1))
    if count:
        from_end = ptr[users + 1] - 1 - np.arange(len(users))  # 0 for a user's latest item
        users, items = users[from_end < count], items[from_end < count]
        ptr = np.searchsorted(users, np.arange(n_users + 1))
    return ptr.astype(np.int64), items


class KnownItems:
    """Every user's ``distinct_recent`` clicked items, CSR by user_idx; ``batch(user_idx)`` pads them for ``ItemNeighbours.scores``."""

    def __init__(self, user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, count: int):
        """``user_idx``/``item_idx``: clicked pairs sorted by user, oldest first within a user."""
        self.ptr, self.items = distinct_recent_csr(user_idx, item_idx, n_users, count)

    def of(self, user: int) -> np.ndarray:
        return self.items[self.ptr[user] : self.ptr[user + 1]] if 0 <= user < len(self.ptr) - 1 else np.zeros(0, dtype=np.int64)

    def batch(self, user_idx: torch.Tensor) -> torch.Tensor:
        """``(U,)`` user_idx -> ``(U, R)`` item_idx, left-aligned, 0-padded (R: the longest of them, at least 1)."""
        rows = [self.of(int(u)) for u in user_idx]
        out = np.zeros((len(rows), max([1] + [len(r) for r in rows])), dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return torch.from_numpy(out)


def cooccurrence_feature(neighbours: ItemNeighbours, recent: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Each candidate's ``(U, N)`` summed weight from the user's ``recent (U, R)`` items, divided by their number -> ``(U, N)``
    (a mean cosine in [0, 1] for a cosine table; signed for EASE).

    Above DENSE_SCORES catalogue items each user's scores are summed sparsely (``one_user_scores``)
    and read at the candidates, instead of a ``(U, n_items)`` matrix: the same values.
    """
    count = (recent != 0).sum(1, keepdim=True).clamp(min=1)
    if neighbours.n_items <= DENSE_SCORES:
        return neighbours.scores(recent).gather(1, candidates.clamp(min=0)) / count
    out = torch.zeros(candidates.shape, dtype=torch.float32)
    for row in range(candidates.shape[0]):
        items, scores = one_user_scores(neighbours, recent[row].numpy())
        wanted = candidates[row].clamp(min=0).numpy()
        at = np.minimum(np.searchsorted(items, wanted), max(len(items) - 1, 0))
        hit = (items[at] == wanted) if len(items) else np.zeros(len(wanted), dtype=bool)
        out[row] = torch.from_numpy(np.where(hit, scores[at] if len(items) else 0.0, 0.0).astype(np.float32))
    return out / count


def top_unseen(ranked: np.ndarray, seen: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` of ``ranked`` (best first) not in ``seen``; reads at most ``n + len(seen)`` of them, never the whole list."""
    head = ranked[: n + len(seen)]
    return head[~np.isin(head, seen)][:n]


def one_user_union(
    towers: np.ndarray,
    seen: np.ndarray,
    cooccurrence: tuple[np.ndarray, np.ndarray] | None = None,
    cooccurrence_quota: int = 0,
    popular: np.ndarray | None = None,
    popular_quota: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``merge_sources`` for one user in O(recent x neighbours), not O(n_items): the service's path and the evaluation's above DENSE_SCORES items.

    ``towers`` the first source's items, ``seen`` the user's, ``cooccurrence`` (item_idx, score) from
    ``one_user_scores``, ``popular`` item_idx most clicked first. Each source adds unseen items no
    earlier source proposed; returns the items and their source codes (``SOURCES``).
    """
    parts, codes = [towers], [np.full(len(towers), SOURCES.index("towers"), dtype=np.int64)]
    if cooccurrence is not None and cooccurrence_quota > 0:
        extra = top_new(*cooccurrence, np.concatenate([seen, towers]), cooccurrence_quota)
        parts.append(extra)
        codes.append(np.full(len(extra), SOURCES.index("cooccurrence"), dtype=np.int64))
    if popular is not None and popular_quota > 0:
        extra = top_unseen(popular, np.concatenate([seen, *parts]), popular_quota)
        parts.append(extra)
        codes.append(np.full(len(extra), SOURCES.index("popular"), dtype=np.int64))
    return np.concatenate(parts), np.concatenate(codes)


def merge_sources_sparse(
    towers: torch.Tensor,
    excluded_rows: torch.Tensor,
    excluded_items: torch.Tensor,
    neighbours: ItemNeighbours | None,
    recent: torch.Tensor | None,
    cooccurrence_quota: int = 0,
    popular: np.ndarray | None = None,
    popular_quota: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_sources`` without ``(U, n_items)`` matrices, row by row through ``one_user_union``: large catalogues.

    ``excluded_rows`` / ``excluded_items`` (P,): the (row, item_idx) pairs each row must not be
    proposed; ``recent (U, R)`` the rows' known items for the co-occurrence source; ``popular``
    item_idx by click count, most clicked first. The same candidates as ``merge_sources``
    (ties of equal scores: lower item_idx first).
    """
    order = torch.argsort(excluded_rows, stable=True)
    rows, items = excluded_rows[order].numpy(), excluded_items[order].numpy()
    bounds = np.searchsorted(rows, np.arange(towers.shape[0] + 1))
    width = towers.shape[1] + (cooccurrence_quota if neighbours is not None else 0) + (popular_quota if popular is not None else 0)
    candidates = torch.full((towers.shape[0], width), -1, dtype=torch.int64)
    codes = torch.full_like(candidates, -1)
    for row in range(towers.shape[0]):
        own = towers[row][towers[row] >= 0].numpy()
        cooccurrence = one_user_scores(neighbours, recent[row].numpy()) if neighbours is not None and cooccurrence_quota > 0 else None
        merged, merged_codes = one_user_union(own, items[bounds[row] : bounds[row + 1]], cooccurrence, cooccurrence_quota, popular, popular_quota)
        candidates[row, : len(merged)] = torch.from_numpy(merged)
        codes[row, : len(merged)] = torch.from_numpy(merged_codes)
    return candidates, codes


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

    Costs O(R k), not O(n_items), on large catalogues: the service's path, one request at a time
    (on catalogues up to DENSE_SCORES items, one O(n_items) bincount instead of sorting the R k entries).
    """
    recent = recent[(recent > 0) & (recent < neighbours.n_items)]
    ids, weights = neighbours.ids[recent].numpy().ravel(), neighbours.weights[recent].numpy().ravel()
    keep = ids > 0
    if neighbours.n_items <= DENSE_SCORES:
        dense = np.bincount(ids[keep], weights=weights[keep], minlength=neighbours.n_items)
        items = np.flatnonzero(np.bincount(ids[keep], minlength=neighbours.n_items))  # as np.unique(ids[keep])
        return items, dense[items]
    items, inverse = np.unique(ids[keep], return_inverse=True)
    return items, np.bincount(inverse, weights=weights[keep], minlength=len(items))


def top_new(items: np.ndarray, scores: np.ndarray, excluded: np.ndarray, quota: int) -> np.ndarray:
    """The ``quota`` best-scored ``items`` (scores above 0) not in ``excluded``, best first (ties: lower item_idx first, as ``torch.topk`` need not be)."""
    keep = (scores > 0) & ~np.isin(items, excluded)
    items, scores = items[keep], scores[keep]
    return items[np.lexsort((items, -scores))][:quota]
