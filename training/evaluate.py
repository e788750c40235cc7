"""The evaluation step (``recsys evaluate``): score the test split, compute metrics.json, write the report.

Reads RUN/data (test rows, train/valid positives), RUN/content (item text/image embeddings),
RUN/model and RUN/index/index.json. Writes RUN/predictions/test.parquet, RUN/metrics.json
(keys fixed by DESIGN.md, plus extra sections the report reads) and RUN/report.{html,md}.
The full-catalogue retrieval protocol behind ``retrieval.*`` lives in ``training.retrieval``; the
baselines of ``baselines.*`` and ``baseline_mf`` (``training.baseline``) are ranked with the same one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from recsys import metrics as m
from recsys.config import EvalConfig, ServeConfig
from recsys.errors import RunError
from recsys.history import RaggedHistory, mean_content
from recsys.model import RecsysModel, catalogue_states, load_model
from recsys.candidates import DENSE_SCORES, ItemNeighbours, KnownItems, cooccurrence_feature, item_item_wanted, item_neighbours, merge_sources, merge_sources_sparse
from recsys.ranking import score_candidates
from recsys.rundir import RunDir, read_json, write_json, write_parquet
from training import baseline, report
from training.data import history_content_sums
from training.retrieval import RetrievalResult, known_clicks, mean_over_users, rank_catalogue, retrieval_section

log = logging.getLogger("recsys")

BATCH_ROWS = 4096  # test rows scored per forward pass
LEVEL = 0.9  # bootstrap interval level
ACTIVITY_BUCKETS = ((0, 0), (1, 4), (5, 19), (20, None))  # history length at the event (inclusive bounds)
PROBABILITY_HEADS = {"click": ("p_click", "click"), "conversion": ("p_cvr", "conversion"), "ctcvr": ("p_ctcvr", "ctcvr")}


@dataclass(frozen=True)
class Content:
    """Item content tensors indexed by item_idx (None where a modality is off or absent)."""

    text: torch.Tensor | None
    text_mask: torch.Tensor | None
    image: torch.Tensor | None
    image_mask: torch.Tensor | None


def evaluate(run: RunDir, compare: list[Path] | None = None) -> dict[str, Any]:
    """Score RUN/data/test.parquet, write predictions, metrics.json and the report; returns the metrics."""
    started = time.perf_counter()
    run_cfg = run.config()  # read once: eval and serve sections
    cfg = run_cfg.eval
    data_meta = read_json(run.require(run.data / "meta.json", "prepare"))
    test = pl.read_parquet(run.require(run.data / "test.parquet", "prepare"))
    report.load_compare(compare)  # fail before the work when a comparison run has no metrics.json
    model = load_model(run.require(run.model, "train"))
    check_vocabularies(run, model, data_meta)
    tasks = [t for t in model.tasks if data_meta["tasks"].get(t, False)]
    content = load_content(run, model)

    scores, mean_gates = score_rows(model, test, content)
    write_parquet(predictions_frame(test, scores), run.predictions / "test.parquet")

    labels = task_labels(test, tasks)
    metrics_out: dict[str, Any] = row_metrics(labels, scores)  # the task sections, over all test rows
    item_vecs, content_vecs = all_item_states(model, content)
    retrieval = rank_catalogue(run, model, item_vecs, test, cfg, content_vecs=content_vecs)
    metrics_out["retrieval"] = retrieval_section(retrieval, cfg.ks)
    serve = run_cfg.serve
    neighbours, propose = served_sources(known_clicks(run), model.spec.n_items, serve)
    rerank = served_reranker(model, item_vecs, content_vecs, serve, neighbours)
    served = rank_catalogue(run, model, item_vecs, test, cfg, rerank=rerank, candidates=serve.candidates, content_vecs=content_vecs, propose=propose)
    metrics_out["served"] = retrieval_section(served, cfg.ks)
    if not data_meta.get("impressions", True):
        label_sampled_aucs(metrics_out)
    spec = baseline.MFSpec(model.spec.n_users, model.spec.n_items, model.spec.history_len)
    bpr = bpr_retrieval(run, spec, test, cfg) if cfg.baseline_mf or "bpr_mf" in cfg.baselines else None  # trained once for both sections
    if cfg.baseline_mf:
        metrics_out["baseline_mf"] = baseline_mf(run, spec, test, bpr, cfg.baseline_max_samples)
        metrics_out["baseline_training"] = {"bpr_mf": bpr["training"]} | ({"rating_mf": metrics_out["baseline_mf"].pop("training")} if "training" in metrics_out["baseline_mf"] else {})
    if cfg.baselines:
        metrics_out["baselines"] = baselines(run, spec, test, cfg, retrieval.item_popularity, bpr)
    ann = _ann_recall(run)
    if ann is not None:
        metrics_out["ann"] = {"recall@100": ann}

    user_ids = test["user_idx"].to_numpy()
    metrics_out["intervals"] = intervals(labels, scores, user_ids, retrieval, cfg)
    metrics_out["beyond_accuracy"] = beyond_accuracy(retrieval, cfg.ks, data_meta["n_items"] - 1)
    metrics_out["group_auc"] = group_aucs(labels, scores, user_ids)
    metrics_out["calibration"] = calibration(labels, scores)
    if "rating" in labels:
        metrics_out["rating_distribution"] = rating_distribution(labels["rating"], scores["rating"], data_meta.get("rating_range", [1.0, 5.0]))
        center, slope = model.spec.rating_calibration
        if slope != 1.0:  # the rating head's calibration (training.calibration), fitted on valid
            fit = read_json(run.model / "model.json").get("rating_calibration_fit", {})
            metrics_out["rating_calibration"] = {"center": center, "slope": slope, **{k: fit[k] for k in ("valid_rows", "valid_rmse_before", "valid_rmse_after") if k in fit}}
    metrics_out["slices"] = slices(run, test, labels, scores, retrieval, cfg)
    metrics_out["gates"] = {"ranker": model.spec.config.ranker, "tasks": list(model.tasks), "weights": mean_gates.tolist()}
    if model.has_prior:  # the towers' score includes beta log(1 + clicks) (training.prior), as in the index
        prior = read_json(run.model / "model.json").get("popularity_prior", {})
        metrics_out["retrieval_prior"] = {"beta": prior.get("beta"), "chosen_on": prior.get("chosen_on")}
    objective = (read_json(run.summary_path).get("train", {}) if run.summary_path.is_file() else {}).get("retrieval_objective")
    if objective:  # what the towers were trained with (training.epochs.RetrievalObjective.describe), for the report
        metrics_out["retrieval_objective"] = objective
    metrics_out["counts"] = {
        "test_rows": test.height,
        "retrieval_users": int(retrieval.user_idx.size),
        "retrieval_users_eligible": retrieval.users_eligible,
        "retrieval_users_without_relevant": retrieval.users_without_relevant,
        "catalogue_items": data_meta["n_items"] - 1,
    }
    metrics_out = _finite_or_none(metrics_out)
    write_json(run.metrics_path, metrics_out)
    report.write_report(run, metrics_out, compare)

    summary = {
        "test_rows": test.height,
        "retrieval_users": int(retrieval.user_idx.size),
        "tasks": tasks,
        "seconds": round(time.perf_counter() - started, 2),
    }
    run.record("evaluate", summary)
    log.info("evaluate: %s", {k: v for k, v in metrics_out.items() if k in ("click", "conversion", "ctcvr", "rating", "retrieval", "ann")})
    return metrics_out


def label_sampled_aucs(metrics_out: dict[str, Any]) -> None:
    """Data without impressions: click and ctcvr negatives were sampled by prepare; ``auc_sampled`` says so (``auc`` kept as it was)."""
    for task in ("click", "ctcvr"):
        if task in metrics_out:
            metrics_out[task]["auc_sampled"] = metrics_out[task]["auc"]


def baseline_rows(run: RunDir) -> pl.DataFrame:
    """The train rows the factorisation baselines read: ids and labels only (not the histories, 8 x history_len bytes a row)."""
    path = run.data / "train.parquet"
    names = pl.scan_parquet(path).collect_schema().names()
    return pl.read_parquet(path, columns=[c for c in ("user_idx", "item_idx", "click", "rating") if c in names])


def bpr_retrieval(run: RunDir, spec: baseline.MFSpec, test: pl.DataFrame, cfg: EvalConfig) -> dict[str, Any]:
    """BPR-MF trained on the train split and ranked with the model's protocol: ``{"retrieval": ..., "seconds": ...}``."""
    started = time.perf_counter()
    bpr, schedule = baseline.train_bpr(baseline_rows(run), spec, max_samples=cfg.baseline_max_samples)
    ranking = rank_catalogue(run, bpr, bpr.item_vectors(), test, cfg)
    return {"retrieval": retrieval_section(ranking, cfg.ks), "training": schedule.summary(), "seconds": round(time.perf_counter() - started, 2)}


