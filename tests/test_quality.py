"""Model quality against the synthetic generator's ground truth (features/synth.py: truth.parquet).

AUC efficiency = (model AUC - 0.5) / (oracle AUC - 0.5) on the test split, where the oracle
scores each row with the generator's true probabilities; rating RMSE is compared with the
RMSE of the true rating means. How close a learner can get depends on how many impressions
each user has (a user's latent is only seen through them): the fast test uses a small, dense
dataset and the thresholds it reaches; the slow one the full targets at a larger size.

Beside the oracle, the data-limited ceiling (training/ceiling.py, keys ``ceiling_*``): given
the true item attributes, it learns only the users, from the same train rows, so it tells
what these rows allow; the model's figures are read against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.embed import embed
from features.pipeline import prepare
from features.synth import SynthParams, synthesize
from recsys.config import load_config
from recsys.rundir import RunDir, read_json
from training.evaluate import evaluate
from training.train import train
from training.truth import truth_quality


def trained_run(root: Path, users: int, items: int, interactions: int, overrides: list[str], params: SynthParams | None = None) -> tuple[RunDir, Path]:
    dataset = root / "data"
    synthesize(dataset, users=users, items=items, interactions=interactions, seed=0, params=params)
    cfg = load_config(None, ["eval.bootstrap=0", *overrides])  # bundled MiniLM text, weight-free built-in images
    run = RunDir.create(root / "run", cfg, dataset)
    prepare(run)
    embed(run)
    train(run)
    return run, dataset


def quality(run: RunDir, dataset: Path) -> dict[str, float]:
    return truth_quality(run, dataset)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[RunDir, Path]:
    """300 users x 300 items, 200 impressions per user: about 20 s on one core."""
    return trained_run(tmp_path_factory.mktemp("quality"), users=300, items=300, interactions=60_000, overrides=["train.epochs=12"])


# Thresholds lowered when conversion began to read the users' texture taste and the text quality
# (features/synth.py); measured with train.seed 0 / 1, before -> after that data change, same model:
# click 0.757 / 0.768 -> 0.745 / 0.771, conversion 0.765 / 0.771 -> 0.681 / 0.697, ctcvr 0.834 / 0.840
# -> 0.796 / 0.810, click_cold 0.477 / 0.460 -> 0.382 / 0.560, click_cold_content 0.555 / 0.535 ->
# 0.444 / 0.651 (216 cold rows: about 0.1 of seed noise). The ceiling: click 0.94, conversion 0.81.
def test_default_model_gets_most_of_the_oracle_auc_on_every_task(small):
    q = quality(*small)
    assert q["click"] >= 0.72, q
    assert q["ctcvr"] >= 0.75, q
    assert q["conversion"] >= 0.65, q  # measured 0.68
    assert q["conversion"] >= 0.75 * q["ceiling_conversion"], q  # measured 0.84 of what these rows allow
    assert q["rating_rmse_ratio"] <= 1.3, q


@pytest.fixture(scope="module")
def cold_start(tmp_path_factory) -> tuple[RunDir, Path]:
    """300 users x 600 items, 60% of them created during the span: about 90 s on one core.

    The small run's test split holds 216 cold rows, too few to measure cold items on (its
    click_cold moved by about 0.1 between seeds and fell to 0.30 on an AMD EPYC); this one holds 709.
    """
    return trained_run(tmp_path_factory.mktemp("cold"), users=300, items=600, interactions=60_000, overrides=["train.epochs=12"],
                       params=SynthParams(new_item_fraction=0.6))


# Measured (2026-12-02, AMD EPYC) with train.seed 0 / 1 / 2: click_cold 0.579 / 0.528 / 0.598, click_warm
# 0.770 / 0.775 / 0.779, click_cold_content 0.757 / 0.689 / 0.780 on 709 cold rows. A model that ignored
# the content of cold items would sit near 0 (the id-only ablation: 0.05).
def test_cold_items_are_ranked_through_their_content(cold_start):
    q = quality(*cold_start)
    assert q["cold_rows"] >= 500, q
    assert q["click_cold"] >= 0.40, q  # never seen in training: ranked by text, image and side features alone
    assert q["click_cold"] >= 0.55 * q["click_warm"], q
    assert q["click_cold_content"] >= 0.55, q  # of what the text and image can tell


def test_the_ceiling_is_far_above_chance_not_above_the_oracle_and_not_below_the_model(small):
    q = quality(*small)
    for head in ("click", "conversion", "ctcvr"):
        assert 0.6 < q[f"ceiling_{head}"] <= 1.03, q  # measured click 0.94, conversion 0.81, ctcvr 0.91
        assert q[head] <= q[f"ceiling_{head}"] + 0.05, q  # the model learns users from the same rows and knows items less well
    assert q["ceiling_rating_rmse_ratio"] <= q["rating_rmse_ratio"] + 0.05, q  # measured 1.10 vs the model's 1.19


def test_mf_baseline_beats_the_train_mean_and_a_random_ranking_on_the_models_protocol(small):
    run, _ = small
    metrics = evaluate(run)
    baseline = metrics["baseline_mf"]
    assert set(baseline["retrieval"]) == set(metrics["retrieval"])
    assert read_json(run.metrics_path)["baseline_mf"]["retrieval"] == pytest.approx(baseline["retrieval"])

    splits = {name: pl.read_parquet(run.data / f"{name}.parquet") for name in ("train", "valid", "test")}
    train_mean = splits["train"]["rating"].drop_nulls().mean()
    test_ratings = splits["test"]["rating"].drop_nulls().cast(pl.Float64).to_numpy()
    mean_rmse = float(np.sqrt(np.mean((test_ratings - train_mean) ** 2)))  # a constant predictor's error
    assert baseline["rating"]["rmse"] < 0.95 * mean_rmse, (baseline["rating"], mean_rmse)  # measured 0.98 vs 1.13

    # A random ranking of the items a user is eligible for (catalogue minus their train/valid clicks)
    # finds each relevant item in the top 20 with probability 20 / eligible: its expected recall@20.
    n_items = read_json(run.data / "meta.json")["n_items"] - 1
    clicked = {name: frame.filter(pl.col("click") == 1).select("user_idx", "item_idx") for name, frame in splits.items()}
    known = pl.concat([clicked["train"], clicked["valid"]]).unique()
    evaluated = clicked["test"].unique().join(known, on=["user_idx", "item_idx"], how="anti")["user_idx"].unique()
    known_per_user = pl.DataFrame({"user_idx": evaluated}).join(known.group_by("user_idx").len(), on="user_idx", how="left")
    eligible = n_items - known_per_user["len"].fill_null(0).to_numpy()
    random_recall = float(np.mean(np.minimum(1.0, 20 / eligible)))
    assert baseline["retrieval"]["recall@20"] > 3 * random_recall, (baseline["retrieval"], random_recall)  # measured 0.34 vs 0.074


@pytest.mark.slow
def test_issue_targets_at_1000_impressions_per_user(tmp_path):
    """1000 users x 1000 items x 1M impressions, default config: about 5 min on 2 cores.

    Measured (2026-11-26): efficiency click 0.948, conversion 0.911, ctcvr 0.956, rating RMSE
    1.06x the oracle's; cold items 0.84 of what their content allows. At 500 impressions per
    user the same config reaches click 0.925, conversion 0.892, ctcvr 0.939: the conversion
    head learns from clicked rows only, and needs the larger sample for 0.9. These figures
    predate conversion's texture-taste and text-quality terms; not measured since.
    """
    q = quality(*trained_run(tmp_path, users=1000, items=1000, interactions=1_000_000, overrides=[]))
    assert q["click"] >= 0.9, q
    assert q["ctcvr"] >= 0.9, q
    assert q["conversion"] >= 0.9, q
    assert q["rating_rmse_ratio"] <= 1.15, q
    assert q["click_cold_content"] >= 0.75, q
