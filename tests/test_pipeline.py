"""``recsys prepare``: histories without leakage, splits, labels, negatives, vocabularies, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.pipeline import prepare, sample_negatives, with_history
from recsys.config import load_config
from recsys.errors import DataError
from recsys.rundir import RunDir


# -- helpers -------------------------------------------------------------------------------
def make_run(tmp_path: Path, interactions: dict, items: dict | None = None, users: dict | None = None, **overrides: str) -> RunDir:
    """Write a dataset and start a run on it with ``data.<key>=value`` overrides."""
    data = tmp_path / "dataset"
    data.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(interactions).write_parquet(data / "interactions.parquet")
    items = items or {"item_id": sorted(set(interactions["item_id"]))}
    pl.DataFrame(items).write_parquet(data / "items.parquet")
    if users is not None:
        pl.DataFrame(users).write_parquet(data / "users.parquet")
    cfg = load_config(None, [f"data.{k}={v}" for k, v in overrides.items()])
    return RunDir.create(tmp_path / "run", cfg, data)


def read_split(run: RunDir, name: str) -> pl.DataFrame:
    return pl.read_parquet(run.data / f"{name}.parquet")


def all_rows(run: RunDir) -> pl.DataFrame:
    return pl.concat([read_split(run, name).with_columns(split=pl.lit(name)) for name in ("train", "valid", "test")])


def random_events(seed: int, rows: int = 400, users: int = 7, items: int = 30, times: int = 12) -> pl.DataFrame:
    """Few distinct timestamps so that ties are everywhere."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame({
        "user_idx": rng.integers(1, users + 1, rows),
        "item_idx": rng.integers(1, items + 1, rows),
        "timestamp": rng.integers(0, times, rows),
        "click": (rng.random(rows) < 0.6).astype(np.int8),
    })


def brute_force_history(events: pl.DataFrame, history_len: int) -> list[list[int]]:
    """Per row (in ``events`` order): last L clicked items of the same user with a smaller timestamp."""
    rows = events.rows(named=True)
    histories = []
    for row in rows:
        earlier = [(r["timestamp"], i, r["item_idx"]) for i, r in enumerate(rows)
                   if r["user_idx"] == row["user_idx"] and r["click"] == 1 and r["timestamp"] < row["timestamp"]]
        histories.append([item for _, _, item in sorted(earlier)][-history_len:] if history_len else [])
    return histories


# -- history -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_history_equals_brute_force_on_random_data_with_ties(seed: int) -> None:
    events = random_events(seed).with_row_index("row")
    result = with_history(events, history_len=4).sort("row")
    assert result["history"].to_list() == brute_force_history(events, 4)


@pytest.mark.parametrize("seed", range(5))
def test_history_items_are_earlier_clicks_of_the_same_user(seed: int) -> None:
    events = random_events(seed, rows=600, items=400)  # few repeated items, so item -> event is mostly unique
    result = with_history(events, history_len=50)
    clicks = events.filter(pl.col("click") == 1)
    for row in result.iter_rows(named=True):
        mine = clicks.filter(pl.col("user_idx") == row["user_idx"], pl.col("item_idx").is_in(row["history"]))
        assert mine["item_idx"].n_unique() == len(set(row["history"]))  # every history item is this user's click
        assert (mine.group_by("item_idx").agg(pl.col("timestamp").min())["timestamp"] < row["timestamp"]).all()


def test_history_never_contains_the_event_itself() -> None:
    events = pl.DataFrame({"user_idx": [1, 1, 1], "item_idx": [5, 6, 7], "timestamp": [1, 2, 3], "click": [1, 1, 1]})
    assert with_history(events, 10)["history"].to_list() == [[], [5], [5, 6]]


def test_tied_timestamps_are_excluded_both_ways() -> None:
    events = pl.DataFrame({"user_idx": [1, 1, 1, 1], "item_idx": [4, 5, 6, 7], "timestamp": [1, 2, 2, 3], "click": [1, 1, 1, 1]})
    assert with_history(events, 10)["history"].to_list() == [[], [4], [4], [4, 5, 6]]