def baseline_mf(run: RunDir, spec: baseline.MFSpec, test: pl.DataFrame, bpr: dict[str, Any], max_samples: int) -> dict[str, Any]:
    """metrics.json ``baseline_mf``: BPR-MF retrieval (``bpr_retrieval``) and biased-MF ratings, scored like the model."""
    started = time.perf_counter()
    out: dict[str, Any] = {"retrieval": bpr["retrieval"]}
    train_rows = baseline_rows(run)
    fitted = baseline.train_rating_mf(train_rows, spec.n_users, spec.n_items, max_samples=max_samples) if "rating" in test.columns else None
    if fitted is not None:
        rating_mf, schedule = fitted
        out["training"] = schedule.summary()  # popped into metrics.json "baseline_training": baseline_mf keeps its keys (DESIGN.md)
        rated = test.filter(pl.col("rating").is_not_null())
        with torch.no_grad():
            predicted = rating_mf(torch.from_numpy(rated["user_idx"].to_numpy().copy()), torch.from_numpy(rated["item_idx"].to_numpy().copy())).numpy()
        true = rated["rating"].cast(pl.Float64).to_numpy()
        out["rating"] = {"rmse": m.rmse(true, predicted), "mae": m.mae(true, predicted)}
    out["seconds"] = round(bpr["seconds"] + time.perf_counter() - started, 2)
    return out


