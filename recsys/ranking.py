"""The second stage, shared by the service and the evaluation: candidates -> ranker -> blended score.

``/recommend`` and ``served.*`` in metrics.json order candidates the same way: the ranker's
heads for each (user, candidate) from the stored item vector and content vector, blended into
one score by the ``[serve]`` weights.
"""

from __future__ import annotations

import torch

from recsys.config import ServeConfig


def blend(predictions: dict[str, torch.Tensor], serve: ServeConfig, rating_range: tuple[float, float]) -> torch.Tensor:
    """Weighted mean of p_click, p_ctcvr, the rating mapped to [0, 1] (heads that are on) and the towers' cosine mapped to [0, 1]. (B,)"""
    lo, hi = rating_range
    terms = [(serve.blend_click, predictions["p_click"])]
    if "retrieval_score" in predictions:
        terms.append((serve.blend_retrieval, (predictions["retrieval_score"] + 1) / 2))
    if "p_ctcvr" in predictions:
        terms.append((serve.blend_ctcvr, predictions["p_ctcvr"]))
    if "rating" in predictions:
        terms.append((serve.blend_rating, (predictions["rating"] - lo) / max(hi - lo, 1e-9)))
    for kind in ("cosine", "ease"):
        if f"item_item_{kind}" in predictions:
            terms.append((serve.item_item_blend(kind), predictions[f"item_item_{kind}"]))
    total = sum(w for w, _ in terms)
    if total <= 0:
        return predictions["p_click"]
    return sum(w * p for w, p in terms) / total


def score_candidates(
    model,
    user: dict[str, torch.Tensor],
    item_idx: torch.Tensor,
    item_vec: torch.Tensor,
    content_vec: torch.Tensor | None,
    serve: ServeConfig,
    cooccurrence: torch.Tensor | None = None,
    item_item: str = "cosine",
    item_first: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Blended scores ``(U, N)`` and head predictions of ``U`` users (``model.user_state`` rows) x their ``N`` candidates each.

    ``item_idx (U, N)``, ``item_vec (U, N, d)``, ``content_vec (U, N, C)`` or None; one user row
    (U = 1) is the service's case. ``cooccurrence (U, N)`` (``recsys.candidates.cooccurrence_feature``
    of a table of kind ``item_item``) joins the blend with ``serve.item_item_blend(item_item)``.
    ``item_first (U, N, model.item_first_width)``: the candidates' ``model.item_first_layer`` rows (the service keeps
    them per item): the same scores without the candidates' id lookups and their share of the first layer.
    """
    users, n = item_idx.shape
    if item_first is not None:
        item = {"item_vec": item_vec.reshape(users * n, -1), "first_layer": item_first.reshape(users * n, -1)}
        prior = model.prior_of(item_idx.reshape(-1))
        if prior is not None:  # the stored vectors carry the popularity prior; the ranker takes it back out
            item["prior"] = prior
    else:
        item = model.item_state(
            item_idx.reshape(-1), item_vec=item_vec.reshape(users * n, -1), content_vec=None if content_vec is None else content_vec.reshape(users * n, -1)
        )
    predictions = model.rank(user, item)  # U users against their n candidates each, grouped by user
    if cooccurrence is not None:
        predictions[f"item_item_{item_item}"] = cooccurrence.reshape(-1)
    scores = blend(predictions, serve, model.spec.rating_range)
    return scores.reshape(users, n), {k: v.reshape(users, n) for k, v in predictions.items()}