def test_history_keeps_the_last_L_oldest_first() -> None:
    events = pl.DataFrame({"user_idx": [1] * 6, "item_idx": [10, 11, 12, 13, 14, 15], "timestamp": [6, 5, 4, 3, 2, 1], "click": [1] * 6})
    result = with_history(events, 3)
    # before t=6 the user clicked 15, 14, 13, 12, 11 (t=1..5): keep the latest 3, oldest first
    assert result.filter(pl.col("timestamp") == 6)["history"].to_list() == [[13, 12, 11]]
    assert result["history"].list.len().max() == 3


def test_unclicked_events_and_other_users_never_enter_history() -> None:
    events = pl.DataFrame({"user_idx": [1, 2, 1, 1], "item_idx": [3, 4, 5, 6], "timestamp": [1, 1, 2, 3], "click": [0, 1, 1, 0]})
    result = with_history(events, 10).sort("user_idx", "timestamp")
    assert result["history"].to_list() == [[], [], [5], []]


# -- the leak-free rule: splits at or before a row's own -------------------------------------
VISIBLE = {0: {0}, 1: {0, 1}, 2: {0, 1}}  # train sees train; valid and test see train + valid


def brute_force_visible_history(rows: list[dict], history_len: int) -> list[list[int]]:
    """Per row: the last L clicks of the same user, strictly earlier, from a split the row may see."""
    out = []
    for row in rows:
        earlier = sorted(
            (r["timestamp"], r["seq"], r["item_idx"]) for r in rows
            if r["user_idx"] == row["user_idx"] and r["click"] == 1 and r["timestamp"] < row["timestamp"] and r["split"] in VISIBLE[row["split"]]
        )
        out.append([item for _, _, item in earlier][-history_len:])
    return out


events_with_splits = st.integers(1, 60).flatmap(lambda n: st.fixed_dictionaries({
    "user_idx": st.lists(st.integers(1, 4), min_size=n, max_size=n),
    "item_idx": st.lists(st.integers(1, 9), min_size=n, max_size=n),
    "timestamp": st.lists(st.integers(0, 5), min_size=n, max_size=n),  # few times: ties everywhere
    "click": st.lists(st.integers(0, 1), min_size=n, max_size=n),
    "split": st.lists(st.integers(0, 2), min_size=n, max_size=n),  # a random split: test events among train ones
}))


@settings(max_examples=150, deadline=None)
@given(events=events_with_splits, history_len=st.integers(1, 6))
def test_history_holds_only_earlier_events_of_visible_splits(events, history_len):
    frame = pl.DataFrame(events).with_row_index("seq")
    result = with_history(frame, history_len).sort("seq")
    assert result["history"].to_list() == brute_force_visible_history(frame.rows(named=True), history_len)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=events_with_splits, negatives=st.integers(0, 2))
def test_prepared_train_rows_never_see_valid_or_test_events(tmp_path_factory, events, negatives):
    """Through ``recsys prepare`` with a given random split: histories and negative exclusions of train rows."""
    tmp = tmp_path_factory.mktemp("leak")
    names = np.array(["train", "valid", "test"])
    events["split"][0] = 0  # prepare refuses a split without train rows
    events["click"][0] = 1
    interactions = {
        "user_id": [f"u{u}" for u in events["user_idx"]], "item_id": [f"i{i}" for i in events["item_idx"]],
        "timestamp": events["timestamp"], "split": names[events["split"]].tolist(),
    }
    if negatives == 0:  # impressions: clicks given
        interactions["click"] = events["click"]
    items = {"item_id": [f"i{i}" for i in range(1, 13)]}  # more items than the events use: room for negatives
    run = make_run(tmp, interactions, items, split="given", negatives_per_positive=str(max(negatives, 1)), history_len="100")
    prepare(run)
    rows = all_rows(run).with_columns(split=pl.col("split").replace_strict({"train": 0, "valid": 1, "test": 2}, return_dtype=pl.Int64))
    real = rows.filter(~pl.col("sampled"))
    clicks = real.filter(pl.col("click") == 1).rows(named=True)
    for row in rows.iter_rows(named=True):  # sampled negatives too: they carry their positive's history
        visible = [c["item_idx"] for c in clicks if c["user_idx"] == row["user_idx"] and c["timestamp"] < row["timestamp"] and c["split"] in VISIBLE[row["split"]]]
        assert sorted(row["history"]) == sorted(visible), row  # no cut at L = 100: the whole visible past
    positives = real.filter(pl.col("click") == 1)
    for code in (0, 1, 2):
        known = positives.filter(pl.col("split") <= code).select("user_idx", "item_idx").unique()
        sampled = rows.filter(pl.col("sampled") & (pl.col("split") == code))
        assert len(sampled.join(known, on=["user_idx", "item_idx"], how="semi")) == 0


