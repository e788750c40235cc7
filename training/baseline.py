"""Baselines ranked with the model's own retrieval protocol (``training.retrieval.rank_catalogue``).

- Retrieval (``eval.baselines``, metrics.json ``baselines.NAME.retrieval``):
  - ``most_popular``: every user gets the items with the most clicked train rows (the
    popularity the protocol reports, ``RetrievalResult.item_popularity``), ties by item_idx.
  - ``item_knn``: item-based top-N (Deshpande & Karypis, TOIS 2004): cosine similarity of the
    items' columns of the binary user x item matrix X, each item keeps its
    ``eval.knn_neighbours`` most similar items (W), and a user's score for item j is the sum of
    the similarities to j of the items the user knows: ``X_u . W[:, j]``.
  - ``ease``: EASE (Steck, WWW 2019), ``B = I - P diag(1 / diag(P))`` with
    ``P = (X^T X + lambda I)^-1``, so ``diag(B) = 0``; scores ``X_u . B[:, j]``.
  - ``bpr_mf``: BPR-MF (Rendle et al., UAI 2009) on the train split's clicked (user, item)
    pairs, one uniformly sampled negative item per positive.
  X holds the known clicks of the protocol (clicked, non-sampled rows of train and valid):
  exactly the interactions it takes a user's history and exclusions from, so item-kNN and EASE
  see a user's whole known set (not the last ``history_len`` items the towers get). BPR-MF is
  trained on train only, as ``baseline_mf`` always was.
- Rating (``eval.baseline_mf``): biased MF, ``mu + b_u + b_i + p_u . q_i``, least squares on the
  rated train rows.

No content, no side features: what ids and co-occurrence alone give, as a yardstick for the model.
Each retrieval baseline is an object with ``spec``, ``user_vectors`` and ``item_vectors`` whose
dot product is its score, so ``rank_catalogue`` ranks, excludes and counts exactly as for the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from recsys import candidates


@dataclass(frozen=True)
class MFSpec:
    """The parts of ``ModelSpec`` that the ranking protocol reads."""

    n_users: int
    n_items: int
    history_len: int


class BPRMF(nn.Module):
    """User and item factors; score = ``p_u . q_i``. Row 0 (unknown) stays zero."""

    def __init__(self, spec: MFSpec, dim: int = 32):
        super().__init__()
        self.spec = spec
        self.users = nn.Embedding(spec.n_users, dim)
        self.items = nn.Embedding(spec.n_items, dim)
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)

    def user_vectors(self, user_idx: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` -> ``(B, dim)``; the history is ignored (same call as ``RecsysModel.user_vectors``)."""
        return self.users(user_idx.clamp(0, self.spec.n_users - 1)).detach()

    def item_vectors(self) -> torch.Tensor:
        """All item factors ``(n_items, dim)``, row = item_idx."""
        return self.items.weight.detach()


def train_bpr(train: pl.DataFrame, spec: MFSpec, dim: int = 32, epochs: int = 30, batch_size: int = 4096, lr: float = 0.01, l2: float = 1e-4, seed: int = 0) -> BPRMF:
    """BPR-MF on the clicked rows of ``train`` (columns user_idx, item_idx, click)."""
    torch.manual_seed(seed)
    clicked = train.filter(pl.col("click") == 1)
    users = torch.from_numpy(clicked["user_idx"].to_numpy().astype(np.int64))
    positives = torch.from_numpy(clicked["item_idx"].to_numpy().astype(np.int64))
    model = BPRMF(spec, dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(users))
        for start in range(0, len(users), batch_size):
            rows = order[start : start + batch_size]
            u, i = model.users(users[rows]), model.items(positives[rows])
            j = model.items(torch.randint(1, spec.n_items, (len(rows),)))  # uniform negatives over the catalogue
            loss = -F.logsigmoid((u * (i - j)).sum(-1)).mean() + l2 * (u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum()) / len(rows)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


class BiasedMF(nn.Module):
    """``rating = mu + b_u + b_i + p_u . q_i`` (unknown ids: their zero-initialised rows)."""

    def __init__(self, n_users: int, n_items: int, mean: float, dim: int = 16):
        super().__init__()
        self.mean = mean
        self.user_bias, self.item_bias = nn.Embedding(n_users, 1), nn.Embedding(n_items, 1)
        self.users, self.items = nn.Embedding(n_users, dim), nn.Embedding(n_items, dim)
        for table in (self.user_bias, self.item_bias):
            nn.init.zeros_(table.weight)
        for table in (self.users, self.items):
            nn.init.normal_(table.weight, std=0.01)

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:  # (B,), (B,) -> (B,)
        u, i = user_idx.clamp(0, self.users.num_embeddings - 1), item_idx.clamp(0, self.items.num_embeddings - 1)
        return self.mean + self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1) + (self.users(u) * self.items(i)).sum(-1)


def train_rating_mf(train: pl.DataFrame, n_users: int, n_items: int, dim: int = 16, epochs: int = 15, batch_size: int = 1024, lr: float = 0.01, l2: float = 0.1, seed: int = 0) -> BiasedMF | None:
    """Biased MF on the rated rows of ``train``; None when nothing is rated."""
    rated = train.filter(pl.col("rating").is_not_null()) if "rating" in train.columns else train.clear()
    if rated.height == 0:
        return None
    torch.manual_seed(seed)
    users = torch.from_numpy(rated["user_idx"].to_numpy().astype(np.int64))
    items = torch.from_numpy(rated["item_idx"].to_numpy().astype(np.int64))
    target = torch.from_numpy(rated["rating"].cast(pl.Float32).to_numpy().copy())
    model = BiasedMF(n_users, n_items, float(target.mean()), dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(target))
        for start in range(0, len(target), batch_size):
            rows = order[start : start + batch_size]
            u, i = users[rows], items[rows]
            penalty = model.users(u).pow(2).sum(-1) + model.items(i).pow(2).sum(-1) + model.user_bias(u).squeeze(-1) ** 2 + model.item_bias(i).squeeze(-1) ** 2
            loss = F.mse_loss(model(u, i), target[rows]) + l2 * penalty.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


