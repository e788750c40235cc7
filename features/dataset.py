"""Read a dataset directory and check it against the dataset contract (DESIGN.md).

``load_dataset`` returns validated, type-normalised lazy frames, or raises one
``DataError`` that lists every violation with its file, column, row count and a fix.
Interactions naming items absent from the catalogue are an error, or, with
``data.unknown_items = "drop"``, written to ``quarantine/interactions.parquet`` with a
``reason`` column and counted in ``Dataset.dropped``.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from recsys.config import DataConfig
from recsys.errors import DataError
from recsys.rundir import write_parquet

log = logging.getLogger("recsys")

INTERACTIONS = "interactions.parquet"
ITEMS = "items.parquet"
USERS = "users.parquet"
SPLIT_VALUES = ("train", "valid", "test")
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "click", "conversion", "rating", "split")
EXAMPLES = 5  # offending ids quoted in a message

FeatureKind = Literal["cat", "num"]
MIN_NUMERIC_DISTINCT = 50  # an integer column with fewer distinct values is always categorical


@dataclass(frozen=True)
class Dataset:
    """A validated dataset: lazy frames with normalised types and what the data contains.

    interactions: user_id, item_id (Int64 or String), timestamp (Int64), then whichever of
    click, conversion (Int8 0/1), rating (Float64, null = unrated), split (String) exist.
    """

    root: Path
    interactions: pl.LazyFrame
    items: pl.LazyFrame
    users: pl.LazyFrame | None
    rows_in: int  # interaction rows read, before any drop
    rows: int  # interaction rows kept
    has_click: bool  # impressions (else every row is a positive)
    has_conversion: bool
    has_rating: bool  # a rating column with at least one rated row
    has_split: bool
    has_text: bool
    has_image: bool
    item_features: dict[str, FeatureKind] = field(default_factory=dict)
    user_features: dict[str, FeatureKind] = field(default_factory=dict)
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)  # file -> columns of unsupported type
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> interaction rows quarantined
    quarantine_path: Path | None = None


class _Problems:
    """Collects contract violations so one error can report all of them."""

    def __init__(self, root: Path):
        self.root = root
        self.messages: list[str] = []

    def add(self, file: str, column: str | None, rows: int, total: int, problem: str, fix: str) -> None:
        where = f"{file}, column {column!r}" if column else file
        self.messages.append(f"{where}: {rows:,} of {total:,} rows {problem}. Fix: {fix}")

    def raise_if_any(self) -> None:
        if self.messages:
            count = len(self.messages)
            listing = "\n  - ".join(self.messages)
            raise DataError(f"dataset {self.root} breaks the dataset contract ({count} problem{'s' * (count > 1)}):\n  - {listing}")


def load_dataset(dataset_dir: str | Path, data_cfg: DataConfig, quarantine_dir: str | Path | None = None) -> Dataset:
    """Read and validate ``dataset_dir``; quarantine unknown-item rows under ``quarantine_dir`` when dropping."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"dataset directory {root} does not exist; create it with `recsys data synth --out {root}` or point --data at one")
    problems = _Problems(root)

    inter, inter_schema, n_inter = _scan(root, INTERACTIONS, required=True)
    items, items_schema, n_items = _scan(root, ITEMS, required=True)
    users_scan = _scan(root, USERS, required=False)

    _require_columns(problems, INTERACTIONS, inter_schema, n_inter, ("user_id", "item_id", "timestamp"))
    _require_columns(problems, ITEMS, items_schema, n_items, ("item_id",))
    if users_scan is not None:
        _require_columns(problems, USERS, users_scan[1], users_scan[2], ("user_id",))
    problems.raise_if_any()

    # Types first: value checks below assume them.
    casts = _check_interaction_types(problems, inter_schema, n_inter)
    _check_id_type(problems, ITEMS, "item_id", items_schema["item_id"], n_items)
    for column in ("text", "image"):
        if column in items_schema and items_schema[column] not in (pl.String, pl.Null):
            problems.add(ITEMS, column, n_items, n_items, f"have type {items_schema[column]}, not string", f"store {column} as a string column (null where absent)")
    _check_same_id_type(problems, "item_id", (INTERACTIONS, inter_schema, n_inter), (ITEMS, items_schema, n_items))
    if users_scan is not None:
        _check_id_type(problems, USERS, "user_id", users_scan[1]["user_id"], users_scan[2])
        _check_same_id_type(problems, "user_id", (INTERACTIONS, inter_schema, n_inter), (USERS, users_scan[1], users_scan[2]))
    problems.raise_if_any()

    # Non-strict: a value that does not fit (e.g. a huge UInt64) becomes null and is reported as such.
    inter = inter.select([pl.col(c).cast(t, strict=False) for c, t in casts.items()])
    items = items.with_columns(pl.col("item_id").cast(_id_dtype(items_schema["item_id"])))
    n_rated = _check_interaction_values(problems, inter, n_inter, data_cfg, has_click="click" in casts)
    _check_catalogue_values(problems, items, n_items)
    users = None
    if users_scan is not None:
        users = users_scan[0].with_columns(pl.col("user_id").cast(_id_dtype(users_scan[1]["user_id"])))
        _check_unique_ids(problems, USERS, users, "user_id", users_scan[2])
    problems.raise_if_any()
    inter = inter.with_columns(pl.col(c).cast(pl.Int8) for c in ("click", "conversion") if c in casts)

    inter, dropped, quarantine_path = _handle_unknown_items(root, inter, items, n_inter, data_cfg, quarantine_dir)
    rows = n_inter - sum(dropped.values())
    if rows == 0:
        raise DataError(f"{root / INTERACTIONS}: no rows left after dropping {dropped}; fix the item ids or the catalogue")

    ignored: dict[str, list[str]] = {}
    extra = [c for c in inter_schema if c not in INTERACTION_COLUMNS]
    if extra:
        ignored[INTERACTIONS] = extra
    item_features = _feature_kinds(ITEMS, items, items_schema, ("item_id", "text", "image"), ignored)
    user_features = _feature_kinds(USERS, users, users_scan[1], ("user_id",), ignored) if users_scan is not None else {}
    for file, columns in ignored.items():
        log.warning("%s: ignoring columns %s (not part of the contract or of an unsupported type)", file, columns)

    return Dataset(
        root=root.resolve(),
        interactions=inter,
        items=items,
        users=users,
        rows_in=n_inter,
        rows=rows,
        has_click="click" in casts,
        has_conversion="conversion" in casts,
        has_rating="rating" in casts and n_rated > 0,
        has_split="split" in casts,
        has_text="text" in items_schema,
        has_image="image" in items_schema,
        item_features=item_features,
        user_features=user_features,
        ignored_columns=ignored,
        dropped=dropped,
        quarantine_path=quarantine_path,
    )


