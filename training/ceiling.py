"""A data-limited ceiling for the synthetic tests: per-user regressions on the generator's true item attributes.

The oracle (``truth.parquet``) scores with every user's true latent, which no learner has: it
must infer each user from their train rows. This ceiling knows the item side exactly and
learns only the users, from the train rows alone, so what it misses of the oracle is what the
data cannot tell. A model that has to read items from text, image and ids, and users from the
same rows, should not beat it by more than noise.

- Given, per item (``truth_items.parquet``, ``item_features``): the latent ``v`` (topic, hue
  and texture and the id-only residual that ids and interactions reveal), the texture
  (one-hot), the quality, the log price and the popularity. With ``item_latent=False`` the
  attributes that text and image show stand in for the latent: topic (one-hot), hue on the
  colour wheel (cos, sin) - the ceiling for a model that cannot learn the residual.
- Learnt, per user: weights on those features for each head, ``logit = x_i . (b + d_u)``
  (click on every row, conversion on the clicked rows: logistic; rating on the rated rows:
  linear, Gaussian), ``p_ctcvr = p_click * p_cvr``. This is the generator's form: an affinity
  ``w . (u * v)`` is linear in ``v`` with weights ``u * w``, the texture taste is a per-user
  weight on the texture, and price, quality, popularity, age and the user biases are
  (per-user) linear terms; only the rating, ``1 + 4 sigmoid(.)`` there, is approximated.
- Fitted as an empirical-Bayes hierarchical model: the shared ``b`` of each head by a
  logistic (linear) regression on all its rows; the user offsets ``d_u`` of all heads
  together, with the Gaussian prior ``N(0, S)`` whose covariance ``S`` is learnt from the
  train rows (Laplace EM: each step one batched Newton step of every user's MAP, then
  ``S = mean_u(d d^T + H_u^-1)``). ``S`` couples the heads, as one user latent drives every
  task in the generator: a user's many click rows inform their few conversion rows.

The decoded ceiling (``decode_attributes``): the same learner, with the two attributes that only the
content shows (the texture from the image, the quality from the text) replaced by what a linear
probe reads of them from the run's encoder vectors (out-of-fold ridge regressions on the items). What
the true-attribute ceiling has over it is what the encoders lose (or a linear read of them misses); what
it has over the model is what the model leaves of what its inputs show.

Not used: users.parquet (region, age). A model that reads the region (a fifth of the user
latent's variance is regional) can gain a little over this ceiling on users with few rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import polars as pl
import torch

from features.synth import TEXTURES, TOPICS
from recsys.errors import DataError

EM_ITERATIONS = 30  # Laplace-EM steps of the prior covariance (the efficiencies settle by about 30)
FINAL_NEWTON_STEPS = 5  # Newton steps of the users' MAP under the final prior
GLOBAL_L2 = 1e-3  # ridge of the shared weights: only keeps collinear one-hots solvable
INITIAL_PRECISION = 10.0  # the prior precision EM starts from (S = I / 10)
COVARIANCE_FLOOR = 1e-4  # added to S's diagonal so that it stays invertible
PROBE_RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # ridge weights (per row, on standardised encoder dimensions) of the content probes


@dataclass(frozen=True)
class CeilingHead:
    """One head: ``score = x . (global_weights + user_offsets[user])``, a logit or a rating."""

    global_weights: np.ndarray  # (F,)
    user_offsets: np.ndarray  # (U, F); rows of users without rows of this head follow from the prior's coupling
    logistic: bool


@dataclass(frozen=True)
class Ceiling:
    feature_names: tuple[str, ...]  # (F,) column order of the features and the weights
    items: pl.DataFrame  # item_id, features: Array[f64, F]
    user_ids: pl.Series  # row u of every head's user_offsets
    click: CeilingHead
    conversion: CeilingHead
    rating: CeilingHead | None  # None without rated train rows
    prior_covariance: np.ndarray  # (H F, H F): the learnt S over the heads' user offsets, in head order

    def user_weights(self, head: str, user_id: str) -> dict[str, float]:
        """A user's total weights (global + offset) of ``head`` by feature name; the global ones for an unknown user."""
        fitted: CeilingHead = getattr(self, head)
        row = self.user_ids.index_of(user_id)
        weights = fitted.global_weights + (fitted.user_offsets[row] if row is not None else 0.0)
        return dict(zip(self.feature_names, weights.tolist()))


