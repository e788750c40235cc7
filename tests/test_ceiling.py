"""The data-limited ceiling (training/ceiling.py): per-user weights on the true item attributes, from train rows only."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from features.synth import TEXTURES, TOPICS, synthesize
from recsys import metrics as m
from recsys.errors import DataError
from training.ceiling import ceiling_scores, decode_attributes, fit_ceiling


def _hand_made_items(n_items: int, rng: np.random.Generator) -> pl.DataFrame:
    """A truth_items table of ``n_items`` with random attributes and a 2-d latent."""
    return pl.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(n_items)],
            "topic": [TOPICS[k % len(TOPICS)] for k in range(n_items)],
            "hue": rng.random(n_items),
            "texture": [TEXTURES[k % len(TEXTURES)] for k in range(n_items)],
            "quality": rng.standard_normal(n_items),
            "price": np.exp(3 + 0.5 * rng.standard_normal(n_items)),
            "popularity": rng.standard_normal(n_items),
            "latent": rng.standard_normal((n_items, 2)),
        }
    )


def _temporal_split(rows: pl.DataFrame) -> pl.DataFrame:
    """First 80% of the rows (time order) train, then 10% valid, 10% test."""
    position = pl.int_range(pl.len()) / pl.len()
    return rows.with_columns(split=pl.when(position >= 0.9).then(pl.lit("test")).when(position >= 0.8).then(pl.lit("valid")).otherwise(pl.lit("train")))


def _flip_labels(rows: pl.DataFrame, where: pl.Expr) -> pl.DataFrame:
    """Click and conversion labels inverted (conversion only on clicks) and ratings mirrored on the rows ``where`` holds."""
    click = pl.when(where).then(1 - pl.col("click")).otherwise(pl.col("click")).cast(pl.Int8)
    flipped = rows.with_columns(click=click)
    conversion = pl.when(where).then((pl.col("click") == 1) & (pl.col("conversion") == 0)).otherwise(pl.col("conversion") == 1)
    rating = pl.when(where).then(pl.when(pl.col("click") == 1).then(6 - pl.col("rating").fill_null(3))).otherwise(pl.col("rating"))
    return flipped.with_columns(conversion=conversion.cast(pl.Int8), rating=rating.cast(pl.Float32))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """300 users x 300 items x 60k rows (the fast quality fixture's size), split 80/10/10 by time, with both ceilings."""
    out = tmp_path_factory.mktemp("ceiling")
    synthesize(out, users=300, items=300, interactions=60_000, seed=0, images=False)
    rows = _temporal_split(pl.read_parquet(out / "interactions.parquet"))
    truth_items = pl.read_parquet(out / "truth_items.parquet")
    return {
        "out": out,
        "rows": rows,
        "truth_items": truth_items,
        "ceiling": fit_ceiling(rows, truth_items),
        "content_ceiling": fit_ceiling(rows, truth_items, item_latent=False),
    }


def _test_efficiency(synthetic: dict, ceiling) -> dict[str, float]:
    """(AUC - 0.5) / (oracle AUC - 0.5) on the test rows, per head; rating RMSE over the true means' RMSE."""
    test_mask = synthetic["rows"]["split"] == "test"
    test = synthetic["rows"].filter(test_mask)
    truth = pl.read_parquet(synthetic["out"] / "truth.parquet").filter(test_mask)
    scores = ceiling_scores(ceiling, test)
    click, conversion = test["click"].to_numpy(), test["conversion"].to_numpy()
    clicked = click > 0
    rating = test["rating"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    rated = np.isfinite(rating)

    def efficiency(labels, model_scores, oracle_scores):
        return (m.auc(labels, model_scores) - 0.5) / (m.auc(labels, oracle_scores) - 0.5)

    return {
        "click": efficiency(click, scores["p_click"], truth["p_click"].to_numpy()),
        "conversion": efficiency(conversion[clicked], scores["p_cvr"][clicked], truth["p_conversion"].to_numpy()[clicked]),
        "ctcvr": efficiency(conversion, scores["p_ctcvr"], truth["p_ctcvr"].to_numpy()),
        "rating_rmse_ratio": m.rmse(rating[rated], scores["rating"][rated]) / m.rmse(rating[rated], truth["rating_mean"].to_numpy()[rated]),
    }


# -- it learns per-user weights -------------------------------------------------------------
def test_recovers_a_planted_per_user_weight_on_a_hand_made_problem() -> None:
    rng = np.random.default_rng(0)
    items = _hand_made_items(30, rng)
    n_users, rows_per_user = 40, 600
    planted = np.where(np.arange(n_users) % 2 == 0, 1.5, -1.5)  # conversion logit per sd of quality
    user = np.repeat(np.arange(n_users), rows_per_user)
    item = rng.integers(0, 30, user.size)
    click = rng.random(user.size) < 0.5  # independent of everything
    p_conversion = 1 / (1 + np.exp(-(-0.3 + planted[user] * items["quality"].to_numpy()[item])))
    rows = pl.DataFrame(
        {
            "user_id": [f"u{k}" for k in user],
            "item_id": items["item_id"].to_numpy()[item],
            "click": click.astype(np.int8),
            "conversion": (click & (rng.random(user.size) < p_conversion)).astype(np.int8),
        }
    )
    ceiling = fit_ceiling(rows, items)
    fitted = np.array([ceiling.user_weights("conversion", f"u{k}")["quality"] for k in range(n_users)])
    assert np.all(np.sign(fitted) == np.sign(planted)), fitted
    assert np.abs(fitted - planted).mean() < 0.2, fitted
    unplanted = np.array([ceiling.user_weights("click", f"u{k}")["quality"] for k in range(n_users)])
    assert np.abs(unplanted).max() < 0.3, unplanted  # clicks do not depend on quality
    assert ceiling.rating is None  # no rating column: no rating head


def test_learns_each_users_taste_for_textures_from_their_rows(synthetic: dict) -> None:
    ceiling = synthetic["ceiling"]
    users = pl.read_parquet(synthetic["out"] / "truth_users.parquet")
    columns = [ceiling.feature_names.index(f"texture={t}") for t in TEXTURES]
    rows = [ceiling.user_ids.index_of(u) for u in users["user_id"]]
    fitted = ceiling.conversion.user_offsets[rows][:, columns]
    fitted = fitted - fitted.mean(1, keepdims=True)  # the taste is centred per user; an offset of all four is a bias
    true = np.stack(users["texture_taste"].to_numpy())
    assert np.corrcoef(fitted.ravel(), true.ravel())[0, 1] > 0.4  # measured 0.55 from about 35 clicked rows per user


def test_per_user_weights_rank_conversions_better_than_the_shared_model_alone(synthetic: dict) -> None:
    ceiling = synthetic["ceiling"]
    shared_only = dataclasses.replace(ceiling, conversion=dataclasses.replace(ceiling.conversion, user_offsets=0 * ceiling.conversion.user_offsets))
    assert _test_efficiency(synthetic, ceiling)["conversion"] > _test_efficiency(synthetic, shared_only)["conversion"] + 0.15


def test_a_user_without_train_rows_is_scored_with_the_shared_weights(synthetic: dict) -> None:
    ceiling = synthetic["ceiling"]
    stranger = pl.DataFrame({"user_id": ["nobody"], "item_id": ["i3"]})
    features = np.stack(ceiling.items.filter(pl.col("item_id") == "i3")["features"].to_numpy())[0]
    expected = 1 / (1 + np.exp(-features @ ceiling.click.global_weights))
    assert ceiling_scores(ceiling, stranger)["p_click"][0] == pytest.approx(expected)
    assert ceiling.user_weights("click", "nobody") == dict(zip(ceiling.feature_names, ceiling.click.global_weights.tolist()))


# -- it uses only the train rows ---------------------------------------------------------------
def test_valid_and_test_labels_do_not_change_the_fitted_weights(synthetic: dict) -> None:
    rows, truth_items = synthetic["rows"], synthetic["truth_items"]
    flipped = _flip_labels(rows, pl.col("split") != "train")
    assert not flipped["click"].equals(rows["click"])  # the flip did change labels
    refit = fit_ceiling(flipped, truth_items)
    for head in ("click", "conversion", "rating"):
        assert np.array_equal(getattr(refit, head).user_offsets, getattr(synthetic["ceiling"], head).user_offsets), head
        assert np.array_equal(getattr(refit, head).global_weights, getattr(synthetic["ceiling"], head).global_weights), head


def test_train_labels_do_change_the_fitted_weights(synthetic: dict) -> None:
    """The check above can fail: the same flip on a few train rows moves every head."""
    rows, truth_items = synthetic["rows"], synthetic["truth_items"]
    refit = fit_ceiling(_flip_labels(rows, (pl.col("split") == "train") & (pl.int_range(pl.len()) < 500)), truth_items)
    for head in ("click", "conversion", "rating"):
        assert not np.allclose(getattr(refit, head).user_offsets, getattr(synthetic["ceiling"], head).user_offsets), head


def test_scores_read_only_user_and_item(synthetic: dict) -> None:
    test = synthetic["rows"].filter(pl.col("split") == "test")
    with_labels = ceiling_scores(synthetic["ceiling"], _flip_labels(test, pl.lit(True)))
    without_labels = ceiling_scores(synthetic["ceiling"], test.select("user_id", "item_id"))
    for name, values in without_labels.items():
        assert np.array_equal(values, with_labels[name]), name


# -- it is a ceiling: far above chance, not above the oracle ------------------------------------
def test_efficiency_is_clearly_above_chance_and_not_above_the_oracle(synthetic: dict) -> None:
    q = _test_efficiency(synthetic, synthetic["ceiling"])
    assert 0.65 < q["conversion"] <= 1.03, q  # measured 0.81 (1353 clicked test rows: efficiency sd about 0.03)
    assert 0.8 < q["click"] <= 1.03, q  # measured 0.94
    assert 0.75 < q["ctcvr"] <= 1.03, q  # measured 0.91
    assert 0.97 <= q["rating_rmse_ratio"] < 1.2, q  # measured 1.10: linear in stars, the truth is a sigmoid


def test_without_the_item_latent_the_ceiling_misses_what_only_ids_reveal(synthetic: dict) -> None:
    with_latent, content_only = _test_efficiency(synthetic, synthetic["ceiling"]), _test_efficiency(synthetic, synthetic["content_ceiling"])
    assert content_only["click"] < with_latent["click"] - 0.08, (content_only, with_latent)  # measured 0.78 vs 0.94
    assert content_only["conversion"] > 0.5, content_only  # measured 0.74: text and image attributes alone carry most of it


# -- the decoded ceiling: texture and quality as the encoders show them ---------------------------
def _encoders(truth_items: pl.DataFrame, signal: float, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fake encoder vectors: ``signal`` x the quality (text) and the texture one-hot (image) in the first columns, unit noise elsewhere."""
    rng = np.random.default_rng(seed)
    text, image = rng.standard_normal((truth_items.height, dim)), rng.standard_normal((truth_items.height, dim))
    text[:, 0] += signal * truth_items["quality"].to_numpy()
    for k, t in enumerate(TEXTURES):
        image[:, k] += signal * (truth_items["texture"] == t).to_numpy()
    return text, image


def test_a_probe_of_clear_encoders_recovers_the_attributes_and_the_ceiling(synthetic: dict) -> None:
    decoded, probe = decode_attributes(synthetic["truth_items"], *_encoders(synthetic["truth_items"], signal=20.0, dim=16, seed=0))
    assert probe.quality_r2 > 0.95 and probe.texture_accuracy > 0.97, probe
    true, read = _test_efficiency(synthetic, synthetic["ceiling"]), _test_efficiency(synthetic, fit_ceiling(synthetic["rows"], decoded))
    assert abs(read["conversion"] - true["conversion"]) < 0.03, (read, true)


def test_a_probe_of_blind_encoders_reads_nothing_and_the_conversion_ceiling_drops(synthetic: dict) -> None:
    """Pure-noise vectors with more dimensions than items: a probe fitted in-sample would reproduce every
    label (R^2 1); out of fold it reads nothing, so no item's own label reaches its decoded value."""
    items = synthetic["truth_items"]
    decoded, probe = decode_attributes(items, *_encoders(items, signal=0.0, dim=items.height + 20, seed=1))
    assert probe.quality_r2 < 0.1 and probe.texture_accuracy < 0.4, probe  # chance: 0 and about 0.25
    true, read = _test_efficiency(synthetic, synthetic["ceiling"]), _test_efficiency(synthetic, fit_ceiling(synthetic["rows"], decoded))
    assert read["conversion"] < true["conversion"] - 0.05, (read, true)  # measured 0.73 vs 0.81: texture and quality are what the item latent lacks


def test_a_missing_modality_decodes_as_the_attributes_mean() -> None:
    items = _hand_made_items(40, np.random.default_rng(2))
    text, _ = _encoders(items, signal=5.0, dim=4, seed=2)
    text[:3] = np.nan  # three items without text
    decoded, probe = decode_attributes(items, text, None)
    assert np.isnan(probe.texture_accuracy) and probe.quality_r2 > 0.5
    assert np.allclose(decoded["quality"].to_numpy()[:3], items["quality"].mean())
    assert np.allclose(np.stack(decoded["texture_scores"].to_numpy()), 0.25)  # 4 textures, 10 items each


# -- errors for people ---------------------------------------------------------------------------
def test_truth_items_without_an_attribute_are_refused_naming_it() -> None:
    items = _hand_made_items(4, np.random.default_rng(1)).drop("quality")
    rows = pl.DataFrame({"user_id": ["u0"], "item_id": ["i0"], "click": [1], "conversion": [0]})
    with pytest.raises(DataError, match="quality"):
        fit_ceiling(rows, items)


def test_rows_naming_unknown_items_are_refused_naming_them() -> None:
    items = _hand_made_items(4, np.random.default_rng(1))
    rows = pl.DataFrame({"user_id": ["u0", "u0"], "item_id": ["i0", "i99"], "click": [1, 0], "conversion": [0, 0]})
    with pytest.raises(DataError, match="i99"):
        fit_ceiling(rows, items)