def baselines(
    run: RunDir, spec: baseline.MFSpec, test: pl.DataFrame, cfg: EvalConfig, popularity: np.ndarray, bpr: dict[str, Any] | None
) -> dict[str, Any]:
    """metrics.json ``baselines``: each of ``eval.baselines`` ranked by ``rank_catalogue`` (same users, exclusions, relevance).

    ``popularity`` is the protocol's clicked-train-rows count per item_idx (``RetrievalResult.item_popularity``);
    ``bpr`` the BPR-MF result already computed for ``baseline_mf`` (trained here when None). item_knn and
    EASE are fitted on, and score users from, the protocol's known clicks (train + valid).
    """
    n_catalogue = spec.n_items - 1
    max_items = {"item_knn": ("eval.knn_max_items", cfg.knn_max_items), "ease": ("eval.ease_max_items", cfg.ease_max_items)}  # dense item x item
    known: torch.Tensor | None = None
    out: dict[str, Any] = {}
    for name in cfg.baselines:
        started = time.perf_counter()
        if name in max_items and n_catalogue > max_items[name][1]:
            key, limit = max_items[name]
            out[name] = {"skipped": f"catalogue of {n_catalogue} items > {key} = {limit}"}
            continue
        if name == "bpr_mf":
            out[name] = bpr if bpr is not None else bpr_retrieval(run, spec, test, cfg)
            continue
        if name == "most_popular":
            scorer: baseline.MostPopular | baseline.ItemItem = baseline.MostPopular(spec, popularity)
        else:
            if known is None:
                known = baseline.known_matrix(known_clicks(run), spec.n_users, spec.n_items)  # the protocol's own known clicks
            weights = baseline.item_knn_weights(known, cfg.knn_neighbours) if name == "item_knn" else baseline.ease_weights(known, cfg.ease_lambda)
            scorer = baseline.ItemItem(spec, known, weights)
        ranking = rank_catalogue(run, scorer, scorer.item_vectors(), test, cfg)
        out[name] = {"retrieval": retrieval_section(ranking, cfg.ks), "seconds": round(time.perf_counter() - started, 2)}
        log.info("evaluate: baseline %s recall@%d %.4f (%.1f s)", name, slice_k(cfg.ks), out[name]["retrieval"][f"recall@{slice_k(cfg.ks)}"], out[name]["seconds"])
    return out


