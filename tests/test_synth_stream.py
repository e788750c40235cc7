"""The synthetic stream (``recsys data synth --days``) and windows over its days (``recsys data window``)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.dataset import load_dataset
from features.synth import DAY_S, SynthParams, synthesize
from features.synth_stream import DEFAULT_DRIFT, day_dir, synthesize_stream
from features.window import assemble_window, parse_days
from recsys.cli import main as cli_main
from recsys.config import DataConfig
from recsys.errors import ConfigError, DataError

DAYS = 10
START_S = SynthParams().start_s


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 days, 300 users, 150 items, 2,000 impressions a day, default drift, no images."""
    out = tmp_path_factory.mktemp("stream")
    synthesize_stream(out, days=DAYS, users=300, items=150, interactions=20_000, seed=4, images=False)
    return out


def _day(root: Path, day: int, name: str) -> pl.DataFrame:
    return pl.read_parquet(day_dir(root, day) / name)


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (day links followed once: the shared images are counted there)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file() and not p.parent.is_symlink()}


def _latents(root: Path, day: int) -> pl.DataFrame:
    return _day(root, day, "truth_users.parquet").select("user_id", "latent")


# -- day directories -----------------------------------------------------------------------
def test_same_arguments_write_byte_identical_streams(tmp_path: Path) -> None:
    for name in ("a", "b"):
        synthesize_stream(tmp_path / name, days=3, users=20, items=12, interactions=90, seed=5, images=True)
    digests = {name: _digests(tmp_path / name) for name in ("a", "b")}
    assert len(digests["a"]) == 1 + 3 * 7 + 12  # stream.json, 7 files a day, one PNG per item
    assert digests["a"] == digests["b"]


def test_every_day_directory_passes_the_dataset_loader(stream: Path) -> None:
    counts = {d["day"]: d for d in json.loads((stream / "stream.json").read_text())["days"]}
    for day in range(1, DAYS + 1):
        dataset = load_dataset(day_dir(stream, day), DataConfig())
        assert dataset.has_click and dataset.has_conversion and not dataset.has_split
        assert dataset.rows == counts[day]["interactions"] == 2_000
        assert dataset.items.collect().height == counts[day]["items"]


def test_items_and_users_are_never_impressed_before_they_arrive(stream: Path) -> None:
    for day in range(1, DAYS + 1):
        rows = _day(stream, day, "interactions.parquet")
        items = _day(stream, day, "truth_items.parquet").select("item_id", "created_at")
        users = _day(stream, day, "truth_users.parquet").select("user_id", "arrived_at")
        joined = rows.join(items, on="item_id", how="left").join(users, on="user_id", how="left")
        assert joined["created_at"].null_count() == 0 and joined["arrived_at"].null_count() == 0  # in that day's files
        assert (joined["created_at"] <= joined["timestamp"]).all()
        assert (joined["arrived_at"] <= joined["timestamp"]).all()


def test_every_days_catalogue_and_users_contain_the_previous_days(stream: Path) -> None:
    for day in range(2, DAYS + 1):
        for name, column in (("items.parquet", "item_id"), ("users.parquet", "user_id")):
            before = set(_day(stream, day - 1, name)[column])
            assert before <= set(_day(stream, day, name)[column])
    first_items, last_items = _day(stream, 1, "items.parquet").height, _day(stream, DAYS, "items.parquet").height
    first_users, last_users = _day(stream, 1, "users.parquet").height, _day(stream, DAYS, "users.parquet").height
    assert 0.7 * 150 <= first_items < last_items <= 150  # a share exists at day 1, the rest arrives
    assert 0.7 * 300 <= first_users < last_users <= 300


def test_timestamps_of_day_k_lie_inside_day_k_and_increase_across_days(stream: Path) -> None:
    timestamps = []
    for day in range(1, DAYS + 1):
        ts = _day(stream, day, "interactions.parquet")["timestamp"]
        assert ts.min() >= START_S + (day - 1) * DAY_S and ts.max() < START_S + day * DAY_S
        timestamps.append(ts)
    assert pl.concat(timestamps).is_sorted()


def test_truth_rows_align_with_each_days_interactions(stream: Path) -> None:
    for day in (1, DAYS):
        keys = ["user_id", "item_id", "timestamp"]
        assert _day(stream, day, "truth.parquet").select(keys).equals(_day(stream, day, "interactions.parquet").select(keys))


def test_day_one_latents_are_those_of_the_one_shot_generator(tmp_path: Path) -> None:
    synthesize_stream(tmp_path / "s", days=2, users=40, items=30, interactions=100, seed=7, images=False)
    synthesize(tmp_path / "o", users=40, items=30, interactions=100, seed=7, images=False)
    one_shot = pl.read_parquet(tmp_path / "o" / "truth_users.parquet").select("user_id", "latent")
    day_one = _latents(tmp_path / "s", 1)
    assert day_one.equals(one_shot.join(day_one.select("user_id"), on="user_id", how="semi"))


# -- drift ---------------------------------------------------------------------------------
def test_drift_correlates_day_one_and_day_ten_latents_as_the_walk_says(tmp_path: Path) -> None:
    drift = 0.3
    synthesize_stream(tmp_path, days=DAYS, users=1500, items=20, interactions=DAYS, seed=2, drift=drift, images=False)
    first = _latents(tmp_path, 1)
    last = _latents(tmp_path, DAYS).join(first.select("user_id"), on="user_id", how="semi")  # same users, same order
    assert first["user_id"].equals(last["user_id"])
    a, b = np.stack(first["latent"].to_numpy()).ravel(), np.stack(last["latent"].to_numpy()).ravel()
    expected = math.sqrt(1 - drift**2) ** (DAYS - 1)  # 0.65
    assert np.corrcoef(a, b)[0, 1] == pytest.approx(expected, abs=0.03)
    assert np.var(b) == pytest.approx(np.var(a), rel=0.1)  # the walk keeps the scale


