"""The rating head of a trained run with and without its calibration, and an item-kNN rating diagnostic.

    python benchmarks/rating_calibration.py [--run RUN] [--neighbours 60 --shrink 50]

Without ``--run`` it trains the small synthetic run of ``benchmarks/popularity_prior.py`` first.

Prints, for RUN's model (``train.rating_calibration``, training/calibration.py):

- the slope of the true ratings on the uncalibrated head's predictions about the train mean, on the
  valid split (what the calibration fits) and on test (what it should have been: a check, never used);
- test RMSE / MAE uncalibrated and calibrated (the same model: the calibration comes after training);
- a diagnostic, **fitted on test, not a result**: an item-kNN rating predictor (Koren's regularised
  baselines + shrunk Pearson item-item weights over the residuals, the ``--neighbours`` most similar items
  the user rated) from the rated train + valid rows, alone and blended with the calibrated model at
  fixed weights. A blend that beats the model says the ratings users gave to similar items, which the
  model does not read, carry signal its heads miss.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys import metrics  # noqa: E402
from recsys.model import load_model  # noqa: E402
from recsys.rundir import RunDir  # noqa: E402
from training.calibration import shrink_slope  # noqa: E402
from training.evaluate import load_content, score_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from popularity_prior import synthetic_run  # noqa: E402


def rated(path: Path) -> pl.DataFrame:
    frame = pl.read_parquet(path)
    return frame.filter(pl.col("rating").is_not_null() & pl.col("rating").is_not_nan())


def knn_predictor(known: pl.DataFrame, n_users: int, n_items: int, neighbours: int, shrink: float):
    """Regularised user/item baselines + shrunk Pearson item-item weights over the residuals (dense: small catalogues)."""
    u, i = known["user_idx"].to_numpy(), known["item_idx"].to_numpy()
    r = known["rating"].cast(pl.Float64).to_numpy()
    mu = r.mean()
    bu, bi = np.zeros(n_users), np.zeros(n_items)
    for _ in range(15):
        bi = np.bincount(i, r - mu - bu[u], n_items) / (np.bincount(i, minlength=n_items) + 25)
        bu = np.bincount(u, r - mu - bi[i], n_users) / (np.bincount(u, minlength=n_users) + 10)
    residual = np.zeros((n_users, n_items))
    seen = np.zeros((n_users, n_items))
    residual[u, i], seen[u, i] = r - mu - bu[u] - bi[i], 1.0
    co = seen.T @ seen
    similarity = (residual.T @ residual) / (np.sqrt((residual**2).T @ seen * (seen.T @ residual**2)) + 1e-9) * co / (co + shrink)
    np.fill_diagonal(similarity, 0.0)

    def predict(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        out = np.empty(len(users))
        for n, (a, b) in enumerate(zip(users, items)):
            rated_items = np.flatnonzero(seen[a])
            weights = similarity[b, rated_items]
            top = np.argsort(-weights)[:neighbours]
            weights, chosen = weights[top], rated_items[top]
            keep = weights > 0
            base = mu + bu[a] + bi[b]
            out[n] = base + (weights[keep] @ residual[a, chosen[keep]]) / weights[keep].sum() if keep.any() else base
        return out

    return predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: train the synthetic one of benchmarks/popularity_prior.py)")
    parser.add_argument("--neighbours", type=int, default=60)
    parser.add_argument("--shrink", type=float, default=50.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        measure(RunDir(args.run) if args.run else synthetic_run(Path(tmp)), args.neighbours, args.shrink)


def measure(run: RunDir, neighbours: int, shrink: float) -> None:
    model = load_model(run.model)
    if "rating" not in model.tasks:
        raise SystemExit(f"{run.model}: the model has no rating head")
    content = load_content(run, model)
    center, slope = model.spec.rating_calibration
    train, valid, test = (rated(run.data / f"{split}.parquet") for split in ("train", "valid", "test"))
    lo, hi = model.spec.rating_range
    mean = float(train["rating"].cast(pl.Float64).mean())

    model.set_rating_calibration(0.0, 1.0)  # the head's own predictions
    raw_valid, raw_test = (score_rows(model, frame, content)[0]["rating"].astype(np.float64) for frame in (valid, test))
    true_valid, true_test = (frame["rating"].cast(pl.Float64).to_numpy() for frame in (valid, test))
    calibrated = np.clip(center + slope * (raw_test - center), lo, hi)

    def rmse(p):
        return metrics.rmse(true_test, p)

    knn = knn_predictor(pl.concat([train.select("user_idx", "item_idx", "rating"), valid.select("user_idx", "item_idx", "rating")]),
                        model.spec.n_users, model.spec.n_items, neighbours, shrink)(test["user_idx"].to_numpy(), test["item_idx"].to_numpy())  # fmt: skip
    knn = np.clip(knn, lo, hi)
    result = {
        "run": str(run.root), "calibration": {"center": center, "slope": slope}, "train_mean": mean,
        "slope_valid": shrink_slope(raw_valid, true_valid, mean), "slope_test_check": shrink_slope(raw_test, true_test, mean),
        "test_rows": test.height, "test_rmse_uncalibrated": rmse(raw_test), "test_rmse_calibrated": rmse(calibrated),
        "test_mae_uncalibrated": metrics.mae(true_test, raw_test), "test_mae_calibrated": metrics.mae(true_test, calibrated),
        "diagnostic_fitted_on_test": {
            "knn_rmse": rmse(knn), "residual_correlation": float(np.corrcoef(calibrated - true_test, knn - true_test)[0, 1]),
            "blend_rmse": {f"{w:.1f}": rmse((1 - w) * calibrated + w * knn) for w in (0.1, 0.2, 0.3, 0.4)},
        },
    }  # fmt: skip
    print(f"calibration r -> {center:.4f} + {slope:.4f} (r - {center:.4f}); slope about the train mean {mean:.4f}: valid {result['slope_valid']:.3f}, test {result['slope_test_check']:.3f} (check)")
    print(f"test RMSE {result['test_rmse_uncalibrated']:.4f} uncalibrated -> {result['test_rmse_calibrated']:.4f} calibrated ({test.height} rated rows)")
    d = result["diagnostic_fitted_on_test"]
    print(f"diagnostic (fitted on test): item-kNN RMSE {d['knn_rmse']:.4f}, blends with the calibrated model " + ", ".join(f"w={w}: {v:.4f}" for w, v in d["blend_rmse"].items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