# -- inputs ------------------------------------------------------------------------------
def load_content(run: RunDir, model: RecsysModel) -> Content:
    """RUN/content/embeddings.safetensors for the modalities the model uses; None (model stand-in) otherwise."""
    path = run.content / "embeddings.safetensors"
    tensors = load_file(str(path)) if path.is_file() else {}
    if not tensors and (model.use_text or model.use_image):
        log.warning("evaluate: %s is missing: items are scored without text/image (run `recsys embed --run %s`)", path, run.root)

    def modality(name: str, used: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not used or name not in tensors:
            return None, None
        return tensors[name].float(), tensors[f"{name}_mask"].float()

    text, text_mask = modality("text", model.use_text)
    image, image_mask = modality("image", model.use_image)
    return Content(text, text_mask, image, image_mask)


def content_masks(run: RunDir) -> dict[str, np.ndarray]:
    """``text_mask`` / ``image_mask`` (n_items,) from RUN/content, for whichever modality was embedded."""
    path = run.content / "embeddings.safetensors"
    if not path.is_file():
        return {}
    tensors = load_file(str(path))
    return {name: tensors[name].numpy().astype(bool) for name in ("text_mask", "image_mask") if name in tensors}


def _item_content(content: Content, item_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Content rows for a batch of item indices (only the modalities present)."""
    out: dict[str, torch.Tensor] = {}
    for name in ("text", "text_mask", "image", "image_mask"):
        tensor = getattr(content, name)
        if tensor is not None:
            out[name] = tensor[item_idx]
    return out


# -- scoring -----------------------------------------------------------------------------
@torch.inference_mode()
def score_rows(model: RecsysModel, test: pl.DataFrame, content: Content) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every head's score for every test row, and the ranker's gate weights averaged over rows (T, E)."""
    user_idx = torch.from_numpy(test["user_idx"].to_numpy().astype(np.int64))
    item_idx = torch.from_numpy(test["item_idx"].to_numpy().astype(np.int64))
    history = RaggedHistory.from_column(test["history"], model.spec.history_len, longer="error")  # padded per batch, as the training batches
    heads = ["p_click"] + (["p_cvr", "p_ctcvr"] if "conversion" in model.tasks else []) + (["rating"] if "rating" in model.tasks else [])
    chunks: dict[str, list[torch.Tensor]] = {h: [] for h in heads}
    gate_sum: torch.Tensor | None = None
    for start in tqdm(range(0, test.height, BATCH_ROWS), desc="evaluate: scoring test rows", leave=False):
        rows = slice(start, start + BATCH_ROWS)
        batch = {"user_idx": user_idx[rows], "item_idx": item_idx[rows], "history": history[rows], **_item_content(content, item_idx[rows])}
        batch.update(history_content_sums(batch["history"], _item_content(content, slice(None))))
        out = model(batch)
        for head in heads:
            chunks[head].append(out[head].float())
        batch_gates = out["gates"].float().sum(dim=0)  # (T, E)
        gate_sum = batch_gates if gate_sum is None else gate_sum + batch_gates
    scores = {h: torch.cat(c).numpy() if c else np.zeros(0, np.float32) for h, c in chunks.items()}
    mean_gates = (gate_sum / max(test.height, 1)).numpy() if gate_sum is not None else np.zeros((len(model.tasks), 0))
    return scores, mean_gates


@torch.inference_mode()
def all_item_states(model: RecsysModel, content: Content, n_items: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Item-tower vectors ``(n_items, d)`` and the ranker's content vectors ``(n_items, C)`` (None without content); row 0 is padding.

    ``n_items``: the catalogue's size, the model's own by default; larger for a model scored on a
    grown catalogue (``training.gate``), whose items beyond its tables go through the cold path (content only).
    """
    present = {name: getattr(content, name) for name in ("text", "text_mask", "image", "image_mask") if getattr(content, name) is not None}
    return catalogue_states(model, torch.arange(model.spec.n_items if n_items is None else n_items), present, BATCH_ROWS)


def all_item_vectors(model: RecsysModel, content: Content) -> torch.Tensor:
    """Item-tower vectors for item_idx 0..n_items-1 (row 0 is padding and never ranked) -> (n_items, d)."""
    return all_item_states(model, content)[0]


@dataclass(frozen=True)
class ItemItemSource:
    """The co-occurrence source of the evaluation: the table and every user's known items it reads (train + valid clicks)."""

    neighbours: ItemNeighbours
    known: KnownItems


def served_reranker(
    model: RecsysModel, item_vecs: torch.Tensor, content_vecs: torch.Tensor | None, serve: ServeConfig, neighbours: ItemItemSource | None = None, users_per_step: int = 64
):
    """The service's second stage for ``rank_catalogue``: each user's candidates ordered by the blended ranker score."""

    def rerank(user_idx: torch.Tensor, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        ordered = torch.empty_like(candidates)
        for start in range(0, len(user_idx), users_per_step):
            rows = slice(start, start + users_per_step)
            user = model.user_state(user_idx[rows], history[rows], mean_content(content_vecs, history[rows]))
            cand = candidates[rows]
            cooccurrence = None
            kind = "cosine" if neighbours is None else neighbours.neighbours.kind
            if neighbours is not None and serve.item_item_blend(kind) > 0:
                cooccurrence = cooccurrence_feature(neighbours.neighbours, neighbours.known.batch(user_idx[rows]), cand)
            scores, _ = score_candidates(model, user, cand, item_vecs[cand], None if content_vecs is None else content_vecs[cand], serve, cooccurrence, kind)
            ordered[rows] = cand.gather(1, torch.argsort(scores, dim=1, descending=True, stable=True))
        return ordered

    return rerank


def served_sources(known: pl.DataFrame, n_items: int, serve: ServeConfig) -> tuple[ItemItemSource | None, Any]:
    """The service's other candidate sources for ``rank_catalogue``, from train + valid clicks only (``known``).

    Returns the co-occurrence source (None when neither its quota nor its blend weight is on) and
    the proposer that adds the co-occurrence and popular quotas to the towers' candidates (None when both are 0).
    A user's co-occurrence scores read their known clicks (``serve.cooccurrence_recent`` distinct items, 0 = all),
    as the service reads the stored, live and request clicks: not the towers' ``history_len`` window.
    """
    wanted = item_item_wanted(n_items, serve)
    ordered = known.sort(["user_idx", "timestamp"], maintain_order=True)
    neighbours = None
    if wanted:
        users, items = ordered["user_idx"].to_numpy(), ordered["item_idx"].to_numpy()
        n_users = int(users.max()) + 1 if len(users) else 1
        neighbours = ItemItemSource(item_neighbours(users, items, n_items, serve), KnownItems(users, items, n_users, serve.cooccurrence_recent))
    if serve.cooccurrence_candidates == 0 and serve.popular_candidates == 0:
        return neighbours, None
    popularity = torch.from_numpy(np.bincount(known["item_idx"].to_numpy(), minlength=n_items)[:n_items])
    popularity[0] = 0

    by_clicks = np.lexsort((np.arange(n_items), -popularity.numpy()))  # item_idx, most clicked first (ties: lower item_idx)
    popular_order = by_clicks[popularity.numpy()[by_clicks] > 0]

    def propose(user_idx: torch.Tensor, history: torch.Tensor, found: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The towers' ``found`` columns plus the other sources' quotas; ``rows`` / ``cols``: the excluded (row, column) pairs."""
        towers = torch.where(found >= 0, found + 1, found)  # column j = item_idx j + 1
        recent = neighbours.known.batch(user_idx) if serve.cooccurrence_candidates else None
        if n_items <= DENSE_SCORES:  # one (users, n_items) pass for the block
            excluded = torch.zeros(len(user_idx), n_items, dtype=torch.bool)
            excluded[:, 0] = True  # item 0 is never proposed
            excluded[rows, cols + 1] = True
            scores = neighbours.neighbours.scores(recent) if recent is not None else None
            merged, _ = merge_sources(towers, excluded, scores, serve.cooccurrence_candidates, popularity, serve.popular_candidates)
        else:  # user by user, as the service: no (users, n_items) matrices
            source = neighbours.neighbours if recent is not None else None
            merged, _ = merge_sources_sparse(towers, rows, cols + 1, source, recent, serve.cooccurrence_candidates, popular_order, serve.popular_candidates)
        return torch.where(merged >= 0, merged - 1, merged)

    return neighbours, propose


def predictions_frame(test: pl.DataFrame, scores: dict[str, np.ndarray]) -> pl.DataFrame:
    """RUN/predictions/test.parquet: one row per test row, columns of absent heads left out."""
    names = {"p_click": "p_click", "p_cvr": "p_conversion", "p_ctcvr": "p_ctcvr", "rating": "rating_pred"}
    return test.select("user_id", "item_id", "timestamp").with_columns(
        [pl.Series(names[h], scores[h].astype(np.float32)) for h in names if h in scores]
    )


def task_labels(test: pl.DataFrame, tasks: list[str]) -> dict[str, np.ndarray]:
    """Label arrays over all test rows: click, conversion (0 where not clicked), ctcvr, rating (nan where unrated)."""
    click = test["click"].to_numpy().astype(np.float64)
    labels = {"click": click}
    if "conversion" in tasks:
        labels["conversion"] = test["conversion"].fill_null(0).to_numpy().astype(np.float64)
        labels["ctcvr"] = click * labels["conversion"]
    if "rating" in tasks:
        labels["rating"] = test["rating"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    return labels


# -- headline metrics --------------------------------------------------------------------
def row_metrics(labels: dict[str, np.ndarray], scores: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """The DESIGN.md ranking/rating metrics over ``rows`` (a boolean mask or row indices; all rows when None)."""
    if rows is not None:
        labels = {name: values[rows] for name, values in labels.items()}
        scores = {name: values[rows] for name, values in scores.items()}
    click = labels["click"]
    out: dict[str, dict[str, float]] = {"click": {"auc": m.auc(click, scores["p_click"]), "logloss": m.logloss(click, scores["p_click"])}}
    if "conversion" in labels:
        clicked = click > 0.5
        out["conversion"] = {"auc": m.auc(labels["conversion"][clicked], scores["p_cvr"][clicked])}
        out["ctcvr"] = {"auc": m.auc(labels["ctcvr"], scores["p_ctcvr"])}
    if "rating" in labels:
        rated = np.isfinite(labels["rating"])
        true, predicted = labels["rating"][rated], scores["rating"][rated]
        out["rating"] = {"rmse": m.rmse(true, predicted), "mae": m.mae(true, predicted)}
    return out


def intervals(
    labels: dict[str, np.ndarray], scores: dict[str, np.ndarray], user_ids: np.ndarray, retrieval: RetrievalResult, cfg: EvalConfig
) -> dict[str, Any]:
    """Percentile bootstrap intervals (users resampled) for every headline metric."""
    out: dict[str, Any] = {"level": LEVEL, "resamples": cfg.bootstrap, "unit": "user"}
    if cfg.bootstrap <= 0 or user_ids.size == 0:
        return out
    rows = m.bootstrap_intervals(
        lambda idx: _flatten(row_metrics(labels, scores, idx)), user_ids.size, groups=user_ids, n_boot=cfg.bootstrap, level=LEVEL, seed=0
    )
    users = m.bootstrap_intervals(
        lambda idx: {f"retrieval.{name}": mean_over_users(v[idx]) for name, v in retrieval.per_user.items()},
        retrieval.user_idx.size,
        n_boot=cfg.bootstrap,
        level=LEVEL,
        seed=0,
    ) if retrieval.user_idx.size else {}
    return out | {name: list(bounds) for name, bounds in (rows | users).items()}


def group_aucs(labels: dict[str, np.ndarray], scores: dict[str, np.ndarray], user_ids: np.ndarray) -> dict[str, Any]:
    """Per-user AUC weighted by impressions (users with one class skipped)."""
    out: dict[str, Any] = {}
    gauc, users = m.group_auc(labels["click"], scores["p_click"], user_ids)
    out["click"] = {"gauc": gauc, "users": users}
    if "ctcvr" in labels:
        gauc, users = m.group_auc(labels["ctcvr"], scores["p_ctcvr"], user_ids)
        out["ctcvr"] = {"gauc": gauc, "users": users}
    return out


def calibration(labels: dict[str, np.ndarray], scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """ECE and reliability bins per probability head (conversion over clicked rows)."""
    out: dict[str, Any] = {}
    clicked = labels["click"] > 0.5
    for task, (head, label) in PROBABILITY_HEADS.items():
        if label not in labels:
            continue
        rows = clicked if task == "conversion" else np.ones_like(clicked)
        y, p = labels[label][rows], scores[head][rows]
        bins = m.reliability_bins(y, p)
        out[task] = {
            "ece": m.expected_calibration_error(y, p),
            "mean_pred": float(p.mean()) if p.size else None,
            "observed": float(y.mean()) if y.size else None,
            "bins": {k: v.tolist() for k, v in bins.items()},
        }
    return out


def rating_distribution(true: np.ndarray, predicted: np.ndarray, rating_range: list[float]) -> dict[str, Any]:
    """Histograms of true and predicted ratings over rated rows (same edges)."""
    rated = np.isfinite(true)
    lo, hi = float(rating_range[0]), float(rating_range[1])
    edges = np.linspace(lo - 0.25, hi + 0.25, int(round((hi - lo) * 4)) + 3)  # quarter-star bins around whole stars
    return {
        "edges": edges.tolist(),
        "true": np.histogram(true[rated], edges)[0].tolist(),
        "predicted": np.histogram(predicted[rated], edges)[0].tolist(),
        "true_mean": float(true[rated].mean()) if rated.any() else None,
        "predicted_mean": float(predicted[rated].mean()) if rated.any() else None,
        "predicted_std": float(predicted[rated].std()) if rated.any() else None,
        "true_std": float(true[rated].std()) if rated.any() else None,
    }


# -- retrieval beyond accuracy ------------------------------------------------------------
def beyond_accuracy(retrieval: RetrievalResult, ks: tuple[int, ...], n_catalogue: int) -> dict[str, Any]:
    """Hit rate, MRR, catalogue coverage and popularity bias of the top-K lists."""
    out: dict[str, Any] = {}
    for k in ks:
        top = retrieval.top_items[:, :k] - 1  # catalogue columns; -1 = nothing eligible
        bias = m.popularity_bias(top, retrieval.item_popularity[1:])
        out[f"hit_rate@{k}"] = mean_over_users(retrieval.per_user[f"hit_rate@{k}"])
        out[f"mrr@{k}"] = mean_over_users(retrieval.per_user[f"mrr@{k}"])
        out[f"coverage@{k}"] = m.catalogue_coverage(top, n_catalogue)
        out[f"gini@{k}"] = bias["gini"]
        out[f"mean_log_popularity@{k}"] = bias["mean_log_popularity"]
    out["catalogue_mean_log_popularity"] = float(np.log1p(retrieval.item_popularity[1:]).mean())
    return out


# -- slices ------------------------------------------------------------------------------
def slice_k(ks: tuple[int, ...]) -> int:
    """The one K the slice tables use: 20 when configured, else the largest."""
    return 20 if 20 in ks else max(ks)


def slices(
    run: RunDir, test: pl.DataFrame, labels: dict[str, np.ndarray], scores: dict[str, np.ndarray], retrieval: RetrievalResult, cfg: EvalConfig
) -> dict[str, Any]:
    """Every metric per slice with its row count: cold/warm items, missing text/image, users by activity."""
    k = slice_k(cfg.ks)
    item_idx = test["item_idx"].to_numpy()
    train_path = run.data / "train.parquet"
    train = pl.read_parquet(train_path, columns=[c for c in ("item_idx", "sampled") if c in pl.read_parquet_schema(train_path)])
    real = train.filter(~pl.col("sampled")) if "sampled" in train.columns else train  # sampled negatives were never shown
    seen = np.zeros(retrieval.item_popularity.size, dtype=bool)
    seen[real["item_idx"].to_numpy()] = True
    item_slices: dict[str, dict[str, np.ndarray]] = {"items": {"warm (in train)": seen, "cold (not in train)": ~seen}}
    masks = content_masks(run)
    for modality in ("text", "image"):
        if f"{modality}_mask" in masks:
            present = masks[f"{modality}_mask"]
            item_slices[modality] = {f"with {modality}": present, f"missing {modality}": ~present}

    out: dict[str, Any] = {"recall_k": k}
    for family, groups in item_slices.items():
        out[family] = {}
        for name, item_in_slice in groups.items():
            rows = item_in_slice[item_idx]
            pairs = item_in_slice[retrieval.pair_item_idx]
            entry: dict[str, Any] = {"rows": int(rows.sum()), **_flatten(row_metrics(labels, scores, rows))}
            entry["relevant_pairs"] = int(pairs.sum())
            entry[f"retrieval.recall@{k}"] = float((retrieval.pair_ranks[pairs] < k).mean()) if pairs.any() else None
            out[family][name] = entry

    row_history = test["history"].list.len().fill_null(0).to_numpy()
    out["user_activity"] = {}
    for lo, hi in ACTIVITY_BUCKETS:
        name = f"history {lo}-{hi}" if hi is not None else f"history {lo}+"
        if hi == lo:
            name = f"history {lo}"
        rows = (row_history >= lo) & (row_history <= (hi if hi is not None else np.iinfo(np.int64).max))
        users = (retrieval.user_history_len >= lo) & (retrieval.user_history_len <= (hi if hi is not None else np.iinfo(np.int64).max))
        entry = {"rows": int(rows.sum()), **_flatten(row_metrics(labels, scores, rows)), "users": int(users.sum())}
        entry[f"retrieval.recall@{k}"] = mean_over_users(retrieval.per_user[f"recall@{k}"][users]) if users.any() else None
        out["user_activity"][name] = entry
    return out


# -- helpers -----------------------------------------------------------------------------
def check_vocabularies(run: RunDir, model: RecsysModel, data_meta: dict[str, Any]) -> None:
    """The model's id tables must match RUN/data's vocabularies, else its rows mean other users/items."""
    for key in ("n_users", "n_items"):
        if getattr(model.spec, key) != data_meta[key]:
            raise RunError(
                f"{run.model / 'model.json'} has {key}={getattr(model.spec, key)} but {run.data / 'meta.json'} has "
                f"{key}={data_meta[key]}: the model was trained on other data; run `recsys train --run {run.root}` again"
            )


def _ann_recall(run: RunDir) -> float | None:
    """``ann_recall@100`` from RUN/index/index.json, when the index step measured it."""
    path = run.index / "index.json"
    if not path.is_file():
        return None
    value = read_json(path).get("ann_recall@100")
    return float(value) if value is not None else None


def _flatten(nested: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{task}.{name}": value for task, values in nested.items() for name, value in values.items()}


def _finite_or_none(obj: Any) -> Any:
    """nan/inf -> None, so metrics.json is strict JSON (null = undefined, e.g. a single-class AUC)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
