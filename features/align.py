"""Cross-modal alignment: two linear projections into one space, trained with symmetric InfoNCE.

Fitted on the items that have both a text and an image vector; an item missing one modality
then gets an imputed vector *in that modality's own encoder space*: the softmax-weighted mean
of the observed vectors of that modality whose projections lie nearest to the item's projected
other modality. Imputed vectors go to separate keys (``text_imputed`` / ``image_imputed`` with
their own masks); ``text_mask`` / ``image_mask`` keep meaning "observed".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

MIN_PAIRS = 32  # fewer items with both modalities: no alignment (recorded as skipped)
HOLDOUT_FRACTION = 0.2  # pairs held out to measure recall@10 before the final fit on all pairs


@dataclass(frozen=True)
class AlignConfig:
    dim: int = 64
    epochs: int = 100  # full passes over the pairs
    batch_size: int = 256
    lr: float = 5e-3
    temperature: float = 0.07  # InfoNCE logits and imputation softmax
    seed: int = 0


class Alignment(nn.Module):
    """Text and image projections into a shared unit-sphere space."""

    def __init__(self, text_dim: int, image_dim: int, dim: int):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        self.image_proj = nn.Linear(image_dim, dim, bias=False)

    def project_text(self, text: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text_proj(text), dim=-1)  # (n, dim)

    def project_image(self, image: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_proj(image), dim=-1)  # (n, dim)


def symmetric_infonce(text_z: torch.Tensor, image_z: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean of text->image and image->text cross-entropy over in-batch pairs (row i matches row i)."""
    logits = text_z @ image_z.T / temperature
    target = torch.arange(len(logits))
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def fit_alignment(text: np.ndarray, image: np.ndarray, cfg: AlignConfig = AlignConfig()) -> Alignment:
    """Train the projections on paired rows ``text[i] <-> image[i]``."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = Alignment(text.shape[1], image.shape[1], cfg.dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    text_t, image_t = torch.from_numpy(text).float(), torch.from_numpy(image).float()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(text_t), generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            if len(rows) < 2:
                continue
            loss = symmetric_infonce(model.project_text(text_t[rows]), model.project_image(image_t[rows]), cfg.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def impute(query_z: torch.Tensor, bank_z: torch.Tensor, bank: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax(query . bank_z / T)-weighted mean of ``bank`` rows, L2-normalised: (n_query, bank dim)."""
    weights = torch.softmax(query_z @ bank_z.T / temperature, dim=-1)
    return nn.functional.normalize(weights @ torch.from_numpy(bank).float(), dim=-1).numpy()


def recall_at_k(query_z: torch.Tensor, target_z: torch.Tensor, k: int = 10) -> float:
    """Share of queries whose own row (query i <-> target i) is in the top k targets."""
    top = (query_z @ target_z.T).topk(min(k, len(target_z)), dim=-1).indices
    return float((top == torch.arange(len(query_z))[:, None]).any(dim=-1).float().mean())


def ridge_recall_at_k(text_train: np.ndarray, image_train: np.ndarray, text_test: np.ndarray, image_test: np.ndarray, k: int = 10) -> float:
    """Baseline: closed-form ridge map text -> image space, then cosine retrieval."""
    gram = text_train.T @ text_train + 1e-1 * np.eye(text_train.shape[1])
    mapped = torch.from_numpy(text_test @ np.linalg.solve(gram, text_train.T @ image_train)).float()
    return recall_at_k(nn.functional.normalize(mapped, dim=-1), torch.from_numpy(image_test).float(), k)


def evaluate_alignment(text: np.ndarray, image: np.ndarray, cfg: AlignConfig = AlignConfig()) -> dict[str, Any]:
    """Held-out text->image recall@10: chance, ridge baseline and the InfoNCE projections."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(text))
    n_test = max(2, int(len(text) * HOLDOUT_FRACTION))
    test, train = order[:n_test], order[n_test:]
    model = fit_alignment(text[train], image[train], cfg)
    with torch.no_grad():
        infonce = recall_at_k(model.project_text(torch.from_numpy(text[test])), model.project_image(torch.from_numpy(image[test])))
    return {
        "holdout_pairs": int(n_test),
        "recall@10_chance": round(min(1.0, 10 / n_test), 4),
        "recall@10_ridge": round(ridge_recall_at_k(text[train], image[train], text[test], image[test]), 4),
        "recall@10_infonce": round(infonce, 4),
    }


def align_and_impute(
    text: np.ndarray, text_mask: np.ndarray, image: np.ndarray, image_mask: np.ndarray, cfg: AlignConfig = AlignConfig()
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit on items with both modalities; return imputed-vector tensors (+ masks) and a summary with held-out recall."""
    both = (text_mask == 1) & (image_mask == 1)
    if both.sum() < MIN_PAIRS:
        return {}, {"skipped": f"only {int(both.sum())} items have both text and image (need {MIN_PAIRS})"}
    summary = evaluate_alignment(text[both], image[both], cfg)
    model = fit_alignment(text[both], image[both], cfg)
    tensors: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for target, source, target_mask, source_mask, project_source, project_target in (
            ("image", text, image_mask, text_mask, model.project_text, model.project_image),
            ("text", image, text_mask, image_mask, model.project_image, model.project_text),
        ):
            bank = (image if target == "image" else text)[target_mask == 1]
            rows = np.flatnonzero((target_mask == 0) & (source_mask == 1))  # target absent, other modality observed
            imputed = np.zeros_like(image if target == "image" else text)
            if len(rows):
                query = project_source(torch.from_numpy(source[rows]))
                imputed[rows] = impute(query, project_target(torch.from_numpy(bank)), bank, cfg.temperature)
            tensors[f"{target}_imputed"] = imputed
            tensors[f"{target}_imputed_mask"] = np.isin(np.arange(len(imputed)), rows).astype(np.uint8)
            summary[f"{target}_imputed"] = int(len(rows))
    summary["pairs"] = int(both.sum())
    return tensors, summary
