"""Plain matrix-factorisation baselines, trained in seconds on the train split (``eval.baseline_mf``).

- Retrieval: BPR-MF (Rendle et al., UAI 2009) on the train split's clicked (user, item) pairs,
  one uniformly sampled negative item per positive. Its factors rank the catalogue with the
  same protocol as the model's towers (``training.retrieval.rank_catalogue``).
- Rating: biased MF, ``mu + b_u + b_i + p_u . q_i``, least squares on the rated train rows.

No content, no history, no side features: what ids alone give, as a yardstick for the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn


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