# -- files and columns ---------------------------------------------------------------------
def _scan(root: Path, name: str, required: bool) -> tuple[pl.LazyFrame, pl.Schema, int] | None:
    """Lazily open one parquet file: (frame, schema, rows), or None when optional and absent."""
    path = root / name
    if not path.is_file():
        if required:
            raise DataError(f"{path}: required file {name} is missing (0 rows); a dataset directory needs {INTERACTIONS} and {ITEMS}")
        return None
    try:
        frame = pl.scan_parquet(path)
        schema = frame.collect_schema()
        rows = frame.select(pl.len()).collect().item()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]}); write it with polars/pandas .to_parquet()") from None
    if rows == 0:
        raise DataError(f"{path}: file is empty (0 rows); {name} needs at least one row")
    return frame, schema, rows


def _require_columns(problems: _Problems, file: str, schema: pl.Schema, total: int, columns: tuple[str, ...]) -> None:
    for column in columns:
        if column not in schema:
            problems.add(file, column, total, total, f"lack the required column (found: {', '.join(schema) or 'none'})", f"add a {column!r} column")


def _is_id_type(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)


def _id_dtype(dtype: pl.DataType) -> pl.DataType:
    """Ids are normalised to Int64 (any integer) or String (string / categorical)."""
    return pl.Int64 if dtype.is_integer() else pl.String


def _check_id_type(problems: _Problems, file: str, column: str, dtype: pl.DataType, total: int) -> None:
    if not _is_id_type(dtype):
        problems.add(file, column, total, total, f"have type {dtype}, not string or integer", f"store {column} as string or int64")


def _check_same_id_type(problems: _Problems, column: str, a: tuple[str, pl.Schema, int], b: tuple[str, pl.Schema, int]) -> None:
    (file_a, schema_a, total_a), (file_b, schema_b, _) = a, b
    dtype_a, dtype_b = schema_a.get(column), schema_b.get(column)
    if dtype_a is None or dtype_b is None or not (_is_id_type(dtype_a) and _is_id_type(dtype_b)):
        return
    if _id_dtype(dtype_a) != _id_dtype(dtype_b):
        problems.add(
            file_a, column, total_a, total_a,
            f"are {dtype_a} but {file_b} column {column!r} is {dtype_b}",
            f"use the same id type (string or int64) for {column} in both files",
        )


