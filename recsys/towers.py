"""The two towers of the retrieval model: both end in an L2-normalised d-vector.

They receive already-pooled TorchRec embeddings (the tables live in ``RecsysModel`` so one
EmbeddingBagCollection serves both towers and can be sharded as a whole).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys.mmoe import mlp


class UserTower(nn.Module):
    """``[user id emb | pooled history emb | user feature embs | numeric features] -> MLP -> d``."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = mlp([in_dim, 2 * dim, dim])

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, d)
        return F.normalize(self.mlp(features), dim=-1)


class ItemTower(nn.Module):
    """Id part, projected text and projected image -> fused -> d.

    A modality whose mask is 0 (missing, or dropped by modality dropout in training) is
    replaced by a learned stand-in vector, so the masked content never reaches the output.
    ``fusion="concat"`` concatenates the modality vectors; ``"gated"`` mixes them with
    softmax gates computed from all of them.
    """

    def __init__(self, id_in_dim: int, text_dim: int, image_dim: int, dim: int, fusion: str = "concat", modality_dropout: float = 0.0):
        super().__init__()
        self.fusion = fusion
        self.modality_dropout = modality_dropout
        self.id_proj = nn.Linear(id_in_dim, dim)
        self.text_proj = nn.Linear(text_dim, dim) if text_dim > 0 else None
        self.image_proj = nn.Linear(image_dim, dim) if image_dim > 0 else None
        self.text_standin = nn.Parameter(torch.zeros(dim)) if text_dim > 0 else None
        self.image_standin = nn.Parameter(torch.zeros(dim)) if image_dim > 0 else None
        n_modalities = 1 + (text_dim > 0) + (image_dim > 0)
        self.gate = nn.Linear(n_modalities * dim, n_modalities) if fusion == "gated" else None
        self.mlp = mlp([dim if fusion == "gated" else n_modalities * dim, 2 * dim, dim])

    def _modality(self, proj: nn.Linear, standin: torch.Tensor, content: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        present = mask.bool()
        if self.training and self.modality_dropout > 0:
            present = present & (torch.rand(present.shape, device=present.device) >= self.modality_dropout)
        return torch.where(present.unsqueeze(-1), proj(content), standin)  # (B, d)

    def forward(
        self,
        id_features: torch.Tensor,  # (B, id_in_dim)
        text: torch.Tensor | None = None,  # (B, text_dim)
        text_mask: torch.Tensor | None = None,  # (B,)
        image: torch.Tensor | None = None,  # (B, image_dim)
        image_mask: torch.Tensor | None = None,  # (B,)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> item vectors (B, d) and, for gated fusion, the modality gates (B, M)."""
        vectors = [self.id_proj(id_features)]
        if self.text_proj is not None:
            vectors.append(self._modality(self.text_proj, self.text_standin, text, text_mask))
        if self.image_proj is not None:
            vectors.append(self._modality(self.image_proj, self.image_standin, image, image_mask))
        if self.gate is not None:
            stacked = torch.stack(vectors, dim=1)  # (B, M, d)
            gates = torch.softmax(self.gate(stacked.flatten(1)), dim=-1)  # (B, M)
            fused = (gates.unsqueeze(-1) * stacked).sum(1)
        else:
            gates, fused = None, torch.cat(vectors, dim=-1)
        return F.normalize(self.mlp(fused), dim=-1), gates
