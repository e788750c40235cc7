"""The rating head's calibration (``train.rating_calibration``, training/calibration.py): the fit, where it applies, what it reads."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from recsys.config import load_config
from recsys.model import load_model, save_model
from recsys.rundir import write_parquet
from training.calibration import calibrate_ratings, shrink_slope
from training.evaluate import load_content, score_rows
from tests.test_index import make_tiny_run
from tests.test_model import make_batch, make_model

torch.set_num_threads(1)


def test_the_slope_is_the_least_squares_slope_about_the_center():
    rng = np.random.default_rng(0)
    predicted = rng.uniform(1, 5, 5000)
    true = 3.5 + 0.7 * (predicted - 3.5) + rng.normal(0, 0.3, 5000)
    assert shrink_slope(predicted, true, 3.5) == pytest.approx(0.7, abs=0.02)
    # by hand on three points about 2: x = (-1, 0, 1), y = (-2, 0, 1) -> (2 + 1) / 2
    assert shrink_slope(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 3.0]), 2.0) == pytest.approx(1.5)
    assert shrink_slope(np.full(4, 2.0), np.array([1.0, 2.0, 3.0, 4.0]), 2.0) == 1.0  # no spread: nothing to fit, no change


def test_the_model_scores_ratings_through_its_calibration_and_keeps_it_across_save_and_load(tmp_path):
    model, batch = make_model(), make_batch()
    with torch.inference_mode():
        plain = model(batch)
        model.set_rating_calibration(3.2, 0.5)
        calibrated = model(batch)
    torch.testing.assert_close(calibrated["rating"], (3.2 + 0.5 * (plain["rating"] - 3.2)).clamp(1.0, 5.0))
    assert not torch.allclose(calibrated["rating"], plain["rating"])
    for head in ("p_click", "p_cvr", "p_ctcvr", "user_vec", "item_vec"):  # only the rating changes
        torch.testing.assert_close(calibrated[head], plain[head])
    with torch.inference_mode():
        model.set_rating_calibration(3.0, 1.5)
        wide = model(batch)["rating"]
    torch.testing.assert_close(wide, (3.0 + 1.5 * (plain["rating"] - 3.0)).clamp(1.0, 5.0))  # kept inside the rating range
    assert float(wide.min()) >= 1.0 and float(wide.max()) <= 5.0

    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.spec.rating_calibration == (3.0, 1.5)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(batch)["rating"], wide)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    del meta["rating_calibration"]  # a model saved before the calibration existed
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    older = load_model(tmp_path / "m")
    assert older.spec.rating_calibration == (0.0, 1.0)
    with torch.inference_mode():
        torch.testing.assert_close(older(batch)["rating"], plain["rating"])


@pytest.fixture()
def rated_run(tmp_path):
    """A tiny run whose valid split has 200 rated rows (the tiny run's 20, each repeated with other ratings)."""
    run = make_tiny_run(tmp_path / "run")
    valid = pl.read_parquet(run.data / "valid.parquet")
    rng = np.random.default_rng(3)
    copies = pl.concat([valid] * 10).with_columns(pl.Series("rating", rng.integers(1, 6, valid.height * 10).astype(np.float32)))
    write_parquet(copies, run.data / "valid.parquet")
    return run


def test_calibration_is_fitted_on_valid_about_the_train_mean_and_never_reads_test(rated_run):
    (rated_run.data / "test.parquet").unlink()  # the fit must not need it
    before = load_model(rated_run.model)
    valid = pl.read_parquet(rated_run.data / "valid.parquet")
    predicted = score_rows(before, valid, load_content(rated_run, before))[0]["rating"].astype(np.float64)
    true = valid["rating"].cast(pl.Float64).to_numpy()
    center = pl.read_parquet(rated_run.data / "train.parquet")["rating"].drop_nulls().cast(pl.Float64).mean()

    fit = calibrate_ratings(rated_run, rated_run.config())
    expected = shrink_slope(predicted, true, center)
    assert fit["center"] == pytest.approx(center, abs=1e-6) and fit["fitted_slope"] == pytest.approx(expected, abs=1e-6)
    assert fit["slope"] == pytest.approx(min(max(expected, 0.0), 1.5), abs=1e-6) and fit["valid_rows"] == 200
    assert fit["valid_rmse_after"] <= fit["valid_rmse_before"] + 1e-9

    after = load_model(rated_run.model)
    assert after.spec.rating_calibration == (fit["center"], fit["slope"])
    rescored = score_rows(after, valid, load_content(rated_run, after))[0]["rating"]
    np.testing.assert_allclose(rescored, np.clip(fit["center"] + fit["slope"] * (predicted - fit["center"]), 1, 5), atol=1e-5)
    meta = json.loads((rated_run.model / "model.json").read_text())
    assert meta["rating_calibration_fit"]["valid_rows"] == 200
    assert calibrate_ratings(rated_run, rated_run.config()) == fit  # a second fit (a resume after the last epoch) refits the head, not the calibrated scores
    assert load_model(rated_run.model).spec.rating_calibration == (fit["center"], fit["slope"])


@pytest.mark.parametrize("setting", ["train.rating_calibration=off", "train.refit=true"])
def test_off_or_after_a_refit_the_model_is_left_as_trained(rated_run, setting):
    cfg = load_config(None, [setting], base=rated_run.config())
    saved = (rated_run.model / "model.safetensors").read_bytes(), (rated_run.model / "model.json").read_text()
    assert calibrate_ratings(rated_run, cfg) is None
    assert ((rated_run.model / "model.safetensors").read_bytes(), (rated_run.model / "model.json").read_text()) == saved


def test_too_few_rated_valid_rows_leave_the_model_as_trained(tmp_path):
    run = make_tiny_run(tmp_path / "run")  # 20 rated valid rows: below training.calibration.MIN_ROWS
    assert calibrate_ratings(run, run.config()) is None
    assert load_model(run.model).spec.rating_calibration == (0.0, 1.0)


def test_the_calibrated_model_reaches_the_service_the_metrics_and_the_report(rated_run):
    from serving.index import build_index
    from serving.recommender import Recommender
    from training.evaluate import evaluate

    build_index(rated_run)
    before = {r.item_id: r.rating for r in Recommender.load(rated_run).recommend(user_id="u3", k=20).items}
    fit = calibrate_ratings(rated_run, rated_run.config())
    build_index(rated_run)
    after = {r.item_id: r.rating for r in Recommender.load(rated_run).recommend(user_id="u3", k=20).items}
    shared = sorted(set(before) & set(after))
    assert len(shared) >= 5
    expected = np.clip(fit["center"] + fit["slope"] * (np.array([before[i] for i in shared]) - fit["center"]), 1, 5)
    np.testing.assert_allclose([after[i] for i in shared], expected, atol=1e-5)  # the service scores through the calibration

    metrics = evaluate(rated_run)
    assert metrics["rating_calibration"]["slope"] == fit["slope"] and metrics["rating_calibration"]["valid_rows"] == 200
    assert "Predictions are calibrated" in (rated_run.root / "report.html").read_text()