def item_features(truth_items: pl.DataFrame, item_latent: bool = True) -> tuple[pl.DataFrame, tuple[str, ...]]:
    """``(item_id, features: Array[f64, F])`` from the generator's item attributes, and the F names (see the module doc)."""
    needed = ("item_id", "texture", "quality", "price", "popularity", *(("latent",) if item_latent else ("topic", "hue")))
    missing = [c for c in needed if c not in truth_items.columns]
    if missing:
        raise DataError(f"ceiling: truth_items lacks {missing} (has {truth_items.columns}); regenerate it with `recsys data synth`")
    log_price = np.log(truth_items["price"].to_numpy())
    columns = {"intercept": np.ones(truth_items.height)}
    if item_latent:
        latent = np.stack(truth_items["latent"].to_numpy()).astype(np.float64)  # (I, d)
        columns |= {f"latent{k}": latent[:, k] for k in range(latent.shape[1])}
    else:
        columns |= {f"topic={t}": (truth_items["topic"] == t).cast(pl.Float64).to_numpy() for t in TOPICS}
        angle = 2 * np.pi * truth_items["hue"].to_numpy()
        columns |= {"hue_cos": np.cos(angle), "hue_sin": np.sin(angle)}
    if "texture_scores" in truth_items.columns:  # decoded from the image (decode_attributes): one probe score per texture
        scores = np.stack(truth_items["texture_scores"].to_numpy()).astype(np.float64)
        columns |= {f"texture~{t}": scores[:, k] for k, t in enumerate(TEXTURES)}
    else:
        columns |= {f"texture={t}": (truth_items["texture"] == t).cast(pl.Float64).to_numpy() for t in TEXTURES}
    columns |= {
        "quality": truth_items["quality"].to_numpy(),
        "log_price": (log_price - log_price.mean()) / max(float(log_price.std()), 1e-9),
        "popularity": truth_items["popularity"].to_numpy(),
    }
    return pl.DataFrame({"item_id": truth_items["item_id"], "features": np.stack(list(columns.values()), axis=1)}), tuple(columns)


@dataclass(frozen=True)
class Probe:
    """How well the encoders show the content-only attributes (out-of-fold, over the items with that modality)."""

    quality_r2: float  # R^2 of the text probe's quality (nan without text)
    texture_accuracy: float  # share of items whose largest image-probe score is their texture (nan without images)


