"""The synthetic dataset generator: contract, determinism, and labels that follow the oracle."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from features.synth import QUALITY_WORDS, TEXTURES, TOPIC_WORDS, SynthParams, synthesize
from recsys import metrics as m
from recsys.cli import main as cli_main
from recsys.errors import DataError


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny dataset with images: 60 users x 50 impressions, 120 items."""
    out = tmp_path_factory.mktemp("synth_small")
    return out, synthesize(out, users=60, items=120, seed=3, images=True)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Enough rows for calibration checks: 1500 users x 40 impressions, 400 items, no images."""
    out = tmp_path_factory.mktemp("synth_large")
    return out, synthesize(out, users=1500, items=400, interactions=60_000, seed=11, images=False)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _binned_rates(predicted: np.ndarray, observed: np.ndarray, bins: int) -> list[tuple[float, float, int]]:
    """(mean predicted, observed rate, rows) per quantile bin of the predicted value."""
    edges = np.quantile(predicted, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, predicted, "right") - 1, 0, bins - 1)
    return [(predicted[which == b].mean(), observed[which == b].mean(), int((which == b).sum())) for b in range(bins)]


# -- determinism ---------------------------------------------------------------------------
def test_same_arguments_write_byte_identical_files(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", users=20, items=30, seed=5, images=True)
    synthesize(tmp_path / "b", users=20, items=30, seed=5, images=True)
    digests = _digests(tmp_path / "a")
    assert len(digests) == 7 + 30  # 6 parquet + truth.json, one PNG per item
    assert digests == _digests(tmp_path / "b")


def test_different_seed_gives_different_interactions(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", users=20, items=30, seed=5, images=False)
    synthesize(tmp_path / "b", users=20, items=30, seed=6, images=False)
    first = pl.read_parquet(tmp_path / "a" / "interactions.parquet")
    second = pl.read_parquet(tmp_path / "b" / "interactions.parquet")
    assert first.shape == second.shape
    assert not first.equals(second)


# -- the dataset contract ------------------------------------------------------------------
def test_interactions_have_contract_columns_and_dtypes(small: tuple[Path, dict]) -> None:
    frame = pl.read_parquet(small[0] / "interactions.parquet")
    assert frame.schema == pl.Schema(
        {
            "user_id": pl.String,
            "item_id": pl.String,
            "timestamp": pl.Int64,
            "click": pl.Int8,
            "conversion": pl.Int8,
            "rating": pl.Float32,
        }
    )
    assert frame.height == 60 * 50  # default: 50 impressions per user
    assert frame["timestamp"].is_sorted()


def test_items_and_users_have_contract_columns(small: tuple[Path, dict]) -> None:
    items = pl.read_parquet(small[0] / "items.parquet")
    users = pl.read_parquet(small[0] / "users.parquet")
    assert items.schema == pl.Schema(
        {"item_id": pl.String, "text": pl.String, "image": pl.String, "category": pl.String, "price": pl.Float64, "created_at": pl.Int64}
    )
    assert users.schema == pl.Schema({"user_id": pl.String, "region": pl.String, "age": pl.Int64})
    assert items["item_id"].to_list()[:3] == ["i0", "i1", "i2"] and items["item_id"].n_unique() == 120
    assert items["image"][7] == "images/i7.png"
    assert users["user_id"].n_unique() == 60 and (items["price"] > 0).all()


def test_interactions_name_only_catalogue_items_and_known_users(small: tuple[Path, dict]) -> None:
    out = small[0]
    frame = pl.read_parquet(out / "interactions.parquet")
    assert frame["item_id"].is_in(pl.read_parquet(out / "items.parquet")["item_id"].implode()).all()
    assert frame["user_id"].is_in(pl.read_parquet(out / "users.parquet")["user_id"].implode()).all()


def test_conversion_happens_only_on_clicked_rows(large: tuple[Path, dict]) -> None:
    frame = pl.read_parquet(large[0] / "interactions.parquet")
    assert frame.filter(pl.col("click") == 0)["conversion"].sum() == 0
    assert frame.filter(pl.col("click") == 1)["conversion"].sum() > 0


def test_rating_is_null_exactly_on_unclicked_rows_and_lies_in_one_to_five(large: tuple[Path, dict]) -> None:
    frame = pl.read_parquet(large[0] / "interactions.parquet")
    assert (frame["rating"].is_null() == (frame["click"] == 0)).all()
    rated = frame["rating"].drop_nulls()
    assert rated.min() == 1.0 and rated.max() == 5.0


def test_truth_rows_align_with_interactions(large: tuple[Path, dict]) -> None:
    frame = pl.read_parquet(large[0] / "interactions.parquet")
    truth = pl.read_parquet(large[0] / "truth.parquet")
    assert truth.select("user_id", "item_id", "timestamp").equals(frame.select("user_id", "item_id", "timestamp"))
    assert np.allclose(truth["p_ctcvr"], truth["p_click"] * truth["p_conversion"])
    assert truth["rating_mean"].min() >= 1.0 and truth["rating_mean"].max() <= 5.0


def test_items_are_impressed_only_after_their_creation(large: tuple[Path, dict]) -> None:
    frame = pl.read_parquet(large[0] / "interactions.parquet")
    items = pl.read_parquet(large[0] / "items.parquet")
    joined = frame.join(items.select("item_id", "created_at"), on="item_id")
    assert joined.height == frame.height
    assert (joined["timestamp"] >= joined["created_at"]).all()


def test_without_images_there_is_no_image_column_and_no_pngs(large: tuple[Path, dict]) -> None:
    assert "image" not in pl.read_parquet(large[0] / "items.parquet").columns
    assert not (large[0] / "images").exists()


# -- labels follow the oracle -------------------------------------------------------------
def test_click_rate_matches_true_p_click_in_every_bin(large: tuple[Path, dict]) -> None:
    frame = pl.read_parquet(large[0] / "interactions.parquet")
    truth = pl.read_parquet(large[0] / "truth.parquet")
    for predicted, observed, rows in _binned_rates(truth["p_click"].to_numpy(), frame["click"].to_numpy(), bins=10):
        assert abs(observed - predicted) < 4 * np.sqrt(predicted * (1 - predicted) / rows) + 0.005


def test_conversion_rate_among_clicks_matches_true_p_conversion(large: tuple[Path, dict]) -> None:
    frame = pl.read_parquet(large[0] / "interactions.parquet")
    truth = pl.read_parquet(large[0] / "truth.parquet").filter(frame["click"] == 1)
    converted = frame.filter(pl.col("click") == 1)["conversion"].to_numpy()
    for predicted, observed, rows in _binned_rates(truth["p_conversion"].to_numpy(), converted, bins=5):
        assert abs(observed - predicted) < 4 * np.sqrt(predicted * (1 - predicted) / rows) + 0.005


def test_mean_rating_matches_rating_mean(large: tuple[Path, dict]) -> None:
    frame = pl.read_parquet(large[0] / "interactions.parquet")
    truth = pl.read_parquet(large[0] / "truth.parquet").filter(frame["click"] == 1)
    ratings = frame["rating"].drop_nulls().to_numpy()
    for predicted, observed, rows in _binned_rates(truth["rating_mean"].to_numpy(), ratings, bins=5):
        assert abs(observed - predicted) < 4 * 1.0 / np.sqrt(rows)  # star sd is at most 1


def test_base_rates_are_realistic_and_the_oracle_separates_clicks(large: tuple[Path, dict]) -> None:
    summary = large[1]
    assert 0.10 <= summary["ctr"] <= 0.30
    assert 0.10 <= summary["cvr_given_click"] <= 0.40
    assert summary["oracle_click_auc"] > 0.75


def test_oracle_aucs_count_every_pair_with_a_tie_as_one_half(tmp_path: Path) -> None:
    # 20 users x 50 impressions over 30 items: most (user, item) pairs are shown more than once, with
    # the same true probabilities, so the oracle's scores tie and the tie rule shows in the 4th decimal.
    summary = synthesize(tmp_path, users=20, items=30, seed=5, images=False)
    frame = pl.read_parquet(tmp_path / "interactions.parquet")
    truth = pl.read_parquet(tmp_path / "truth.parquet")
    click, conversion = frame["click"].to_numpy() == 1, frame["conversion"].to_numpy() == 1
    p_click, p_conversion = truth["p_click"].to_numpy(), truth["p_conversion"].to_numpy()
    assert np.unique(p_click).size < p_click.size / 2

    def pairwise_auc(positive: np.ndarray, scores: np.ndarray) -> float:  # every (positive, negative) pair
        difference = scores[positive][:, None] - scores[~positive][None, :]
        return float(((difference > 0) + 0.5 * (difference == 0)).mean())

    assert summary["oracle_click_auc"] == pytest.approx(pairwise_auc(click, p_click), abs=5.1e-5)  # rounded to 4 decimals
    assert summary["oracle_conversion_auc"] == pytest.approx(pairwise_auc(conversion[click], p_conversion[click]), abs=5.1e-5)
    assert summary["oracle_ctcvr_auc"] == pytest.approx(pairwise_auc(conversion, p_click * p_conversion), abs=5.1e-5)


def test_oracle_auc_is_null_when_no_row_converts(tmp_path: Path) -> None:
    summary = synthesize(tmp_path, users=3, items=4, interactions=6, seed=1, images=False)
    assert pl.read_parquet(tmp_path / "interactions.parquet")["conversion"].sum() == 0
    assert summary["oracle_conversion_auc"] is None and summary["oracle_ctcvr_auc"] is None
    assert summary["oracle_click_auc"] is not None


def test_content_oracle_knows_less_than_the_oracle_but_far_more_than_chance(large: tuple[Path, dict]) -> None:
    clicks = pl.read_parquet(large[0] / "interactions.parquet")["click"].to_numpy()
    truth = pl.read_parquet(large[0] / "truth.parquet")
    full, content = m.auc(clicks, truth["p_click"].to_numpy()), m.auc(clicks, truth["p_click_content"].to_numpy())
    assert 0.6 < content < full - 0.02, (content, full)


def test_content_oracle_is_the_oracle_when_items_have_no_residual_and_one_popularity(tmp_path: Path) -> None:
    params = SynthParams(topic_share=0.6, visual_share=0.4, residual_share=0.0, popularity_sd=0.0, popularity_click=0.0)
    synthesize(tmp_path, users=50, items=40, interactions=2000, seed=5, images=False, params=params)
    truth = pl.read_parquet(tmp_path / "truth.parquet")
    assert np.allclose(truth["p_click_content"], truth["p_click"], atol=1e-6)
    items = pl.read_parquet(tmp_path / "truth_items.parquet")
    assert np.allclose(np.stack(items["content_latent"].to_numpy()), np.stack(items["latent"].to_numpy()), atol=1e-6)


@pytest.mark.parametrize("low, high", [(-0.5, 0.0), (0.0, 0.5), (0.5, 0.95)])
def test_higher_task_correlation_gives_more_correlated_click_and_conversion_logits(
    tmp_path: Path, low: float, high: float
) -> None:
    correlations = []
    for rho in (low, high):
        synthesize(tmp_path / str(rho), users=400, items=200, interactions=20_000, seed=2, images=False, task_correlation=rho)
        truth = pl.read_parquet(tmp_path / str(rho) / "truth.parquet")
        correlations.append(np.corrcoef(_logit(truth["p_click"].to_numpy()), _logit(truth["p_conversion"].to_numpy()))[0, 1])
    assert correlations[1] > correlations[0] + 0.2


# -- conversion reads an image-only taste and a text-only quality ---------------------------
def _truth_with(tmp_path: Path, name: str, **params: float) -> tuple[pl.DataFrame, dict]:
    """truth.parquet and the summary of 300 users x 300 items x 60k rows, seed 0, with ``params`` changed."""
    summary = synthesize(tmp_path / name, users=300, items=300, interactions=60_000, seed=0, images=False, params=SynthParams(**params))
    return pl.read_parquet(tmp_path / name / "truth.parquet"), summary


def _attributes_of_rows(out: Path, truth: pl.DataFrame) -> pl.DataFrame:
    """Each truth row with its item's texture and quality and its user's taste for that texture."""
    items = pl.read_parquet(out / "truth_items.parquet").select("item_id", "texture", "quality", "quality_grade")
    users = pl.read_parquet(out / "truth_users.parquet").select("user_id", "texture_taste")
    rows = truth.join(items, on="item_id", how="left", maintain_order="left").join(users, on="user_id", how="left", maintain_order="left")
    texture = rows["texture"].replace_strict({t: k for k, t in enumerate(TEXTURES)}, return_dtype=pl.Int64).to_numpy()
    return rows.with_columns(taste=pl.Series(np.stack(rows["texture_taste"].to_numpy())[np.arange(rows.height), texture]))


def test_conversion_logit_moves_by_the_users_taste_for_the_items_texture(tmp_path: Path) -> None:
    with_taste, _ = _truth_with(tmp_path, "default")
    without, _ = _truth_with(tmp_path, "no_taste", texture_conversion=0.0)
    rows = _attributes_of_rows(tmp_path / "default", with_taste)
    shift = _logit(with_taste["p_conversion"].to_numpy()) - _logit(without["p_conversion"].to_numpy())
    assert np.allclose(shift, SynthParams().texture_conversion * rows["taste"].to_numpy(), atol=1e-6)
    assert rows["taste"].std() > 0.5  # the taste varies over rows: the check above has something to see
    assert with_taste["p_click"].equals(without["p_click"]) and with_taste["rating_mean"].equals(without["rating_mean"])


def test_conversion_logit_rises_with_the_items_text_quality(tmp_path: Path) -> None:
    with_quality, _ = _truth_with(tmp_path, "default")
    without, _ = _truth_with(tmp_path, "no_quality", quality_conversion=0.0)
    rows = _attributes_of_rows(tmp_path / "default", with_quality)
    shift = _logit(with_quality["p_conversion"].to_numpy()) - _logit(without["p_conversion"].to_numpy())
    assert np.allclose(shift, SynthParams().quality_conversion * rows["quality"].to_numpy(), atol=1e-6)
    by_grade = rows.group_by("quality_grade").agg(pl.col("p_conversion").mean()).sort("quality_grade")
    assert by_grade["quality_grade"].to_list() == list(range(len(QUALITY_WORDS)))
    assert by_grade["p_conversion"].diff().drop_nulls().min() > 0  # every grade converts more than the one below


def test_the_taste_and_quality_terms_make_conversion_more_predictable_for_the_oracle(tmp_path: Path) -> None:
    _, default = _truth_with(tmp_path, "default")
    _, no_taste = _truth_with(tmp_path, "no_taste", texture_conversion=0.0)
    _, no_quality = _truth_with(tmp_path, "no_quality", quality_conversion=0.0)
    assert default["oracle_conversion_auc"] > no_taste["oracle_conversion_auc"] + 0.01, (default, no_taste)  # measured +0.017
    assert default["oracle_conversion_auc"] > no_quality["oracle_conversion_auc"] + 0.01, (default, no_quality)  # measured +0.017
    assert default["oracle_click_auc"] == no_taste["oracle_click_auc"] == no_quality["oracle_click_auc"]


def test_item_text_carries_words_of_its_quality_grade_and_of_no_other(small: tuple[Path, dict]) -> None:
    out = small[0]
    lexicon = pl.DataFrame({"word": [w for ws in QUALITY_WORDS for w in ws], "word_grade": [g for g, ws in enumerate(QUALITY_WORDS) for _ in ws]})
    words = (
        pl.read_parquet(out / "items.parquet")
        .select("item_id", pl.col("text").str.to_lowercase().str.replace_all(r"[^a-z ]", "").str.split(" ").alias("word"))
        .explode("word")
        .join(lexicon, on="word")
        .join(pl.read_parquet(out / "truth_items.parquet").select("item_id", "quality_grade"), on="item_id")
    )
    per_item = words.group_by("item_id").agg(pl.len(), (pl.col("word_grade") == pl.col("quality_grade")).all().alias("own_grade"))
    assert per_item.height == 120
    assert (per_item["len"] == SynthParams().quality_words).all() and per_item["own_grade"].all()


def test_quality_words_are_inserted_into_the_text_that_would_be_without_them(tmp_path: Path) -> None:
    synthesize(tmp_path / "words", users=10, items=50, seed=4, images=False)
    synthesize(tmp_path / "none", users=10, items=50, seed=4, images=False, params=SynthParams(quality_words=0))
    quality_words = {w for ws in QUALITY_WORDS for w in ws}
    with_words = pl.read_parquet(tmp_path / "words" / "items.parquet")["text"].to_list()
    without = pl.read_parquet(tmp_path / "none" / "items.parquet")["text"].to_list()
    assert not quality_words & {w.strip(".") for text in without for w in text.split()}
    stripped = [" ".join(w for w in text.split() if w.strip(".") not in quality_words) for text in with_words]
    assert [t.replace(".", "") for t in stripped] == [t.replace(".", "") for t in without]  # the other words, in their order


def test_texture_taste_is_centred_per_user_with_unit_variance(large: tuple[Path, dict]) -> None:
    taste = np.stack(pl.read_parquet(large[0] / "truth_users.parquet")["texture_taste"].to_numpy())
    assert taste.shape == (1500, len(TEXTURES))
    assert np.allclose(taste.sum(1), 0.0, atol=1e-9)
    assert 0.9 < taste.var() < 1.1


def test_quality_is_a_standardised_grade(large: tuple[Path, dict]) -> None:
    items = pl.read_parquet(large[0] / "truth_items.parquet")
    assert set(items["quality_grade"]) == set(range(len(QUALITY_WORDS)))
    assert items.group_by("quality_grade").agg(pl.col("quality").n_unique())["quality"].max() == 1  # one value per grade
    assert abs(items["quality"].mean()) < 0.15 and 0.85 < items["quality"].std() < 1.15


def test_quality_words_beyond_the_description_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="quality_words"):
        synthesize(tmp_path / "out", users=5, items=5, images=False, params=SynthParams(quality_words=13))


# -- cold start and content ----------------------------------------------------------------
def test_last_tenth_by_time_contains_items_never_seen_before(large: tuple[Path, dict]) -> None:
    frame = pl.read_parquet(large[0] / "interactions.parquet")
    cut = int(0.9 * frame.height)
    seen = frame.head(cut)["item_id"].unique().implode()
    cold = frame.tail(frame.height - cut).filter(~pl.col("item_id").is_in(seen))["item_id"].n_unique()
    assert cold >= 5
    assert cold == large[1]["cold_items_last_10pct"]


def test_images_decode_and_their_hue_is_the_item_hue(small: tuple[Path, dict]) -> None:
    out = small[0]
    truth = pl.read_parquet(out / "truth_items.parquet")
    image_hue = []
    for item_id in truth["item_id"]:
        hsv = np.asarray(Image.open(out / "images" / f"{item_id}.png").convert("HSV"), dtype=np.float64)
        assert hsv.shape == (64, 64, 3)
        angle = hsv[..., 0] / 256 * 2 * np.pi
        image_hue.append((np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi)) % 1)
    gap = np.abs(np.array(image_hue) - truth["hue"].to_numpy())
    assert np.minimum(gap, 1 - gap).max() < 0.03  # circular distance on the hue wheel


def test_patterned_images_vary_more_than_plain_ones(small: tuple[Path, dict]) -> None:
    out = small[0]
    truth = pl.read_parquet(out / "truth_items.parquet")
    spread = {
        item_id: np.asarray(Image.open(out / "images" / f"{item_id}.png").convert("L"), dtype=np.float64).std()
        for item_id in truth["item_id"]
    }
    plain = [spread[i] for i in truth.filter(pl.col("texture") == "plain")["item_id"]]
    patterned = [spread[i] for i in truth.filter(pl.col("texture") != "plain")["item_id"]]
    assert set(truth["texture"]) == set(TEXTURES)
    assert max(plain) < min(patterned)


def test_item_text_is_dominated_by_its_topic_words(small: tuple[Path, dict]) -> None:
    out = small[0]
    lexicon = pl.DataFrame(
        {"word": [w for t in TOPIC_WORDS for w in TOPIC_WORDS[t]], "word_topic": [t for t in TOPIC_WORDS for _ in TOPIC_WORDS[t]]}
    )
    words = (
        pl.read_parquet(out / "items.parquet")
        .select("item_id", pl.col("text").str.to_lowercase().str.replace_all(r"[^a-z ]", "").str.split(" ").alias("word"))
        .explode("word")
        .join(lexicon, on="word")
    )
    dominant = (
        words.group_by("item_id", "word_topic").len().sort("len", "word_topic", descending=True).group_by("item_id").first()
    )
    topics = pl.read_parquet(out / "truth_items.parquet").select("item_id", "topic")
    matched = dominant.join(topics, on="item_id")
    assert matched.height == 120
    assert (matched["word_topic"] == matched["topic"]).all()


# -- arguments and the command line --------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"users": 0}, "--users"),
        ({"items": -3}, "--items"),
        ({"interactions": 0}, "--interactions"),
        ({"task_correlation": 1.5}, "--task-correlation"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_bad_arguments_raise_data_error_naming_the_argument(tmp_path: Path, kwargs: dict, named: str) -> None:
    arguments = {"users": 5, "items": 5, "images": False} | kwargs
    with pytest.raises(DataError, match=named):
        synthesize(tmp_path / "out", **arguments)


def test_out_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("not a directory")
    with pytest.raises(DataError, match="not a directory"):
        synthesize(target, users=5, items=5, images=False)


def test_cli_data_synth_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["-q", "data", "synth", "--out", str(tmp_path / "d"), "--users", "12", "--items", "9", "--no-images"])
    assert code == 0
    assert pl.read_parquet(tmp_path / "d" / "interactions.parquet").height == 12 * 50
    assert '"interactions": 600' in capsys.readouterr().out


def test_cli_reports_bad_sizes_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["-q", "data", "synth", "--out", str(tmp_path / "d"), "--users", "0"])
    assert code == 2
    assert "--users must be a positive integer" in capsys.readouterr().err
