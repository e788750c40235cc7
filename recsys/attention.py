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
    """``query (B, E)``, ``keys (B or 1, L, E)``, ``mask (B or 1, L)`` -> pooled history ``(B, E)`` and weights ``(B, L)``.

    The first layer of the scoring MLP over ``[h, q, h * q, h - q]`` is applied as
    ``h A + q B + (h * q) C`` (the same function: A, B, C absorb the difference term), so no
    ``(B, L, 4E)`` input is ever built: the history side costs two ``(B L, E) x (E, hidden)`` products.
    """

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.key_proj = nn.Linear(dim, hidden)  # h and h - q's share of h
        self.query_proj = nn.Linear(dim, hidden, bias=False)  # q and h - q's share of q
        self.product_proj = nn.Linear(dim, hidden, bias=False)  # h * q
        self.out = nn.Linear(hidden, 1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = query.shape[0], keys.shape[1]
        keys, mask = keys.expand(batch, length, -1), mask.expand(batch, length)  # one user's history against many candidates
        hidden = self.key_proj(keys) + self.query_proj(query).unsqueeze(1) + self.product_proj(keys * query.unsqueeze(1))  # (B, L, hidden)
        logits = self.out(torch.relu(hidden)).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, L)
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-padding rows: softmax of -inf is nan -> 0
        return torch.bmm(weights.unsqueeze(1), keys).squeeze(1), weights
