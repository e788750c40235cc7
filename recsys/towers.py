"""The two towers of the retrieval model: both end in an L2-normalised d-vector.

Each tower owns its per-id feature values and the rules for which table rows an id reads
(``lookup``); the tables themselves live in ``RecsysModel`` so one EmbeddingBagCollection
serves both towers and can be fused and sharded as a whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys.mmoe import mlp


class UserTower(nn.Module):
    """``[user id emb | pooled history emb | history content | user feature embs | numeric features] -> MLP -> d``.

    Users outside the vocabulary (newer than the model) read row 0 (unknown). The history bag
    holds only items with a trained id row (``ItemTower.trained_ids``); the history content
    (``content_dim > 0``: the mean of the history items' content vectors, see
    ``RecsysModel.history_content``) holds every item, so a history of cold or newly added
    items still says something about the user.
    """

    def __init__(self, n_users: int, cat_keys: list[str], n_numeric: int, embedding_dim: int, dim: int, content_dim: int = 0, bias: bool = False):
        super().__init__()
        self.n_users, self.cat_keys, self.content_dim, self.bias = n_users, list(cat_keys), content_dim, bias
        self.register_buffer("cat_values", torch.zeros(n_users, len(self.cat_keys), dtype=torch.int64))  # row = user_idx
        self.register_buffer("num_values", torch.zeros(n_users, n_numeric))
        self.mlp = mlp([embedding_dim * (2 + len(self.cat_keys)) + content_dim + n_numeric, 2 * dim, dim])

    def known(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(torch.int64)
        return torch.where((idx > 0) & (idx < self.n_users), idx, torch.zeros_like(idx))

    def lookup(self, users: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{feature: (B, 1)}`` for the model's KJT: the user id and each categorical feature."""
        return {"user_id": users.unsqueeze(1), **{key: self.cat_values[users, j : j + 1] for j, key in enumerate(self.cat_keys)}}

    def forward(self, pooled: dict[str, torch.Tensor], users: torch.Tensor, history_content: torch.Tensor | None = None) -> torch.Tensor:
        """``pooled {feature: (B, embedding_dim)}``, ``users (B,)`` known, ``history_content (B, content_dim)`` -> ``(B, d)``, L2-normalised.

        With ``bias``: ``(B, d + 1)``, the unit vector and a constant 1, the coordinate that meets the item's bias.
        """
        parts = [pooled["user_id"], pooled["history"], *(pooled[k] for k in self.cat_keys), self.num_values[users]]
        if self.content_dim:
            parts.insert(2, history_content)
        vec = F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)
        return torch.cat([vec, torch.ones_like(vec[:, :1])], dim=-1) if self.bias else vec