def _check_interaction_types(problems: _Problems, schema: pl.Schema, total: int) -> dict[str, pl.DataType]:
    """Check column types; return the normalised dtype of every contract column present."""
    casts: dict[str, pl.DataType] = {}
    for column in ("user_id", "item_id"):
        _check_id_type(problems, INTERACTIONS, column, schema[column], total)
        casts[column] = _id_dtype(schema[column])
    if schema["timestamp"].is_integer():
        casts["timestamp"] = pl.Int64
    else:
        problems.add(INTERACTIONS, "timestamp", total, total, f"have type {schema['timestamp']}, not integer unix seconds",
                     "store int64 seconds, e.g. pl.col('timestamp').dt.epoch('s')")
    for column in ("click", "conversion"):
        if column not in schema:
            continue
        if schema[column].is_integer() or schema[column] == pl.Boolean:
            casts[column] = pl.Int64  # narrowed to Int8 once the values are known to be 0/1
        else:
            problems.add(INTERACTIONS, column, total, total, f"have type {schema[column]}, not integer 0/1", f"store {column} as int8 0/1")
    if "rating" in schema:
        if schema["rating"].is_numeric():
            casts["rating"] = pl.Float64
        else:
            problems.add(INTERACTIONS, "rating", total, total, f"have type {schema['rating']}, not a number", "store rating as float (null where unrated)")
    if "split" in schema:
        if schema["split"] in (pl.String, pl.Categorical) or isinstance(schema["split"], pl.Enum):
            casts["split"] = pl.String
        else:
            problems.add(INTERACTIONS, "split", total, total, f"have type {schema['split']}, not string", "store split as 'train'/'valid'/'test' strings")
    return casts


# -- values --------------------------------------------------------------------------------
def _check_interaction_values(problems: _Problems, inter: pl.LazyFrame, total: int, cfg: DataConfig, has_click: bool) -> int:
    """One pass over the interactions counting every kind of bad value; returns the rated-row count."""
    names = inter.collect_schema().names()
    checks: dict[str, pl.Expr] = {
        "user_id": pl.col("user_id").is_null().sum(),
        "item_id": pl.col("item_id").is_null().sum(),
        "timestamp": pl.col("timestamp").is_null().sum(),
    }
    for column in ("click", "conversion"):
        if column in names:
            checks[column] = (pl.col(column).is_null() | ~pl.col(column).is_in([0, 1])).sum()
    if "conversion" in names and has_click:
        checks["conversion_without_click"] = ((pl.col("conversion") == 1) & (pl.col("click") != 1)).sum()
    if "rating" in names:
        rating = pl.col("rating")
        checks["rating"] = (rating.is_not_null() & (rating.is_nan() | (rating < cfg.rating_min) | (rating > cfg.rating_max))).sum()
        checks["rated"] = rating.is_not_null().sum()
    if "split" in names:
        checks["split"] = (pl.col("split").is_null() | ~pl.col("split").is_in(list(SPLIT_VALUES))).sum()
    counts = inter.select(**{k: v.cast(pl.Int64) for k, v in checks.items()}).collect().row(0, named=True)

    for column in ("user_id", "item_id", "timestamp"):
        if counts[column]:
            problems.add(INTERACTIONS, column, counts[column], total, "are null", f"fill in {column} or remove those rows")
    for column in ("click", "conversion"):
        if counts.get(column):
            problems.add(INTERACTIONS, column, counts[column], total, "are not 0 or 1 (or are null)", f"{column} must be 0 or 1 on every row")
    if counts.get("conversion_without_click"):
        problems.add(INTERACTIONS, "conversion", counts["conversion_without_click"], total, "have conversion = 1 but click = 0",
                     "a conversion needs a click: set click = 1 on those rows or conversion = 0")
    if counts.get("rating"):
        problems.add(INTERACTIONS, "rating", counts["rating"], total, f"lie outside [{cfg.rating_min}, {cfg.rating_max}] (or are NaN)",
                     "fix the ratings, use null for unrated rows, or set data.rating_min / data.rating_max")
    if counts.get("split"):
        problems.add(INTERACTIONS, "split", counts["split"], total, f"are not one of {', '.join(SPLIT_VALUES)} (or are null)",
                     "use only 'train', 'valid' or 'test', or drop the split column to let data.split choose")
    return int(counts.get("rated", 0))


def _check_unique_ids(problems: _Problems, file: str, frame: pl.LazyFrame, column: str, total: int) -> None:
    counts = frame.select(
        nulls=pl.col(column).is_null().sum(),
        duplicated=pl.col(column).is_duplicated().sum(),
        examples=pl.col(column).filter(pl.col(column).is_duplicated()).unique(maintain_order=True).head(EXAMPLES).implode(),
    ).collect().row(0, named=True)
    if counts["nulls"]:
        problems.add(file, column, counts["nulls"], total, "are null", f"every row needs a {column}")
    if counts["duplicated"]:
        problems.add(file, column, counts["duplicated"], total, f"share their {column} with another row (e.g. {counts['examples']})",
                     f"keep one row per {column}")