# -- negative sampling ---------------------------------------------------------------------
def test_negatives_never_include_a_positive_of_that_user() -> None:
    popularity = np.array([0, 50, 40, 30, 20, 10, 5])
    positive_users, positive_items = np.array([1, 1, 1, 2]), np.array([1, 2, 3, 1])
    rows, items = sample_negatives(np.array([1, 2, 1]), positive_users, positive_items, popularity, per_row=200, alpha=1.0, seed=0)
    users = np.array([1, 2, 1])[rows]
    assert len(items) == 600
    assert not np.isin(items[users == 1], [1, 2, 3]).any() and not np.isin(items[users == 2], [1]).any()
    assert (items >= 1).all()


def test_negatives_follow_popularity_to_the_power_alpha() -> None:
    popularity = np.array([0, 1, 100, 400, 900, 1600])
    _, items = sample_negatives(np.array([7]), np.array([7]), np.array([1]), popularity, per_row=40_000, alpha=0.5, seed=1)
    expected = np.sqrt(popularity[2:]) / np.sqrt(popularity[2:]).sum()  # item 1 is the user's positive
    observed = np.bincount(items, minlength=6)[2:] / len(items)
    np.testing.assert_allclose(observed, expected, atol=0.01)


def test_user_who_has_every_item_gets_no_negatives() -> None:
    rows, items = sample_negatives(np.array([1]), np.array([1, 1]), np.array([1, 2]), np.array([0, 3, 3]), per_row=4, alpha=1.0, seed=0)
    assert len(rows) == len(items) == 0


def test_negative_sampling_is_seeded() -> None:
    args = (np.array([1, 2]), np.array([1]), np.array([1]), np.array([0, 5, 4, 3, 2]), 10, 0.75)
    assert (sample_negatives(*args, seed=3)[1] == sample_negatives(*args, seed=3)[1]).all()
    assert (sample_negatives(*args, seed=3)[1] != sample_negatives(*args, seed=4)[1]).any()


# -- prepare end to end --------------------------------------------------------------------
IMPRESSIONS = {
    "user_id": ["a", "a", "a", "b", "b", "c", "c", "c", "c", "a"],
    "item_id": [1, 2, 3, 1, 4, 2, 3, 4, 5, 5],
    "timestamp": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    "click": [1, 0, 1, 1, 1, 1, 0, 1, 1, 1],
}


