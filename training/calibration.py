"""The rating head's calibration (``train.rating_calibration``): fitted on the valid split after training, kept in RUN/model.

The trained rating head spreads its predictions wider than its accuracy warrants (on ML-100K u1 the
least-squares slope of the true ratings on the predicted ones is about 0.87, on the held-out valid
split and on test alike), so every prediction is shrunk toward the mean rating of the train split:

    r  ->  m + a (r - m),  clipped to the rating range,

with ``m`` the train split's mean rating (a training statistic: train rows only) and ``a`` the
least-squares slope over the valid split's rated rows, scored by the selected model. One number
is fitted on rows the model never trained on; nothing of the test split is read. The saved
``model.json`` keeps ``(m, a)`` in the spec (``RecsysModel.set_rating_calibration``), so the
evaluation, the index and the service all score with it; training always runs uncalibrated.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import polars as pl

from recsys import metrics
from recsys.config import Config
from recsys.model import load_model, resave_model
from recsys.rundir import RunDir
from training.evaluate import load_content, score_rows

log = logging.getLogger("recsys.training")

MIN_ROWS = 50  # fewer rated valid rows than this: no calibration (one slope from a handful of rows is noise)
MAX_ROWS = 200_000  # a seeded sample of the valid split's rated rows above this
SLOPE_RANGE = (0.0, 1.5)  # a fitted slope is clipped into this (negative: predictions anti-correlated on valid)


def shrink_slope(predicted: np.ndarray, true: np.ndarray, center: float) -> float:
    """The least-squares ``a`` of ``true - center ~ a (predicted - center)``; 1 (no change) when the predictions do not vary."""
    x, y = np.asarray(predicted, np.float64) - center, np.asarray(true, np.float64) - center
    denominator = float(x @ x)
    return float(x @ y) / denominator if denominator > 0 else 1.0


def calibrate_ratings(run: RunDir, cfg: Config) -> dict[str, Any] | None:
    """Fit ``(m, a)`` for RUN/model (module docstring), set it in the saved model and return what was fitted; None when off or not possible."""
    if cfg.train.rating_calibration == "off":
        return None
    model = load_model(run.model)
    if "rating" not in model.tasks:
        return None
    if cfg.train.refit:
        log.info("rating calibration skipped: train.refit trains on the valid rows, so none are held out to fit it on")
        return None
    valid_path = run.data / "valid.parquet"
    if not valid_path.is_file():
        log.warning("rating calibration skipped: no valid split (%s)", valid_path)
        return None
    rated = pl.col("rating").is_not_null() & pl.col("rating").is_not_nan()
    center = pl.scan_parquet(run.require(run.data / "train.parquet", "prepare")).filter(rated).select(pl.col("rating").cast(pl.Float64).mean()).collect().item()
    valid = pl.read_parquet(valid_path).filter(rated)
    if center is None or valid.height < MIN_ROWS:
        log.warning("rating calibration skipped: %d rated valid rows (at least %d needed)%s", valid.height, MIN_ROWS, "" if center is not None else ", no rated train rows")
        return None
    if valid.height > MAX_ROWS:
        valid = valid.sample(n=MAX_ROWS, seed=cfg.train.seed)
    model.set_rating_calibration(0.0, 1.0)  # fit on the head's own predictions: a second call (e.g. a resume after the last epoch) refits, never compounds
    predicted = score_rows(model, valid, load_content(run, model))[0]["rating"].astype(np.float64)
    true = valid["rating"].cast(pl.Float64).to_numpy()
    fitted = shrink_slope(predicted, true, center)
    slope = float(np.clip(fitted, *SLOPE_RANGE))
    lo, hi = model.spec.rating_range
    calibrated = np.clip(center + slope * (predicted - center), lo, hi)
    out = {
        "center": round(float(center), 6), "slope": round(slope, 6), "fitted_slope": round(fitted, 6), "valid_rows": valid.height,
        "valid_rmse_before": metrics.rmse(true, predicted), "valid_rmse_after": metrics.rmse(true, calibrated),
        "fitted_on": "valid (rated rows); center: mean rating of train",
    }  # fmt: skip
    model.set_rating_calibration(out["center"], out["slope"])
    resave_model(model, run.model, {"rating_calibration_fit": out})  # the spec holds (center, slope) under "rating_calibration"
    log.info("rating calibration: r -> %.4f + %.4f (r - %.4f) from %d valid rows, valid RMSE %.4f -> %.4f", center, slope, center, valid.height, out["valid_rmse_before"], out["valid_rmse_after"])
    return out
