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
- Both factorisations take closed-form gradients applied by row-wise Adagrad to the batch's rows
  (``RowwiseAdagrad``), so a step costs its batch, not the tables; each trains within
  ``eval.baseline_max_samples`` sample steps (``Schedule``: fewer epochs, then one epoch on a
  sample, said in metrics.json ``baseline_training`` and the report), with a progress bar.

No content, no side features: what ids and co-occurrence alone give, as a yardstick for the model.
Each retrieval baseline is an object with ``spec``, ``user_vectors`` and ``item_vectors`` whose
dot product is its score, so ``rank_catalogue`` ranks, excludes and counts exactly as for the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn
from tqdm import tqdm

from recsys import candidates


@dataclass(frozen=True)
class MFSpec:
    """The parts of ``ModelSpec`` that the ranking protocol reads."""

    n_users: int
    n_items: int
    history_len: int


@dataclass(frozen=True)
class Schedule:
    """How much a factorisation baseline trains: ``epochs`` passes over ``rows`` of its ``of_rows`` training rows.

    Above ``max_samples`` sample steps in all (``eval.baseline_max_samples``) it trains fewer epochs,
    down to one, and above that many rows, one epoch on a seeded sample of ``max_samples`` rows:
    the cost is bounded by the budget, not by the log, and ``note`` says so in metrics.json and the report.
    """

    epochs: int
    rows: int
    of_rows: int

    @classmethod
    def fit(cls, n_rows: int, epochs: int, max_samples: int) -> "Schedule":
        if n_rows * epochs <= max_samples:
            return cls(epochs, n_rows, n_rows)
        return cls(max(1, min(epochs, max_samples // max(n_rows, 1))), min(n_rows, max_samples), n_rows)

    @property
    def note(self) -> str:
        if self.rows < self.of_rows:
            return f"trained 1 epoch on a sample of {self.rows:,} of its {self.of_rows:,} rows (eval.baseline_max_samples)"
        return f"trained {self.epochs} epoch(s) on {self.rows:,} rows"

    def summary(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "rows": self.rows, "of_rows": self.of_rows, "note": self.note}

    def batches(self, batch_size: int, desc: str, seed: int) -> Iterator[torch.Tensor]:
        """Each step's row positions (into the ``of_rows`` rows), shuffled per epoch, with a progress bar over all steps."""
        generator = torch.Generator().manual_seed(seed)
        steps = self.epochs * -(-self.rows // batch_size)
        with tqdm(total=steps, desc=desc, unit="step", leave=False, mininterval=1.0) as progress:
            for _ in range(self.epochs):
                order = torch.randperm(self.of_rows, generator=generator)[: self.rows]
                for start in range(0, self.rows, batch_size):
                    yield order[start : start + batch_size]
                    progress.update()


class RowwiseAdagrad:
    """Row-wise Adagrad on plain tensors (one accumulator per row, as the model's fused TorchRec optimizer):
    a step costs the batch's rows, never the whole table, so the factorisation baselines scale like the model's training."""

    def __init__(self, table: torch.Tensor, lr: float, eps: float = 1e-8):
        self.table, self.lr, self.eps = table, lr, eps
        self.state = torch.zeros(table.shape[0])

    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """``grad (B, dim)`` of the rows ``rows (B,)``; repeated rows have their gradients summed first."""
        unique, inverse = torch.unique(rows, return_inverse=True)
        summed = torch.zeros(len(unique), grad.shape[1]).index_add_(0, inverse, grad)
        self.state[unique] += summed.pow(2).mean(1)
        self.table[unique] -= self.lr * summed / (self.state[unique].sqrt() + self.eps).unsqueeze(1)


class BPRMF(nn.Module):
    """User and item factors; score = ``p_u . q_i``. Row 0 (unknown) stays as initialised (never trained)."""

    def __init__(self, spec: MFSpec, dim: int = 32):
        super().__init__()
        self.spec = spec
        self.users = nn.Embedding(spec.n_users, dim).requires_grad_(False)
        self.items = nn.Embedding(spec.n_items, dim).requires_grad_(False)
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)

    def user_vectors(self, user_idx: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` -> ``(B, dim)``; the history is ignored (same call as ``RecsysModel.user_vectors``)."""
        return self.users(user_idx.clamp(0, self.spec.n_users - 1)).detach()

    def item_vectors(self) -> torch.Tensor:
        """All item factors ``(n_items, dim)``, row = item_idx."""
        return self.items.weight.detach()


@torch.no_grad()
def train_bpr(
    train: pl.DataFrame, spec: MFSpec, dim: int = 32, epochs: int = 30, batch_size: int = 4096, lr: float = 0.05, l2: float = 1e-4, seed: int = 0,
    max_samples: int = 20_000_000,
) -> tuple[BPRMF, Schedule]:  # fmt: skip
    """BPR-MF on the clicked rows of ``train`` (columns user_idx, item_idx, click), within ``max_samples`` sample steps (``Schedule``).

    Loss per batch: ``-mean(log sigmoid(p_u . (q_i - q_j))) + l2 (|p_u|^2 + |q_i|^2 + |q_j|^2) / B``, one
    uniform negative j per positive; its gradients in closed form, applied by ``RowwiseAdagrad``.
    """
    torch.manual_seed(seed)
    clicked = train.filter(pl.col("click") == 1)
    users = torch.from_numpy(clicked["user_idx"].to_numpy().astype(np.int64))
    positives = torch.from_numpy(clicked["item_idx"].to_numpy().astype(np.int64))
    model = BPRMF(spec, dim)
    user_opt, item_opt = RowwiseAdagrad(model.users.weight, lr), RowwiseAdagrad(model.items.weight, lr)
    schedule = Schedule.fit(len(users), epochs, max_samples)
    for rows in schedule.batches(batch_size, "evaluate: BPR-MF baseline", seed):
        n = len(rows)
        uu, ii, jj = users[rows], positives[rows], torch.randint(1, spec.n_items, (n,))  # uniform negatives over the catalogue
        u, i, j = model.users.weight[uu], model.items.weight[ii], model.items.weight[jj]
        g = (-torch.sigmoid(-(u * (i - j)).sum(-1)) / n).unsqueeze(1)  # d loss / d x of each pair, x = p_u . (q_i - q_j)
        decay = 2 * l2 / n
        user_opt.step(uu, g * (i - j) + decay * u)
        item_opt.step(torch.cat([ii, jj]), torch.cat([g * u + decay * i, -g * u + decay * j]))
    return model.eval(), schedule


class BiasedMF(nn.Module):
    """``rating = mu + b_u + b_i + p_u . q_i`` (unknown ids: their zero-initialised rows).

    Each side is one table ``(n, 1 + dim)``: the bias in column 0, the factors after it.
    """

    def __init__(self, n_users: int, n_items: int, mean: float, dim: int = 16):
        super().__init__()
        self.mean = mean
        self.users = nn.Embedding(n_users, 1 + dim).requires_grad_(False)
        self.items = nn.Embedding(n_items, 1 + dim).requires_grad_(False)
        for table in (self.users, self.items):
            nn.init.normal_(table.weight, std=0.01)
            table.weight[:, 0] = 0.0

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:  # (B,), (B,) -> (B,)
        u = self.users(user_idx.clamp(0, self.users.num_embeddings - 1))
        i = self.items(item_idx.clamp(0, self.items.num_embeddings - 1))
        return self.mean + u[:, 0] + i[:, 0] + (u[:, 1:] * i[:, 1:]).sum(-1)


@torch.no_grad()
def train_rating_mf(
    train: pl.DataFrame, n_users: int, n_items: int, dim: int = 16, epochs: int = 15, batch_size: int = 1024, lr: float = 0.2, l2: float = 0.1, seed: int = 0,
    max_samples: int = 20_000_000,
) -> tuple[BiasedMF, Schedule] | None:  # fmt: skip
    """Biased MF on the rated rows of ``train`` within ``max_samples`` sample steps (``Schedule``); None when nothing is rated.

    Loss per batch: ``mean((r_hat - r)^2) + l2 mean(|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2)``; closed-form
    gradients, ``RowwiseAdagrad``.
    """
    rated = train.filter(pl.col("rating").is_not_null()) if "rating" in train.columns else train.clear()
    if rated.height == 0:
        return None
    torch.manual_seed(seed)
    users = torch.from_numpy(rated["user_idx"].to_numpy().astype(np.int64))
    items = torch.from_numpy(rated["item_idx"].to_numpy().astype(np.int64))
    target = torch.from_numpy(rated["rating"].cast(pl.Float32).to_numpy().copy())
    model = BiasedMF(n_users, n_items, float(target.mean()), dim)
    user_opt, item_opt = RowwiseAdagrad(model.users.weight, lr), RowwiseAdagrad(model.items.weight, lr)
    schedule = Schedule.fit(len(target), epochs, max_samples)
    for rows in schedule.batches(batch_size, "evaluate: biased-MF baseline", seed):
        n = len(rows)
        uu, ii = users[rows].clamp(0, n_users - 1), items[rows].clamp(0, n_items - 1)
        u, i = model.users.weight[uu], model.items.weight[ii]
        error = (2 * (model.mean + u[:, 0] + i[:, 0] + (u[:, 1:] * i[:, 1:]).sum(-1) - target[rows]) / n).unsqueeze(1)
        decay = 2 * l2 / n
        bias = torch.ones(n, 1)
        user_opt.step(uu, error * torch.cat([bias, i[:, 1:]], 1) + decay * u)
        item_opt.step(ii, error * torch.cat([bias, u[:, 1:]], 1) + decay * i)
    return model.eval(), schedule


# -- popularity and item-item baselines --------------------------------------------------


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
        self.row_start, self.known_items = candidates.compressed_rows(known)
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


def item_knn_weights(known: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Cosine item-item similarity of X's columns, each row keeping its ``neighbours`` largest entries -> ``(n_items, n_items)``.

    ``W[i, j] = |U_i & U_j| / sqrt(|U_i| |U_j|)`` (U_i: users who know item i) when j is one of i's
    nearest neighbours, else 0; ``W[i, i] = 0`` (an item is not its own neighbour).
    """
    n_items = known.shape[1]
    norms = torch.sparse.sum(known, dim=0).to_dense().sqrt().clamp_min(1.0)  # (n_items,); items nobody knows have zero rows anyway
    cosine = candidates.gram_matrix(known)
    cosine /= norms[:, None]
    cosine /= norms[None, :]
    cosine.fill_diagonal_(0.0)
    values, columns = torch.topk(cosine, min(neighbours, n_items), dim=1)  # fewer similar items than that: zeros among them
    return cosine.zero_().scatter_(1, columns, values)


def ease_weights(known: torch.Tensor, l2: float) -> torch.Tensor:
    """EASE (``recsys.candidates.ease_weights``) of the known matrix ``X`` -> ``(n_items, n_items)`` float32."""
    return candidates.ease_weights(candidates.gram_matrix(known, torch.float64), l2)
