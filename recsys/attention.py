"""Target attention of a candidate over the user's history (DIN, Zhou et al., KDD 2018).

The candidate's query weighs each history item, so the candidate picks out the part of the
history that speaks about it. Two scorings (``model.attention``):

- ``mlp`` (``TargetAttention``): DIN's small MLP over ``[h, q, h * q, h - q]`` (the item, the
  query, their product and difference);
- ``dot`` (``DotAttention``): the scaled dot product ``h . q / sqrt(E)``, as in a transformer's
  attention with one head; the query is already a learned projection of the candidate.

Padding positions get no weight; an all-padding history pools to zero. ``make_attention`` builds
the one a config names.
"""

from __future__ import annotations

import torch
from torch import nn


def make_attention(kind: str, dim: int) -> nn.Module:
    """The target attention ``model.attention`` names, over ``dim``-wide history rows."""
    if kind == "mlp":
        return TargetAttention(dim)
    if kind == "dot":
        return DotAttention()
    raise ValueError(f"model.attention: unknown scoring {kind!r} (expected 'mlp' or 'dot')")


def _queries_per_history(query: torch.Tensor, keys: torch.Tensor) -> int:
    """Queries per history: 1 (a history per query), B (one history against every query) or B / G (grouped by user)."""
    batch, groups = query.shape[0], keys.shape[0]
    if groups not in (1, batch) and batch % groups:
        raise ValueError(f"target attention: {batch} queries cannot be grouped over {groups} histories")
    return batch // groups if groups > 1 else batch


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with padding at weight 0; an all-padding row (softmax of -inf is nan) all 0."""
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)


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
        per = _queries_per_history(query, keys)
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
        return _masked_softmax(self.out(torch.relu(hidden)).squeeze(-1), mask)


class DotAttention(nn.Module):
    """``TargetAttention``'s contract with the weights ``softmax(h . q / sqrt(E))`` over the unpadded positions.

    No parameters of its own. With a history per query (training), one autograd function whose
    backward is four batched products over the ``(B, L, E)`` history, the history's gradient
    written once: about a quarter of the MLP scoring's forward and backward time at B 4096, L 20,
    E 64 on one thread. Grouped queries (the service) take batched matrix products.
    """

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, (groups, _, dim) = query.shape[0], keys.shape
        per = _queries_per_history(query, keys)
        if per == 1:
            return _DotAttentionFunction.apply(query, keys, mask)
        q = query.reshape(groups, per, dim)  # (G, n, E)
        weights = _masked_softmax(torch.matmul(q, keys.transpose(1, 2)) * dim**-0.5, mask.unsqueeze(1))  # (G, n, L)
        return torch.matmul(weights, keys).reshape(batch, dim), weights.reshape(batch, -1)


class _DotAttentionFunction(torch.autograd.Function):
    """``query (B, E)``, ``keys (B, L, E)``, ``mask (B, L)`` -> pooled ``(B, E)``, weights ``(B, L)`` (not differentiable)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor):
        scale = keys.shape[-1] ** -0.5
        query = query.to(keys.dtype)  # under autocast the query (a projection) may be bf16, the keys (table rows) fp32
        weights = _masked_softmax(torch.einsum("ble,be->bl", keys, query) * scale, mask)
        pooled = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
        ctx.save_for_backward(query, keys, weights)
        ctx.scale = scale
        ctx.mark_non_differentiable(weights)
        return pooled, weights

    @staticmethod
    def backward(ctx, grad_pooled: torch.Tensor, _grad_weights: torch.Tensor | None):
        query, keys, weights = ctx.saved_tensors
        grad_pooled = grad_pooled.to(keys.dtype).contiguous()  # an expanded gradient (of a sum) would make bmm loop over the batch
        grad_weights = torch.einsum("ble,be->bl", keys, grad_pooled)
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True)) * ctx.scale  # softmax backward; padding stays 0
        grad_query = torch.bmm(grad_logits.unsqueeze(1), keys).squeeze(1)
        # d keys = grad_logits (x) query + weights (x) grad_pooled, both outer products in one batched product
        grad_keys = torch.bmm(torch.stack([grad_logits, weights], dim=-1), torch.stack([query, grad_pooled], dim=1))
        return grad_query, grad_keys, None