def test_zero_drift_leaves_latents_equal_every_day(tmp_path: Path) -> None:
    synthesize_stream(tmp_path, days=DAYS, users=50, items=20, interactions=DAYS, seed=2, drift=0.0, images=False)
    first = _latents(tmp_path, 1)
    assert _latents(tmp_path, DAYS).join(first.select("user_id"), on="user_id", how="semi").equals(first)


def test_stream_json_drift_check_shows_stale_latents_score_worse(stream: Path) -> None:
    summary = json.loads((stream / "stream.json").read_text())
    check = summary["drift_check"]
    assert summary["stream"]["drift"] == DEFAULT_DRIFT
    assert (check["day"], check["yesterday_day"], check["stale_day"]) == (10, 9, 7)
    assert check["stale_click_auc"] < check["yesterday_click_auc"] < check["fresh_click_auc"]
    assert check["fresh_click_auc"] - check["stale_click_auc"] >= 0.01
    assert check["fresh_click_auc"] == summary["days"][-1]["oracle_click_auc"]


# -- windows -------------------------------------------------------------------------------
def test_window_splits_hold_exactly_the_rows_of_the_named_days(stream: Path, tmp_path: Path) -> None:
    code = cli_main(["-q", "data", "window", "--source", str(stream), "--train", "1-7", "--valid", "7", "--test", "8,9", "--out", str(tmp_path)])
    assert code == 0
    window = pl.read_parquet(tmp_path / "interactions.parquet")
    for split, days in (("train", range(1, 7)), ("valid", [7]), ("test", [8, 9])):
        expected = pl.concat([_day(stream, d, "interactions.parquet") for d in days])
        assert window.filter(pl.col("split") == split).drop("split").equals(expected)
    assert window.height == 9 * 2_000
    truth = pl.read_parquet(tmp_path / "truth.parquet")
    assert truth.equals(pl.concat([_day(stream, d, "truth.parquet") for d in range(1, 10)]))
    assert pl.read_parquet(tmp_path / "items.parquet").equals(_day(stream, 9, "items.parquet"))
    assert pl.read_parquet(tmp_path / "users.parquet").equals(_day(stream, 9, "users.parquet"))
    assert load_dataset(tmp_path, DataConfig()).has_split


@pytest.mark.parametrize(
    ("train", "valid", "test", "error", "named"),
    [
        ("1-7", None, "11", DataError, "day 11 needs"),
        ("1-7", None, "7-8", ConfigError, r"share day\(s\) \[7\]"),
        ("1-5", "6", "6", ConfigError, "--valid 6 and --test 6 share"),
        ("5-3", None, "8", ConfigError, "is empty"),
        ("3", "3", "4", ConfigError, "leaves no day"),
        ("1-x", None, "8", ConfigError, "not a day or a range"),
    ],
)
def test_window_refuses_missing_days_overlaps_and_empty_ranges(
    stream: Path, tmp_path: Path, train: str, valid: str | None, test: str, error: type, named: str
) -> None:
    with pytest.raises(error, match=named):
        assemble_window(stream, tmp_path / "w", train=train, test=test, valid=valid)
    assert not (tmp_path / "w").exists()


def test_day_ranges_parse_into_sorted_distinct_days() -> None:
    assert parse_days("1-3,5", "--train") == [1, 2, 3, 5]
    assert parse_days("8, 9,8", "--test") == [8, 9]
    assert parse_days(" 7 ", "--valid") == [7]


def test_images_are_shared_by_the_days_and_the_window(tmp_path: Path) -> None:
    synthesize_stream(tmp_path / "s", days=3, users=20, items=12, interactions=60, seed=1, images=True)
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 12  # rendered once
    assemble_window(tmp_path / "s", tmp_path / "w", train="1-2", test="3")
    for dataset in (day_dir(tmp_path / "s", 1), day_dir(tmp_path / "s", 3), tmp_path / "w"):
        paths = load_dataset(dataset, DataConfig()).items.collect()["image"]
        assert paths.str.starts_with("images/").all()
        assert all((dataset / p).is_file() for p in paths)


# -- command line --------------------------------------------------------------------------
def test_cli_synth_days_writes_day_directories_and_stream_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["-q", "data", "synth", "--days", "3", "--out", str(tmp_path), "--users", "12", "--items", "9", "--interactions", "31", "--no-images", "--drift", "0.5"])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day01", "day02", "day03", "stream.json"]
    summary = json.loads((tmp_path / "stream.json").read_text())
    assert summary["stream"]["drift"] == 0.5
    assert [d["interactions"] for d in summary["days"]] == [11, 10, 10]
    assert '"drift_check"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--days", "0"], "--days must be an integer in"),
        (["--days", "100"], "--days must be an integer in"),
        (["--days", "3", "--drift", "1.5"], "--drift must lie in"),
        (["--drift", "0.2"], "--drift .* needs --days"),
        (["--days", "5", "--interactions", "4"], "some of the 5 days no row"),
    ],
)
def test_cli_refuses_bad_stream_arguments_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], named: str) -> None:
    code = cli_main(["-q", "data", "synth", "--out", str(tmp_path / "d"), "--users", "5", "--items", "5", "--no-images", *argv])
    assert code == 2
    assert re.search(named, capsys.readouterr().err)