def _ridge_out_of_fold(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold predictions of ``y`` (n, k) from ``x`` (n, d), each fold by ridge on the others; the ridge
    weight of PROBE_RIDGE_GRID with the best out-of-fold squared error (a mild optimism of the probe, said in the doc)."""
    fold = np.random.default_rng(seed).permutation(len(x)) % folds
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-9)
    best, best_error = np.zeros_like(y), np.inf
    for ridge in PROBE_RIDGE_GRID:
        predicted = np.zeros_like(y)
        for k in range(folds):
            fit, held = fold != k, fold == k
            mean = y[fit].mean(0)
            gram = x[fit].T @ x[fit] + ridge * len(x[fit]) * np.eye(x.shape[1])
            predicted[held] = x[held] @ np.linalg.solve(gram, x[fit].T @ (y[fit] - mean)) + mean
        error = float(((predicted - y) ** 2).sum())
        if error < best_error:
            best, best_error = predicted, error
    return best


def decode_attributes(truth_items: pl.DataFrame, text: np.ndarray | None, image: np.ndarray | None, folds: int = 5, seed: int = 0) -> tuple[pl.DataFrame, Probe]:
    """``truth_items`` with ``quality`` as a probe reads it from ``text`` and ``texture_scores`` from ``image``.

    ``text`` / ``image``: ``(I, d)`` encoder vectors in ``truth_items``' row order, NaN rows for items
    without that modality (or None: the attribute is invisible, decoded as its mean). Each item's
    decoded value comes from a ridge fitted on the other folds' items, so no item's own label is read.
    """
    quality = truth_items["quality"].to_numpy().astype(np.float64)
    textures = np.stack([(truth_items["texture"] == t).to_numpy() for t in TEXTURES], axis=1).astype(np.float64)
    decoded_quality = np.full(len(quality), quality.mean())
    decoded_texture = np.tile(textures.mean(0), (len(quality), 1))
    r2 = accuracy = float("nan")
    if text is not None and (seen := np.isfinite(text).all(1)).sum() >= 2 * folds:
        decoded_quality[seen] = _ridge_out_of_fold(text[seen], quality[seen, None], folds, seed)[:, 0]
        r2 = float(1 - ((decoded_quality[seen] - quality[seen]) ** 2).sum() / max(((quality[seen] - quality[seen].mean()) ** 2).sum(), 1e-12))
    if image is not None and (seen := np.isfinite(image).all(1)).sum() >= 2 * folds:
        decoded_texture[seen] = _ridge_out_of_fold(image[seen], textures[seen], folds, seed)
        accuracy = float((decoded_texture[seen].argmax(1) == textures[seen].argmax(1)).mean())
    decoded = truth_items.with_columns(pl.Series("quality", decoded_quality), pl.Series("texture_scores", decoded_texture, dtype=pl.Array(pl.Float64, len(TEXTURES))))
    return decoded, Probe(r2, accuracy)


def fit_ceiling(rows: pl.DataFrame, truth_items: pl.DataFrame, item_latent: bool = True) -> Ceiling:
    """Fit the heads on the train rows of ``rows`` (user_id, item_id, click, conversion[, rating]).

    With a ``split`` column only its train rows (``"train"`` or code 0) are read, and prepared
    rows' sampled negatives are dropped; without one every row is a train row.
    """
    train = _train_rows(rows)
    items, names = item_features(truth_items, item_latent)
    user_ids = train["user_id"].unique().sort()
    user, item = _indices(train, items, user_ids)
    x = torch.from_numpy(np.stack(items["features"].to_numpy()))  # (I, F)
    clicked = train["click"].to_numpy() > 0
    if not clicked.any():
        raise DataError("ceiling: no clicked train rows, so nothing to learn conversion from")
    heads = {
        "click": _HeadRows(user, item, train["click"].cast(pl.Float64).to_numpy(writable=True), logistic=True),
        "conversion": _HeadRows(user, item, train["conversion"].fill_null(0).cast(pl.Float64).to_numpy(writable=True), logistic=True)[clicked],
    }
    if "rating" in train.columns and train["rating"].is_not_null().any():
        rated = train["rating"].is_not_null().to_numpy()
        heads["rating"] = _HeadRows(user, item, train["rating"].cast(pl.Float64).fill_null(0.0).to_numpy(writable=True), logistic=False)[rated]
    with _one_thread():
        fitted, covariance = _fit_users(x, list(heads.values()), len(user_ids))
    by_name = dict(zip(heads, fitted))
    return Ceiling(names, items, user_ids, by_name["click"], by_name["conversion"], by_name.get("rating"), covariance.numpy())


def ceiling_scores(ceiling: Ceiling, rows: pl.DataFrame) -> dict[str, np.ndarray]:
    """``p_click``, ``p_cvr``, ``p_ctcvr`` and ``rating`` (nan without a rating head) per row; reads only user_id and item_id."""
    user, item = _indices(rows, ceiling.items, ceiling.user_ids)
    x = np.stack(ceiling.items["features"].to_numpy())[item]  # (n, F)
    known = user >= 0  # a user without train rows gets the global weights

    def score(head: CeilingHead) -> np.ndarray:
        offsets = np.where(known[:, None], head.user_offsets[np.maximum(user, 0)], 0.0)
        return np.einsum("nf,nf->n", x, head.global_weights + offsets)

    p_click, p_cvr = _sigmoid(score(ceiling.click)), _sigmoid(score(ceiling.conversion))
    rating = score(ceiling.rating) if ceiling.rating is not None else np.full(rows.height, np.nan)
    return {"p_click": p_click, "p_cvr": p_cvr, "p_ctcvr": p_click * p_cvr, "rating": rating}


@dataclass(frozen=True)
class _HeadRows:
    """The rows of one head: user and item indices and the target."""

    user: np.ndarray  # (n,) int64
    item: np.ndarray  # (n,) int64
    target: np.ndarray  # (n,) float64
    logistic: bool

    def __getitem__(self, keep: np.ndarray) -> _HeadRows:
        return _HeadRows(self.user[keep], self.item[keep], self.target[keep], self.logistic)

    def cells(self, n_users: int, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and target sum per (user, item), ``(U, I)`` each: all a head's sums need, as features depend on the item only."""
        flat = torch.from_numpy(self.user * n_items + self.item)
        count = torch.zeros(n_users * n_items, dtype=torch.float64).index_add_(0, flat, torch.ones(len(flat), dtype=torch.float64))
        total = torch.zeros(n_users * n_items, dtype=torch.float64).index_add_(0, flat, torch.from_numpy(self.target))
        return count.view(n_users, n_items), total.view(n_users, n_items)


def _train_rows(rows: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in ("user_id", "item_id", "click", "conversion") if c not in rows.columns]
    if missing:
        raise DataError(f"ceiling: rows lack {missing} (have {rows.columns})")
    if "split" in rows.columns:
        rows = rows.filter(pl.col("split") == ("train" if rows.schema["split"] == pl.String else 0))
    if "sampled" in rows.columns:
        rows = rows.filter(~pl.col("sampled"))
    if rows.height == 0:
        raise DataError("ceiling: no train rows to fit")
    return rows


def _indices(rows: pl.DataFrame, items: pl.DataFrame, user_ids: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the user's position in ``user_ids`` (-1: absent) and the item's row in ``items``."""
    users = pl.DataFrame({"user_id": user_ids, "user": pl.int_range(len(user_ids), dtype=pl.Int64, eager=True)})
    item_rows = pl.DataFrame({"item_id": items["item_id"], "item": pl.int_range(items.height, dtype=pl.Int64, eager=True)})
    joined = rows.select("user_id", "item_id").join(item_rows, on="item_id", how="left", maintain_order="left")
    joined = joined.join(users, on="user_id", how="left", maintain_order="left")
    if joined["item"].null_count():
        unknown = joined.filter(pl.col("item").is_null())["item_id"].unique().head(5).to_list()
        raise DataError(f"ceiling: {joined['item'].null_count()} rows name items missing from truth_items, e.g. {unknown}")
    return joined["user"].fill_null(-1).to_numpy(writable=True), joined["item"].to_numpy(writable=True)


def _fit_users(x: torch.Tensor, heads: list[_HeadRows], n_users: int) -> tuple[list[CeilingHead], torch.Tensor]:
    """Shared weights per head, then every user's offsets of all heads under the learnt prior (module doc)."""
    n_features, n_heads = x.shape[1], len(heads)
    bases, noise, cells = [], [], []
    for head in heads:
        base, residual_variance = _shared_fit(x, head)
        bases.append(base)
        noise.append(1.0 if head.logistic else residual_variance)  # a rating row weighs 1 / its noise variance
        cells.append(head.cells(n_users, len(x)))
    outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), -1)  # (I, F*F)

    def newton(offsets: torch.Tensor, precision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One Newton step of every user's MAP; returns the new offsets and the Cholesky factor of the posterior precision."""
        gradient = offsets @ precision  # (U, H F)
        hessian = precision.expand(n_users, -1, -1).clone()  # (U, H F, H F)
        for h, (head, base, (count, total)) in enumerate(zip(heads, bases, cells)):
            block = slice(h * n_features, (h + 1) * n_features)
            eta = x @ base + offsets[:, block] @ x.T  # (U, I)
            if head.logistic:
                p = torch.sigmoid(eta)
                residual, curvature = count * p - total, count * (p * (1 - p)).clamp_min(1e-6)
            else:
                residual, curvature = count * eta - total, count
            gradient[:, block] += residual @ x / noise[h]
            hessian[:, block, block] += (curvature @ outer).view(n_users, n_features, n_features) / noise[h]
        factor = torch.linalg.cholesky(hessian)
        return offsets - torch.cholesky_solve(gradient.unsqueeze(-1), factor).squeeze(-1), factor

    size = n_heads * n_features
    offsets = torch.zeros(n_users, size, dtype=x.dtype)
    precision = INITIAL_PRECISION * torch.eye(size, dtype=x.dtype)
    for _ in range(EM_ITERATIONS):
        offsets, factor = newton(offsets, precision)
        posterior = torch.cholesky_inverse(factor)  # (U, H F, H F), at the step's start: close enough for EM
        covariance = (offsets[:, :, None] * offsets[:, None, :] + posterior).mean(0) + COVARIANCE_FLOOR * torch.eye(size, dtype=x.dtype)
        precision = torch.linalg.inv(covariance)
    for _ in range(FINAL_NEWTON_STEPS):
        offsets, _ = newton(offsets, precision)
    fitted = [
        CeilingHead(base.numpy(), offsets[:, h * n_features : (h + 1) * n_features].numpy().copy(), head.logistic)
        for h, (head, base) in enumerate(zip(heads, bases))
    ]
    return fitted, covariance


def _shared_fit(x: torch.Tensor, head: _HeadRows, steps: int = 12) -> tuple[torch.Tensor, float]:
    """The head's shared weights ``b`` (F,) on all its rows (Newton), and the mean squared residual."""
    design, y = x[torch.from_numpy(head.item)], torch.from_numpy(head.target)  # (n, F), (n,)
    weights = torch.zeros(x.shape[1], dtype=x.dtype)
    ridge = GLOBAL_L2 * torch.eye(x.shape[1], dtype=x.dtype)
    for _ in range(steps if head.logistic else 1):  # a linear head is solved by the first step
        eta = design @ weights
        p = torch.sigmoid(eta) if head.logistic else eta
        curvature = (p * (1 - p)).clamp_min(1e-6) if head.logistic else torch.ones_like(eta)
        step = torch.linalg.solve(design.T @ (design * curvature[:, None]) + ridge, design.T @ (p - y) + GLOBAL_L2 * weights)
        weights = weights - step
        if step.abs().max() < 1e-9:
            break
    return weights, float(((design @ weights - y) ** 2).mean())


@contextmanager
def _one_thread() -> Iterator[None]:
    """Batched solves of this size run several times slower spread over threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
