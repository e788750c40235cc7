"""Target attention of a candidate over the user's history (DIN, Zhou et al., KDD 2018).

Each history item's weight comes from a small MLP over ``[h, q, h * q, h - q]`` (the item,
the candidate's query, their product and difference), so the candidate picks out the part of
the history that speaks about it. Padding positions get no weight; an all-padding history
pools to zero.
"""

from __future__ import annotations

import torch
from torch import nn

from recsys.mmoe import mlp


class TargetAttention(nn.Module):
    """``query (B, E)``, ``keys (B or 1, L, E)``, ``mask (B or 1, L)`` -> pooled history ``(B, E)`` and weights ``(B, L)``."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.score = mlp([4 * dim, hidden, 1])

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = query.shape[0], keys.shape[1]
        keys, mask = keys.expand(batch, length, -1), mask.expand(batch, length)  # one user's history against many candidates
        q = query.unsqueeze(1).expand_as(keys)
        logits = self.score(torch.cat([keys, q, keys * q, keys - q], dim=-1)).squeeze(-1)  # (B, L)
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-padding rows: softmax of -inf is nan -> 0
        return (weights.unsqueeze(-1) * keys).sum(1), weights
