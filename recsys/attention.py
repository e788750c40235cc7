"""Target attention of a candidate over the user's history (DIN, Zhou et al., KDD 2018).

Each history item's weight comes from a small MLP over ``[h, q, h * q, h - q]`` (the item,
the candidate's query, their product and difference), so the candidate picks out the part of
the history that speaks about it. Padding positions get no weight; an all-padding history
pools to zero.
"""

from __future__ import annotations

import torch
from torch import nn


class TargetAttention(nn.Module):
    """``query (B, E)``, ``keys (G, L, E)``, ``mask (G, L)`` -> pooled history ``(B, E)`` and weights ``(B, L)``.

    ``G`` is B (a history per query), 1 (one history against every query) or a divisor of B: G
    users with B / G candidates each, the queries grouped by user (user 0's first). The grouped
    form never copies a history per candidate, and projects each history once.

    The first layer of the scoring MLP over ``[h, q, h * q, h - q]`` is applied as
    ``h A + q B + (h * q) C`` (the same function: A, B, C absorb the difference term), so no
    ``(B, L, 4E)`` input is ever built.
    """

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.key_proj = nn.Linear(dim, hidden)  # h and h - q's share of h
        self.query_proj = nn.Linear(dim, hidden, bias=False)  # q and h - q's share of q
        self.product_proj = nn.Linear(dim, hidden, bias=False)  # h * q
        self.out = nn.Linear(hidden, 1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, (groups, length, dim) = query.shape[0], keys.shape
        if groups not in (1, batch) and batch % groups:
            raise ValueError(f"TargetAttention: {batch} queries cannot be grouped over {groups} histories")
        per = batch // groups if groups > 1 else batch  # queries per history
        if per == 1:  # a history per query (training): (B, L, .) tensors, and the pooling as a weighted sum, not B tiny (1 x L)(L x E) products
            hidden = self.key_proj(keys) + self.query_proj(query).unsqueeze(1) + self.product_proj(keys * query.unsqueeze(1))  # (B, L, hidden)
            weights = self._weights(hidden, mask)  # (B, L)
            return (weights.unsqueeze(-1) * keys).sum(1), weights
        q = query.reshape(groups, per, dim)  # (G, n, E)
        # (h * q) C = q (diag(h) C): per history one (n, E) x (E, L hidden) product, no (G, n, L, E) tensor of products
        width = self.product_proj.out_features
        per_key = (keys.unsqueeze(-1) * self.product_proj.weight.T).transpose(1, 2).reshape(groups, dim, length * width)  # (G, E, L hidden)
        product = torch.matmul(q, per_key).reshape(groups, per, length, width)
        hidden = product + self.key_proj(keys).unsqueeze(1) + self.query_proj(q).unsqueeze(2)  # (G, n, L, hidden)
        weights = self._weights(hidden, mask.unsqueeze(1))  # (G, n, L)
        pooled = torch.matmul(weights, keys)  # (G, n, L) x (G, L, E)
        return pooled.reshape(batch, dim), weights.reshape(batch, length)

    def _weights(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.out(torch.relu(hidden)).squeeze(-1).masked_fill(~mask, float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-padding rows: softmax of -inf is nan -> 0