class ItemTower(nn.Module):
    """An item's vector, the whole story in one place.

    1. **Id.** The item's row of the ``item`` table, except for items without training
       interactions (cold, or added at serving time), whose row was never trained: they look up
       row 0 (unknown) and rely on their content. In training, id dropout hides the id of a share
       of rows, so the content parts learn to carry an item alone.
    2. **Categorical side features.** A value that no trained item has (a creation time, a brand
       of one) is looked up as 0, never as an untrained random row.
    3. **Content.** Text and image embeddings, each projected to d; a modality whose mask is 0
       (missing, or dropped by modality dropout in training) is replaced by a learned stand-in.
    4. **Fusion.** ``concat`` concatenates the id, text and image vectors; ``gated`` mixes them
       with softmax gates computed from all of them; an MLP and an L2 norm give the d-vector.
    5. **Bias** (``bias``). A linear map of the fused vector gives one more coordinate, the item's
       retrieval bias ``b``: ``[v, b]`` against the user's ``[u, 1]`` scores ``u . v + b``, so how
       often an item is wanted need not take up a direction of the unit vectors. Cold items get
       the bias of their content (the id dropout above trains that path).

    The tables themselves live in the model's one ``EmbeddingBagCollection`` (so it can be
    fused and sharded as a whole): ``lookup`` says which rows to read, ``forward`` combines them.
    """

    def __init__(
        self,
        n_items: int,
        cat_keys: list[str],
        n_numeric: int,
        embedding_dim: int,
        text_dim: int,
        image_dim: int,
        dim: int,
        fusion: str = "concat",
        modality_dropout: float = 0.0,
        id_dropout: float = 0.0,
        bias: bool = False,
    ):
        super().__init__()
        self.n_items, self.cat_keys = n_items, list(cat_keys)
        self.fusion, self.modality_dropout, self.id_dropout = fusion, modality_dropout, id_dropout
        # Per-item feature values (row = item_idx) and which items have training interactions.
        self.register_buffer("cat_values", torch.zeros(n_items, len(self.cat_keys), dtype=torch.int64))
        self.register_buffer("num_values", torch.zeros(n_items, n_numeric))
        self.register_buffer("trained", torch.ones(n_items, dtype=torch.bool))
        self.id_proj = nn.Linear(embedding_dim * (1 + len(self.cat_keys)) + n_numeric, dim)
        self.text_proj = nn.Linear(text_dim, dim) if text_dim > 0 else None
        self.image_proj = nn.Linear(image_dim, dim) if image_dim > 0 else None
        self.text_standin = nn.Parameter(torch.zeros(dim)) if text_dim > 0 else None
        self.image_standin = nn.Parameter(torch.zeros(dim)) if image_dim > 0 else None
        n_modalities = 1 + (text_dim > 0) + (image_dim > 0)
        self.gate = nn.Linear(n_modalities * dim, n_modalities) if fusion == "gated" else None
        self.mlp = mlp([dim if fusion == "gated" else n_modalities * dim, 2 * dim, dim])
        self.bias = nn.Linear(dim if fusion == "gated" else n_modalities * dim, 1) if bias else None
        if self.bias is not None:  # starts as no bias at all
            nn.init.zeros_(self.bias.weight)
            nn.init.zeros_(self.bias.bias)

    # -- 1, 2: which table rows an item reads -----------------------------------------------
    def known(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices outside the vocabulary (ids newer than the model) become 0 = unknown."""
        idx = idx.to(torch.int64)
        return torch.where((idx > 0) & (idx < self.n_items), idx, torch.zeros_like(idx))

    def trained_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Item indices whose id row was never trained become 0 (dropped from a bag); any shape."""
        idx = self.known(idx)
        return torch.where(self.trained[idx], idx, torch.zeros_like(idx))

    def id_lookup(self, items: torch.Tensor) -> torch.Tensor:
        """``(B,)`` -> the item-id rows to read: untrained ids -> unknown; in training, id dropout hides some."""
        ids = self.trained_ids(items)
        if self.training and self.id_dropout > 0:
            ids = torch.where(torch.rand(ids.shape) < self.id_dropout, torch.zeros_like(ids), ids)
        return ids

    def categorical_lookup(self, items: torch.Tensor) -> torch.Tensor:
        """``(B,)`` -> ``(B, C)`` categorical values; values that no trained item has become 0 (unknown)."""
        values = self.cat_values[items]
        seen = torch.stack([torch.isin(values[:, j], self.cat_values[self.trained, j]) for j in range(len(self.cat_keys))], dim=1) if self.cat_keys else values.bool()
        return torch.where(seen, values, torch.zeros_like(values))

    def lookup(self, items: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{feature: (B, 1)}`` for the model's KJT: the item id and each categorical side feature."""
        features = {"item_id": self.id_lookup(items).unsqueeze(1)}
        categorical = self.categorical_lookup(items)
        features.update({key: categorical[:, j : j + 1] for j, key in enumerate(self.cat_keys)})
        return features

    @torch.no_grad()
    def set_trained(self, item_idx: torch.Tensor) -> None:
        """Mark which items have training interactions (the rest use the unknown id row)."""
        self.trained.zero_()
        self.trained[0] = True
        self.trained[self.known(item_idx)] = True

    # -- 3, 4: content and fusion ---------------------------------------------------------------
    def _modality(self, proj: nn.Linear, standin: torch.Tensor, content: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        present = mask.bool()
        if self.training and self.modality_dropout > 0:
            present = present & (torch.rand(present.shape, device=present.device) >= self.modality_dropout)
        return torch.where(present.unsqueeze(-1), proj(content), standin)  # (B, d)

    def forward(
        self,
        pooled: dict[str, torch.Tensor],  # {feature: (B, embedding_dim)} from the tables, for the keys of ``lookup``
        items: torch.Tensor,  # (B,) item_idx, already ``known``
        text: torch.Tensor | None = None,  # (B, text_dim)
        text_mask: torch.Tensor | None = None,  # (B,)
        image: torch.Tensor | None = None,  # (B, image_dim)
        image_mask: torch.Tensor | None = None,  # (B,)
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """-> item vectors (B, d), L2-normalised (with ``bias``: (B, d + 1), the bias last); for gated fusion the modality gates (B, M); the content vectors [(B, d)] (text, image: projected or stand-in)."""
        batch = items.shape[0]
        id_part = torch.cat([pooled["item_id"], *(pooled[k] for k in self.cat_keys), self.num_values[items]], dim=-1)
        vectors = [self.id_proj(id_part)]
        if self.text_proj is not None:
            if text is None:  # no content given: every item takes the stand-in
                text, text_mask = torch.zeros(batch, self.text_proj.in_features), torch.zeros(batch)
            vectors.append(self._modality(self.text_proj, self.text_standin, text, text_mask))
        if self.image_proj is not None:
            if image is None:
                image, image_mask = torch.zeros(batch, self.image_proj.in_features), torch.zeros(batch)
            vectors.append(self._modality(self.image_proj, self.image_standin, image, image_mask))
        if self.gate is not None:
            stacked = torch.stack(vectors, dim=1)  # (B, M, d)
            gates = torch.softmax(self.gate(stacked.flatten(1)), dim=-1)  # (B, M)
            fused = (gates.unsqueeze(-1) * stacked).sum(1)
        else:
            gates, fused = None, torch.cat(vectors, dim=-1)
        vec = F.normalize(self.mlp(fused), dim=-1)
        if self.bias is not None:
            vec = torch.cat([vec, self.bias(fused)], dim=-1)
        return vec, gates, vectors[1:]