def test_temporal_split_has_no_test_event_before_any_train_event(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    interactions = {"user_id": rng.integers(0, 20, 500), "item_id": rng.integers(0, 50, 500), "timestamp": rng.integers(0, 60, 500)}
    run = make_run(tmp_path, interactions, split="temporal", valid_fraction="0.1", test_fraction="0.2")
    prepare(run)
    train, valid, test = (read_split(run, name) for name in ("train", "valid", "test"))
    assert train["timestamp"].max() < valid["timestamp"].min() <= valid["timestamp"].max() < test["timestamp"].min()
    positives = [len(part.filter(~pl.col("sampled"))) for part in (train, valid, test)]
    assert sum(positives) == 500 and 0.15 < positives[2] / 500 < 0.3


def test_given_split_is_respected(tmp_path: Path) -> None:
    interactions = {**IMPRESSIONS, "split": ["test", "train", "train", "valid", "train", "train", "test", "train", "valid", "train"]}
    run = make_run(tmp_path, interactions)
    summary = prepare(run)
    rows = all_rows(run).sort("timestamp")
    assert rows["split"].to_list() == interactions["split"]
    assert summary["split"] == "given"


def test_leave_last_puts_each_users_last_event_in_test(tmp_path: Path) -> None:
    run = make_run(tmp_path, IMPRESSIONS, split="leave_last", leave_last_n="1")
    prepare(run)
    test, valid = read_split(run, "test"), read_split(run, "valid")
    assert sorted(test.select("user_id", "timestamp").rows()) == [("a", 10), ("b", 5), ("c", 9)]
    assert sorted(valid.select("user_id", "timestamp").rows()) == [("a", 3), ("b", 4), ("c", 8)]


def test_output_history_matches_brute_force_across_splits(tmp_path: Path) -> None:
    run = make_run(tmp_path, IMPRESSIONS, history_len="2", split="leave_last")
    prepare(run)
    rows = all_rows(run).sort("user_idx", "timestamp")
    expected = brute_force_history(rows.select("user_idx", "item_idx", "timestamp", "click"), 2)
    assert rows["history"].to_list() == expected
    assert rows.filter(pl.col("user_id") == "a", pl.col("timestamp") == 10)["history"].to_list() == [[1, 3]]


def test_vocabulary_index_0_is_never_used_by_real_ids(tmp_path: Path) -> None:
    items = {"item_id": [1, 2, 3, 4, 5, 6], "genre": ["x", "y", None, "x", "y", "z"]}
    run = make_run(tmp_path, IMPRESSIONS, items=items)
    prepare(run)
    users, items_out, rows = pl.read_parquet(run.data / "users.parquet"), pl.read_parquet(run.data / "items.parquet"), all_rows(run)
    assert users["user_idx"].to_list() == [1, 2, 3] and items_out["item_idx"].to_list() == [1, 2, 3, 4, 5, 6]
    assert rows["user_idx"].min() >= 1 and rows["item_idx"].min() >= 1
    assert rows["history"].explode().drop_nulls().min() >= 1
    assert items_out["cat_genre"].to_list() == [1, 2, 0, 1, 2, 3]  # 0 = unknown (null)


def test_items_table_has_every_catalogue_item_with_absolute_image_paths(tmp_path: Path) -> None:
    items = {"item_id": [1, 2, 3, 4, 5, 9], "text": ["t1", None, "t3", "t4", "t5", "cold"], "image": ["i/1.png", None, "", "i/4.png", "i/5.png", "i/9.png"]}
    run = make_run(tmp_path, IMPRESSIONS, items=items)
    summary = prepare(run)
    table = pl.read_parquet(run.data / "items.parquet")
    root = (tmp_path / "dataset").resolve()
    assert table["item_id"].to_list() == [1, 2, 3, 4, 5, 9]
    assert table["image"].to_list() == [f"{root}/i/1.png", None, None, f"{root}/i/4.png", f"{root}/i/5.png", f"{root}/i/9.png"]
    assert table["text"].to_list() == items["text"]
    assert summary["cold_items"] == 1


def test_numeric_features_are_standardised_with_nulls_zero(tmp_path: Path) -> None:
    users = {"user_id": ["a", "b", "z"], "age": [20.0, 40.0, None]}
    run = make_run(tmp_path, IMPRESSIONS, users=users)
    prepare(run)
    table = pl.read_parquet(run.data / "users.parquet")
    assert table["user_id"].to_list() == ["a", "b", "c", "z"]  # users only in users.parquet are in the vocabulary too
    assert table["num_age"].to_list() == [-1.0, 1.0, 0.0, 0.0] and table["num_age"].dtype == pl.Float32


def test_meta_json_describes_the_data(tmp_path: Path) -> None:
    interactions = {**IMPRESSIONS, "rating": [5.0, None, 2.0, 4.0, 3.0, 1.0, None, 5.0, 4.0, 2.0]}
    run = make_run(tmp_path, interactions, items={"item_id": [1, 2, 3, 4, 5], "genre": ["a", "b", "a", "c", "b"]}, history_len="7")
    prepare(run)
    meta = json.loads((run.data / "meta.json").read_text())
    assert meta["n_users"] == 4 and meta["n_items"] == 6 and meta["history_len"] == 7 and meta["impressions"] is True
    assert meta["tasks"] == {"click": True, "conversion": True, "rating": True}
    assert meta["item_features"] == {"cat_genre": 4} and meta["user_features"] == {}
    assert meta["rows"] == {name: len(read_split(run, name)) for name in ("train", "valid", "test")}
    assert meta["split"] == "temporal" and meta["rating_range"] == [1.0, 5.0]


def test_conversion_is_derived_from_rating_when_there_is_no_conversion_column(tmp_path: Path) -> None:
    interactions = {**IMPRESSIONS, "rating": [5.0, 5.0, 2.0, 4.0, None, 1.0, None, 5.0, 4.0, 2.0]}
    run = make_run(tmp_path, interactions, conversion_from_rating="4")
    prepare(run)
    rows = all_rows(run).sort("timestamp")
    # clicked and rated >= 4; the unclicked row rated 5 (timestamp 2) does not convert
    assert rows["conversion"].to_list() == [1, 0, 0, 1, 0, 0, 0, 1, 1, 0]


def test_conversion_task_is_off_without_conversion_or_rating(tmp_path: Path) -> None:
    run = make_run(tmp_path, IMPRESSIONS)
    summary = prepare(run)
    assert summary["tasks"] == {"click": True, "conversion": False, "rating": False}
    assert "conversion" not in read_split(run, "train").columns and "rating" not in read_split(run, "train").columns


def test_negatives_share_the_positive_timestamp_and_history(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    interactions = {"user_id": rng.integers(0, 10, 200), "item_id": rng.integers(0, 60, 200), "timestamp": rng.integers(0, 40, 200),
                    "rating": rng.integers(1, 6, 200).astype(float)}
    run = make_run(tmp_path, interactions, negatives_per_positive="3")
    summary = prepare(run)
    rows = all_rows(run)
    negatives, positives = rows.filter(pl.col("sampled")), rows.filter(~pl.col("sampled"))
    assert len(negatives) == 3 * len(positives) == 600 and summary["negatives"] == {"sampled": 600, "unavailable": 0}
    assert (negatives["click"] == 0).all() and (negatives["conversion"] == 0).all() and negatives["rating"].is_null().all()
    assert (positives["click"] == 1).all()
    code = {"train": 0, "valid": 1, "test": 2}
    for split, level in code.items():  # a negative is never a positive of the user in its split or an earlier one
        known = positives.filter(pl.col("split").replace_strict(code, return_dtype=pl.Int64) <= level).select("user_idx", "item_idx").unique()
        assert len(negatives.filter(pl.col("split") == split).join(known, on=["user_idx", "item_idx"], how="semi")) == 0, split
    per_event = rows.group_by("user_idx", "timestamp", "split").agg(pl.col("history").unique().len())
    assert (per_event["history"] == 1).all()  # a negative carries exactly its positive's history


def test_unknown_items_are_dropped_counted_and_quarantined(tmp_path: Path) -> None:
    run = make_run(tmp_path, IMPRESSIONS, items={"item_id": [1, 2, 3, 4]}, unknown_items="drop")
    summary = prepare(run)
    assert summary["dropped"] == {"unknown_item": 2} and summary["rows_in"] == 10
    assert sum(summary["rows_out"].values()) == 8
    assert pl.read_parquet(run.quarantine / "interactions.parquet")["item_id"].to_list() == [5, 5]


def test_split_that_leaves_train_empty_is_an_error(tmp_path: Path) -> None:
    run = make_run(tmp_path, {**IMPRESSIONS, "split": ["test"] * 10})
    with pytest.raises(DataError, match="0 rows in train"):
        prepare(run)


def test_prepare_is_deterministic_under_seed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    interactions = {"user_id": rng.integers(0, 30, 400), "item_id": rng.integers(0, 80, 400), "timestamp": rng.integers(0, 50, 400)}
    first, second, other = (make_run(tmp_path / name, interactions, seed=seed) for name, seed in (("1", "7"), ("2", "7"), ("3", "8")))
    for run in (first, second, other):
        prepare(run)
    for name in ("train", "valid", "test"):
        assert read_split(first, name).equals(read_split(second, name))
    assert not read_split(first, "train").equals(read_split(other, "train"))


def test_cli_prepare_reports_bad_data_as_a_message_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.cli import main

    run = make_run(tmp_path, {**IMPRESSIONS, "click": [1, 0, 1, 1, 1, 1, 0, 1, 1, 3]})
    assert main(["-q", "prepare", "--run", str(run.root)]) == 2
    err = capsys.readouterr().err
    assert "interactions.parquet, column 'click': 1 of 10 rows" in err and "Traceback" not in err