def _check_catalogue_values(problems: _Problems, items: pl.LazyFrame, total: int) -> None:
    _check_unique_ids(problems, ITEMS, items, "item_id", total)
    if "image" not in items.collect_schema():
        return
    image = pl.col("image").cast(pl.String)
    absolute = image.str.starts_with("/") | image.str.starts_with("\\") | image.str.contains(r"^[A-Za-z]:[\\/]")
    bad = items.select(
        absolute=absolute.sum(),
        examples=image.filter(absolute).head(EXAMPLES).implode(),
        # Only paths with a '..' segment can escape; normalise just those (usually none).
        dotted=image.filter(~absolute & image.str.contains(r"(^|[\\/])\.\.([\\/]|$)")).implode(),
    ).collect().row(0, named=True)
    if bad["absolute"]:
        problems.add(ITEMS, "image", bad["absolute"], total, f"are absolute paths (e.g. {bad['examples']})",
                     "store image paths relative to the dataset directory")
    escaping = [p for p in bad["dotted"] if posixpath.normpath(p.replace("\\", "/")).startswith("..")]
    if escaping:
        problems.add(ITEMS, "image", len(escaping), total, f"point outside the dataset directory (e.g. {escaping[:EXAMPLES]})",
                     "move the images under the dataset directory and store paths relative to it")


def _handle_unknown_items(
    root: Path, inter: pl.LazyFrame, items: pl.LazyFrame, total: int, cfg: DataConfig, quarantine_dir: str | Path | None
) -> tuple[pl.LazyFrame, dict[str, int], Path | None]:
    """Interactions whose item is not in the catalogue: raise, or quarantine them and filter them out."""
    catalogue = items.select("item_id").unique()
    unknown = inter.join(catalogue, on="item_id", how="anti")
    stats = unknown.select(rows=pl.len(), examples=pl.col("item_id").unique(maintain_order=True).head(EXAMPLES).implode()).collect()
    rows, examples = stats.row(0)
    if rows == 0:
        return inter, {}, None
    if cfg.unknown_items == "error":
        raise DataError(
            f"{root / INTERACTIONS}, column 'item_id': {rows:,} of {total:,} rows name items absent from {ITEMS} "
            f"(e.g. {examples}). Fix: add them to the catalogue, or set data.unknown_items=drop to quarantine those rows"
        )
    quarantine_path = None
    if quarantine_dir is not None:
        quarantine_path = Path(quarantine_dir) / INTERACTIONS
        write_parquet(unknown.with_columns(reason=pl.lit("unknown_item")).collect(), quarantine_path)
    log.warning("%s: dropped %d of %d rows naming items absent from %s (quarantine: %s)", INTERACTIONS, rows, total, ITEMS, quarantine_path)
    return inter.join(catalogue, on="item_id", how="semi"), {"unknown_item": rows}, quarantine_path


def _feature_kinds(file: str, frame: pl.LazyFrame, schema: pl.Schema, reserved: tuple[str, ...], ignored: dict[str, list[str]]) -> dict[str, FeatureKind]:
    """Extra columns: floats are numeric features, strings/bools categorical, anything else ignored.

    Integers are categorical (a year, a genre code) unless more than half of the rows (and
    more than ``MIN_NUMERIC_DISTINCT``) hold distinct values: then they behave like a
    timestamp or a measurement, not a category, and an embedding row per value would never
    be shared between rows.
    """
    kinds: dict[str, FeatureKind] = {}
    integers = [n for n, d in schema.items() if n not in reserved and d.is_integer()]
    distinct = frame.select(pl.len().alias("__rows"), *(pl.col(n).n_unique() for n in integers)).collect().row(0, named=True) if integers else {}
    for name, dtype in schema.items():
        if name in reserved:
            continue
        if dtype.is_float():
            kinds[name] = "num"
        elif dtype.is_integer():
            kinds[name] = "num" if distinct[name] > max(distinct["__rows"] / 2, MIN_NUMERIC_DISTINCT) else "cat"
            if kinds[name] == "num":
                log.info("%s: integer column %r has %d distinct values in %d rows: used as numeric", file, name, distinct[name], distinct["__rows"])
        elif dtype in (pl.String, pl.Categorical, pl.Boolean) or isinstance(dtype, pl.Enum):
            kinds[name] = "cat"
        else:
            ignored.setdefault(file, []).append(name)
    return kinds
