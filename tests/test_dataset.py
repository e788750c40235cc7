"""The dataset contract: every violation is a DataError naming file, column and row count."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from features.dataset import load_dataset
from recsys.config import DataConfig
from recsys.errors import DataError


def write_dataset(root: Path, interactions: dict | None = None, items: dict | None = None, users: dict | None = None) -> Path:
    """A valid 4-row dataset; pass column dicts to replace a file's content."""
    root.mkdir(parents=True, exist_ok=True)
    interactions = interactions if interactions is not None else {
        "user_id": ["u1", "u1", "u2", "u2"],
        "item_id": [1, 2, 1, 3],
        "timestamp": [10, 20, 10, 30],
        "click": [1, 0, 1, 1],
        "conversion": [1, 0, 0, 1],
        "rating": [5.0, None, 3.0, 4.0],
    }
    items = items if items is not None else {"item_id": [1, 2, 3], "text": ["a", "b", "c"], "image": ["img/1.png", None, "img/3.png"]}
    pl.DataFrame(interactions).write_parquet(root / "interactions.parquet")
    pl.DataFrame(items).write_parquet(root / "items.parquet")
    if users is not None:
        pl.DataFrame(users).write_parquet(root / "users.parquet")
    return root


def with_column(**changes: list) -> dict:
    base = {
        "user_id": ["u1", "u1", "u2", "u2"],
        "item_id": [1, 2, 1, 3],
        "timestamp": [10, 20, 10, 30],
        "click": [1, 0, 1, 1],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def error_for(root: Path, cfg: DataConfig | None = None) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(root, cfg or DataConfig())
    return str(info.value)


def test_valid_dataset_reports_what_it_has(tmp_path: Path) -> None:
    ds = load_dataset(write_dataset(tmp_path), DataConfig())
    assert (ds.has_click, ds.has_conversion, ds.has_rating, ds.has_split, ds.has_text, ds.has_image) == (True, True, True, False, True, True)
    assert ds.rows_in == ds.rows == 4
    assert ds.interactions.collect_schema()["click"] == pl.Int8
    assert ds.interactions.collect()["timestamp"].to_list() == [10, 20, 10, 30]


def test_missing_interactions_file_is_an_error(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    (tmp_path / "interactions.parquet").unlink()
    message = error_for(tmp_path)
    assert "interactions.parquet" in message and "missing" in message


def test_missing_required_column_names_file_and_column(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, interactions=with_column(timestamp=None)))
    assert "interactions.parquet, column 'timestamp'" in message and "4 of 4 rows" in message


def test_timestamp_that_is_not_integer_is_rejected(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, interactions=with_column(timestamp=[1.5, 2.0, 3.0, 4.0])))
    assert "column 'timestamp'" in message and "4 of 4 rows" in message and "Float64" in message


def test_click_outside_0_1_is_counted(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, interactions=with_column(click=[1, 2, 7, 0])))
    assert "interactions.parquet, column 'click': 2 of 4 rows are not 0 or 1" in message


def test_null_user_ids_are_counted(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, interactions=with_column(user_id=["u1", None, None, None])))
    assert "interactions.parquet, column 'user_id': 3 of 4 rows are null" in message


def test_duplicate_item_ids_are_counted(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, items={"item_id": [1, 2, 3, 3, 3]}))
    assert "items.parquet, column 'item_id': 3 of 5 rows share their item_id" in message and "[3]" in message


def test_conversion_without_click_is_rejected(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, interactions=with_column(conversion=[1, 1, 0, 0])))
    assert "column 'conversion': 1 of 4 rows have conversion = 1 but click = 0" in message


def test_rating_outside_configured_range_is_counted(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, interactions=with_column(rating=[0.5, 5.0, None, 9.0]))
    message = error_for(root, DataConfig(rating_min=1.0, rating_max=5.0))
    assert "column 'rating': 2 of 4 rows lie outside [1.0, 5.0]" in message


def test_rating_range_comes_from_config(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, interactions=with_column(rating=[0.5, 5.0, None, 9.0]))
    assert load_dataset(root, DataConfig(rating_min=0.0, rating_max=10.0)).has_rating


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    pl.DataFrame({"item_id": []}, schema={"item_id": pl.Int64}).write_parquet(root / "items.parquet")
    message = error_for(root)
    assert "items.parquet" in message and "empty (0 rows)" in message


