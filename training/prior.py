"""The towers' popularity prior (``model.popularity_prior``): chosen on the valid split after training, kept in RUN/model.

Retrieval scores ``u . v (+ b) + beta log(1 + clicks of the item)``: the prior is the last coordinate
of the item vectors (``[v, b + prior]`` against ``[u, 1]``, ``recsys.model``), so the index, the
evaluation and the service all rank with it and items added live (no clicks) get 0. The ranker's
input keeps the trained score (``RecsysModel._rank`` takes the prior back out).

Why after training, and how it is chosen: the softmax the towers train with corrects for
popularity (log-q), yet a full ranking of the catalogue rewards some of it back; how much depends
on the data. With ``"valid"`` every beta of ``model.popularity_prior_grid`` is scored by the towers'
recall@K (``train.selection_recall_k``) on the valid split measured the way test is measured
(``training.retrieval.rank_catalogue`` with train clicks as the known data: each user's state at
the end of train, train items excluded, the user's clicked valid items relevant; at most
``train.selection_recall_rows`` users, a seeded sample), with click counts of train only; the best
beta wins (ties: the smaller). Nothing of the test split is read.

The deployed prior counts the clicks of train + valid, the data the test rows and the service see.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.config import Config
from recsys.model import RecsysModel, load_model, model_state_dict, resave_model
from recsys.rundir import RunDir
from training.evaluate import all_item_states, load_content
from training.retrieval import known_clicks, rank_catalogue, retrieval_section

log = logging.getLogger("recsys.training")


def click_counts(known: pl.DataFrame, n_items: int) -> torch.Tensor:
    """Clicked rows per item_idx ``(n_items,)`` of ``known`` (``training.retrieval.known_clicks`` rows)."""
    return torch.from_numpy(np.bincount(known["item_idx"].to_numpy(), minlength=n_items)[:n_items].astype(np.int64))


def log_click_counts(known: pl.DataFrame, n_items: int) -> torch.Tensor:
    """``log(1 + click_counts)`` as float32, row 0 (padding) 0: the prior per unit of beta."""
    out = torch.log1p(click_counts(known, n_items).float())
    out[0] = 0.0
    return out


@torch.inference_mode()
def choose_prior(run: RunDir, cfg: Config) -> dict[str, Any] | None:
    """beta for RUN/model's towers (module docstring): ``{"beta", "chosen_on", ...}``; None with ``model.popularity_prior = "off"``."""
    setting = cfg.model.popularity_prior
    if setting == "off":
        return None
    if setting != "valid":
        return {"beta": float(setting), "chosen_on": "config"}
    if not (run.data / "valid.parquet").is_file():
        log.warning("model.popularity_prior = \"valid\": no valid split, so no prior (beta 0)")
        return {"beta": 0.0, "chosen_on": "no valid split: none"}
    k = cfg.train.selection_recall_k
    scores, users = valid_recall_by_beta(run, load_model(run.model), cfg, cfg.model.popularity_prior_grid)
    finite = {b: s for b, s in scores.items() if np.isfinite(s)}
    if not finite:
        log.warning("model.popularity_prior = \"valid\": no valid user has a clicked item outside train, so no prior (beta 0)")
        return {"beta": 0.0, "chosen_on": "valid: no valid user to measure", f"valid_recall@{k}": scores}
    best = max(finite, key=lambda b: (finite[b], -float(b)))
    log.info("popularity prior: beta %s chosen on valid (recall@%d %.4f; beta 0: %.4f)", best, k, finite[best], finite.get("0.0", float("nan")))
    return {"beta": float(best), "chosen_on": "valid", f"valid_recall@{k}": scores, "valid_users": users}


@torch.inference_mode()
def valid_recall_by_beta(run: RunDir, model, cfg: Config, betas) -> tuple[dict[str, float], int]:
    """The towers' valid recall@K measured like test (module docstring) for each beta (keys ``repr(beta)``) and the users measured.

    ``model``'s own prior is replaced by each beta in turn (on ``train`` click counts); it is left at 0.
    """
    n_items, k = model.spec.n_items, cfg.train.selection_recall_k
    train = known_clicks(run).filter(pl.col("split") == "train")
    if model.has_prior:
        model.set_popularity_prior(0.0, torch.zeros(n_items))  # the trained score alone
    elif any(beta != 0 for beta in betas):
        raise ValueError("valid_recall_by_beta: a model without a prior coordinate measures beta 0 only")
    item_vecs, content_vecs = all_item_states(model, load_content(run, model))
    log_clicks = log_click_counts(train, n_items)
    valid = pl.read_parquet(run.data / "valid.parquet", columns=["user_idx", "item_idx", "click"])
    protocol = cfg.eval.model_copy(update={"ks": (k,), "exclude": "train_valid", "max_eval_users": cfg.train.selection_recall_rows})
    scores: dict[str, float] = {}
    users = 0
    for beta in sorted(set(betas)):
        vectors = item_vecs.clone()
        if beta:
            vectors[:, -1] += beta * log_clicks
        result = rank_catalogue(run, model, vectors, valid, protocol, content_vecs=content_vecs, known=train)
        scores[repr(float(beta))] = retrieval_section(result, (k,))[f"recall@{k}"]
        users = len(result.user_idx)
        log.debug("popularity prior beta %g: valid recall@%d %.4f (%d users)", beta, k, scores[repr(float(beta))], users)
    return scores, users


def apply_prior(run: RunDir, choice: dict[str, Any]) -> None:
    """Set RUN/model's prior to ``choice["beta"]`` times log(1 + train + valid clicks) and record the choice in ``model.json``."""
    model = load_model(run.model)
    counts = click_counts(known_clicks(run), model.spec.n_items)
    model.set_popularity_prior(choice["beta"], counts)
    resave_model(model, run.model, {"popularity_prior": {**choice, "counts": "clicks of train + valid"}})
    log.info("popularity prior beta %g set in %s", choice["beta"], run.model)


def user_state_recall(run: RunDir, model, cfg: Config) -> float | None:
    """``train.selection_recall = "user_state"``: the towers' valid recall@K measured like test (no prior), for model selection each epoch."""
    if not (run.data / "valid.parquet").is_file() or cfg.train.selection_recall_rows <= 0:
        return None
    plain = RecsysModel(model.spec)  # a plain copy: the training job's fused table kernels do not run under inference mode
    plain.load_state_dict(model_state_dict(model), strict=True)
    value = valid_recall_by_beta(run, plain.eval(), cfg, [0.0])[0]["0.0"]
    return value if np.isfinite(value) else None