# -- popularity and item-item baselines --------------------------------------------------
DENSE_BLOCK_ENTRIES = 20_000_000  # users x items of one dense block while counting co-occurrences (~80 MB of float32)


class MostPopular:
    """Every user's scores are the items' train popularity: user vector ``(B, 1)`` of ones, item vector ``(n_items, 1)``."""

    def __init__(self, spec: MFSpec, popularity: np.ndarray):
        self.spec = spec
        # Score = n_items - position in the order (most clicks first, then lower item_idx): distinct
        # integers, exact in float32, so torch.topk's undefined tie order never matters.
        order = np.lexsort((np.arange(spec.n_items), -np.asarray(popularity, dtype=np.int64)))
        scores = np.empty(spec.n_items, dtype=np.float32)
        scores[order] = spec.n_items - np.arange(spec.n_items, dtype=np.float32)
        self.scores = torch.from_numpy(scores)

    def user_vectors(self, user_idx: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` -> ``(B, 1)`` ones: the same ranking for everyone."""
        return torch.ones(len(user_idx), 1)

    def item_vectors(self) -> torch.Tensor:
        """``(n_items, 1)``, row = item_idx."""
        return self.scores[:, None]


class ItemItem:
    """``score(u, j) = X_u . W[:, j]`` for an item x item matrix W (item-kNN, EASE).

    The user vector is the user's row of the known-click matrix X ``(B, n_items)``; the item
    vectors are the columns of W, ``W^T`` ``(n_items, n_items)``, so their dot product is the score.
    """

    def __init__(self, spec: MFSpec, known: torch.Tensor, weights: torch.Tensor):
        self.spec = spec
        self.row_start, self.known_items = compressed_rows(known)
        self.weights = weights  # (n_items, n_items) float32: W[i, j] = how much knowing i adds to j

    def user_vectors(self, user_idx: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` -> ``(B, n_items)`` rows of X; the truncated history is not needed, X holds every known click."""
        # Gathered by hand: torch's sparse index_select fails under inference_mode (rank_catalogue's) on large matrices.
        start, count = self.row_start[user_idx], self.row_start[user_idx + 1] - self.row_start[user_idx]
        row = torch.repeat_interleave(torch.arange(len(user_idx)), count)
        first_of_row = torch.repeat_interleave(start - (count.cumsum(0) - count), count)  # position in known_items minus position in the batch
        rows = torch.zeros(len(user_idx), self.spec.n_items)
        rows[row, self.known_items[first_of_row + torch.arange(len(row))]] = 1.0
        return rows

    def item_vectors(self) -> torch.Tensor:
        """``(n_items, n_items)``: row j = column j of W."""
        return self.weights.T


def known_matrix(known_pairs: pl.DataFrame, n_users: int, n_items: int) -> torch.Tensor:
    """Binary user x item matrix of the (user_idx, item_idx) pairs -> sparse COO ``(n_users, n_items)``, repeats counted once."""
    pairs = known_pairs.select(pl.col("user_idx", "item_idx").cast(pl.Int64)).unique()
    indices = torch.from_numpy(pairs.to_numpy().T.copy())  # (2, nnz)
    return torch.sparse_coo_tensor(indices, torch.ones(pairs.height), (n_users, n_items), check_invariants=True).coalesce()


def compressed_rows(known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_start (n_users + 1,), items (nnz,))`` of X: user u's items are ``items[row_start[u]:row_start[u + 1]]``."""
    users, items = known.coalesce().indices()  # coalesced: sorted by user, then item
    return torch.searchsorted(users, torch.arange(known.shape[0] + 1)), items


def cooccurrence(known: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X^T X`` ``(n_items, n_items)``: users who know both items; summed over blocks of users, each at most DENSE_BLOCK_ENTRIES dense."""
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


def item_knn_weights(known: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Cosine item-item similarity of X's columns, each row keeping its ``neighbours`` largest entries -> ``(n_items, n_items)``.

    ``W[i, j] = |U_i & U_j| / sqrt(|U_i| |U_j|)`` (U_i: users who know item i) when j is one of i's
    nearest neighbours, else 0; ``W[i, i] = 0`` (an item is not its own neighbour).
    """
    n_items = known.shape[1]
    norms = torch.sparse.sum(known, dim=0).to_dense().sqrt().clamp_min(1.0)  # (n_items,); items nobody knows have zero rows anyway
    cosine = cooccurrence(known)
    cosine /= norms[:, None]
    cosine /= norms[None, :]
    cosine.fill_diagonal_(0.0)
    values, columns = torch.topk(cosine, min(neighbours, n_items), dim=1)  # fewer similar items than that: zeros among them
    return cosine.zero_().scatter_(1, columns, values)


def ease_weights(known: torch.Tensor, l2: float) -> torch.Tensor:
    """EASE (``recsys.candidates.ease_weights``) of the known matrix ``X`` -> ``(n_items, n_items)`` float32."""
    return candidates.ease_weights(cooccurrence(known, torch.float64), l2)