def test_file_that_is_not_parquet_is_rejected(tmp_path: Path) -> None:
    root = write_dataset(tmp_path)
    (root / "interactions.parquet").write_text("user_id,item_id\nu1,1\n")
    message = error_for(root)
    assert "interactions.parquet" in message and "not a readable parquet file" in message


def test_item_id_type_must_match_between_files(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, items={"item_id": ["1", "2", "3"]}))
    assert "interactions.parquet, column 'item_id': 4 of 4 rows are Int64 but items.parquet column 'item_id' is String" in message


def test_user_id_type_must_match_users_file(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, users={"user_id": [1, 2]}))
    assert "column 'user_id'" in message and "users.parquet" in message and "4 of 4 rows" in message


def test_unknown_items_raise_with_count_and_examples(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, items={"item_id": [1, 2]}))
    assert "interactions.parquet, column 'item_id': 1 of 4 rows name items absent from items.parquet (e.g. [3])" in message
    assert "data.unknown_items=drop" in message


def test_unknown_items_are_quarantined_with_reason_when_dropping(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", items={"item_id": [1, 2]})
    ds = load_dataset(root, DataConfig(unknown_items="drop"), quarantine_dir=tmp_path / "q")
    quarantined = pl.read_parquet(tmp_path / "q" / "interactions.parquet")
    assert quarantined.select("user_id", "item_id", "reason").rows() == [("u2", 3, "unknown_item")]
    assert ds.dropped == {"unknown_item": 1} and ds.rows == 3
    assert sorted(ds.interactions.collect()["item_id"].to_list()) == [1, 1, 2]


def test_bad_split_values_are_counted(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, interactions=with_column(split=["train", "val", None, "test"])))
    assert "interactions.parquet, column 'split': 2 of 4 rows are not one of train, valid, test" in message


def test_absolute_image_path_is_rejected(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, items={"item_id": [1, 2, 3], "image": ["/etc/passwd", "a.png", None]}))
    assert "items.parquet, column 'image': 1 of 3 rows are absolute paths" in message


def test_image_path_escaping_dataset_dir_is_rejected(tmp_path: Path) -> None:
    items = {"item_id": [1, 2, 3], "image": ["../x.png", "img/../../y.png", "img/../z.png"]}
    message = error_for(write_dataset(tmp_path, items=items))
    assert "items.parquet, column 'image': 2 of 3 rows point outside the dataset directory" in message


def test_image_path_with_dotdot_that_stays_inside_is_accepted(tmp_path: Path) -> None:
    ds = load_dataset(write_dataset(tmp_path, items={"item_id": [1, 2, 3], "image": ["img/../z.png", None, "b.png"]}), DataConfig())
    assert ds.has_image


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    message = error_for(write_dataset(tmp_path, interactions=with_column(click=[1, 2, 1, 1], user_id=[None, "u", "u", "u"])))
    assert "2 problems" in message and "column 'click'" in message and "column 'user_id'" in message


def test_missing_dataset_directory_says_how_to_make_one(tmp_path: Path) -> None:
    message = error_for(tmp_path / "nope")
    assert "does not exist" in message and "recsys data synth" in message


def test_feature_columns_are_classified_by_type(tmp_path: Path) -> None:
    items = {"item_id": [1, 2, 3], "genre": ["a", "b", "a"], "year": [1990, 1991, 1990], "price": [1.0, 2.5, None], "tags": [[1], [2], [3]]}
    ds = load_dataset(write_dataset(tmp_path, items=items), DataConfig())
    assert ds.item_features == {"genre": "cat", "year": "cat", "price": "num"}
    assert ds.ignored_columns == {"items.parquet": ["tags"]}


def test_integer_column_with_mostly_distinct_values_is_numeric(tmp_path: Path) -> None:
    n = 200
    items = {"item_id": list(range(n)), "created_at": [1_600_000_000 + 37 * i for i in range(n)], "shelf": [i % 7 for i in range(n)]}
    ds = load_dataset(write_dataset(tmp_path, items=items, interactions={"user_id": [1], "item_id": [0], "timestamp": [1]}), DataConfig())
    assert ds.item_features == {"created_at": "num", "shelf": "cat"}
