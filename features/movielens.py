"""MovieLens-100K directory -> dataset contract (``recsys data movielens``).

Reads ``u.data``, ``u.item`` (latin-1), ``u.user`` and, when present, ``posters/``,
``tmdb_overviews.csv`` and ``suspect_tmdb_matches.tsv``; writes ``interactions.parquet``,
``items.parquet``, ``users.parquet`` and ``summary.json`` (the returned summary) into ``out``.

Policies (each one counted in the summary, nothing dropped silently):

- ratings: one row per (user, item); duplicates keep the latest timestamp.
  Every rating is a click: the file has no ``click`` column, so by the dataset contract each
  row is a positive interaction and ``recsys prepare`` samples the click negatives (a column
  of ones would claim every impression was clicked and leave the click head nothing to
  learn). ``conversion = rating >= 4``.
- ``--split uN|ua|ub``: ``.base`` rows -> train, ``.test`` rows -> test, matched on
  (user, item, timestamp). Valid is a seeded random 5% of the ``.base`` rows (numpy
  ``default_rng(0)`` over the rows sorted by user, item, timestamp), because the
  GroupLens test sets are random samples, not temporal ones. Rows of ``u.data`` in
  neither file are dropped and counted; a row in both files is an error.
- posters: ``image = "posters/<id>.jpg"`` relative to ``out``; ``out/posters`` is a
  symlink to the source's posters directory (absolute), so nothing is copied. Null
  where the file is missing or the TMDB match is suspect.
- plots: TMDB ``overview`` per movie; duplicate records of one id are collapsed when they
  agree and the plot dropped when they conflict; empty overviews and suspect matches
  (``suspect_tmdb_matches.tsv``) give no plot. TMDB ``runtime``/``original_language`` follow the plot's fate.
- titles shared by several ids (MovieLens has some) are kept, each with its own id.

Column types: strings are categorical features, floats numeric ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.errors import DataError
from recsys.rundir import write_json, write_parquet

SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
VALID_FRACTION = 0.05  # share of the .base rows moved to valid
VALID_SEED = 0
CONVERSION_MIN_RATING = 4
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip  # u.genre order: the 19 flag columns of u.item
RATING_SCHEMA = {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64}
USER_SCHEMA = {"user_id": pl.Int64, "age": pl.Float64, "gender": pl.String, "occupation": pl.String, "zip": pl.String}
ITEM_SCHEMA = {
    "item_id": pl.Int64, "title": pl.String, "release_date": pl.String, "video_release_date": pl.String,
    "imdb_url": pl.String, **{f"genre_{i}": pl.Int8 for i in range(len(GENRES))},
}  # fmt: skip


def convert(
    source: Path, out: Path, split: str | None = None, *, valid_fraction: float = VALID_FRACTION, seed: int = VALID_SEED
) -> dict[str, Any]:
    """Convert an ML-100K directory into a dataset directory; return a JSON-able summary of counts and drops."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if split is not None and split not in SPLITS:
        raise DataError(f"--split {split!r} is unknown: use one of {', '.join(SPLITS)} (or leave it out for a temporal split)")
    if not source.is_dir():
        raise DataError(f"--source {source}: no such directory (expected the MovieLens-100K directory with u.data, u.item, u.user)")
    for name in ("u.data", "u.item", "u.user") + ((f"{split}.base", f"{split}.test") if split else ()):
        if not (source / name).is_file():
            needs = "u.data, u.item, u.user" + (f" and {split}.base/.test for --split {split}" if split else "")
            raise DataError(f"{source / name} is missing: the MovieLens-100K directory needs {needs}")
    if out == source:
        raise DataError(f"--out {out} is the source directory: choose a new directory (the source is never written to)")

    users = read_users(source / "u.user")
    items, item_counts = build_items(source)
    ratings = read_ratings(source / "u.data")
    check_known_ids(ratings, users, items, source / "u.data")
    interactions, duplicates = dedupe_ratings(ratings)
    split_counts: dict[str, Any] = {}
    if split:
        interactions, split_counts = assign_split(interactions, source, split, valid_fraction, seed)

    out.mkdir(parents=True, exist_ok=True)
    poster_link = link_posters(source / "posters", out / "posters")
    write_parquet(interactions, out / "interactions.parquet")
    write_parquet(items, out / "items.parquet")
    write_parquet(users, out / "users.parquet")

    summary = {
        "source": str(source),
        "out": str(out),
        "split": split,
        "users": users.height,
        "items": items.height,
        "interactions": interactions.height,
        "ratings_read": ratings.height,
        "duplicate_ratings_dropped": duplicates,
        "conversion_rate": round(float(interactions["conversion"].mean() or 0.0), 4),
        **({"splits": split_counts} if split else {}),
        **item_counts,
        "posters_link": poster_link,
    }
    write_json(out / "summary.json", summary)
    return summary


# -- readers -----------------------------------------------------------------------------
def _read_table(path: Path, separator: str, schema: dict[str, Any], encoding: str = "utf8") -> pl.DataFrame:
    """Read a headerless MovieLens file with a fixed schema, or raise a DataError naming the file."""
    try:
        frame = pl.read_csv(path, separator=separator, has_header=False, schema=schema, quote_char=None, encoding=encoding)
    except pl.exceptions.PolarsError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        expected = f"{len(schema)} {separator!r}-separated columns ({', '.join(schema)})"
        raise DataError(f"{path}: cannot parse as {expected}: {first_line}") from None
    return frame


def _require_non_null(frame: pl.DataFrame, columns: list[str], path: Path) -> None:
    nulls = frame.select(pl.col(columns).null_count()).row(0, named=True)
    for column, count in nulls.items():
        if count:
            raise DataError(f"{path}: column {column!r} is empty in {count} of {frame.height} rows")


def read_ratings(path: Path) -> pl.DataFrame:
    """``user_id, item_id, rating, timestamp`` from a tab-separated GroupLens ratings file."""
    ratings = _read_table(path, "\t", RATING_SCHEMA)
    _require_non_null(ratings, list(RATING_SCHEMA), path)
    return ratings


def read_users(path: Path) -> pl.DataFrame:
    """``users.parquet``: user_id, age (numeric), gender, occupation, zip_prefix (first zip character: US region / Canada)."""
    users = _read_table(path, "|", USER_SCHEMA)
    _require_non_null(users, ["user_id"], path)
    _require_unique(users, "user_id", path)
    return users.select(
        "user_id", "age", "gender", "occupation", pl.col("zip").str.slice(0, 1).str.to_uppercase().alias("zip_prefix")
    )


def _require_unique(frame: pl.DataFrame, column: str, path: Path) -> None:
    repeated = frame.filter(pl.col(column).is_duplicated())[column].unique().sort()
    if repeated.len():
        raise DataError(f"{path}: column {column!r} repeats {repeated.len()} ids (e.g. {repeated.head(5).to_list()}); ids must be unique")


def check_known_ids(ratings: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame, path: Path) -> None:
    """Every rating names a user of u.user and an item of u.item, or a DataError counts the rows that do not."""
    for column, catalogue, name in (("user_id", users, "u.user"), ("item_id", items, "u.item")):
        unknown = ratings.filter(~pl.col(column).is_in(catalogue[column].implode()))
        if unknown.height:
            examples = unknown[column].unique().sort().head(5).to_list()
            raise DataError(f"{path}: {unknown.height} of {ratings.height} rows have a {column} absent from {name} (e.g. {examples})")


# -- interactions ------------------------------------------------------------------------
def dedupe_ratings(ratings: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """One row per (user, item), the latest rating kept; labels added. Returns (interactions, rows dropped)."""
    latest = (
        ratings.sort(["user_id", "item_id", "timestamp"])
        .unique(subset=["user_id", "item_id"], keep="last", maintain_order=True)
        .select(
            "user_id",
            "item_id",
            "timestamp",
            (pl.col("rating") >= CONVERSION_MIN_RATING).cast(pl.Int8).alias("conversion"),
            "rating",
        )
    )
    return latest, ratings.height - latest.height


def assign_split(
    interactions: pl.DataFrame, source: Path, split: str, valid_fraction: float, seed: int
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Add ``split`` from ``<split>.base`` / ``.test``, moving a seeded random share of train to valid."""
    key = ["user_id", "item_id", "timestamp"]
    base, test = source / f"{split}.base", source / f"{split}.test"
    labels = pl.concat(
        [read_ratings(base).select(key).with_columns(pl.lit("train").alias("split")),
         read_ratings(test).select(key).with_columns(pl.lit("test").alias("split"))]
    ).unique()  # fmt: skip
    both = labels.filter(pl.struct(key).is_duplicated())
    if both.height:
        raise DataError(f"{base} and {test} share {both.height // 2} ratings (same user, item, timestamp); a rating belongs to one split")
    stray = labels.join(interactions, on=key, how="anti")
    if stray.height:
        raise DataError(
            f"{base} / {test}: {stray.height} rows are not ratings of u.data (after keeping each user's latest rating of an item)"
        )
    labelled = interactions.join(labels, on=key, how="left").sort(key)
    unassigned = int(labelled["split"].null_count())
    labelled = labelled.drop_nulls("split")

    train_rows = np.flatnonzero((labelled["split"] == "train").to_numpy())
    n_valid = round(valid_fraction * train_rows.size)
    valid_rows = np.random.default_rng(seed).choice(train_rows, size=n_valid, replace=False)
    is_valid = np.zeros(labelled.height, dtype=bool)
    is_valid[valid_rows] = True
    labelled = labelled.with_columns(
        pl.when(pl.Series(is_valid)).then(pl.lit("valid")).otherwise(pl.col("split")).alias("split")
    )
    rows = dict(labelled["split"].value_counts().iter_rows())
    counts = {
        "train": int(rows.get("train", 0)),
        "valid": int(rows.get("valid", 0)),
        "test": int(rows.get("test", 0)),
        "unassigned_dropped": unassigned,
        "valid_policy": f"seeded random {valid_fraction:.0%} of {split}.base rows (seed {seed})",
    }
    return labelled, counts


# -- items -------------------------------------------------------------------------------
def build_items(source: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """``items.parquet`` (item_id, text, image, genres, year, runtime_min, language) and its policy counts."""
    path = source / "u.item"
    raw = _read_table(path, "|", ITEM_SCHEMA, encoding="latin1")
    _require_non_null(raw, ["item_id"], path)
    _require_unique(raw, "item_id", path)
    suspect_ids = read_suspect_ids(source / "suspect_tmdb_matches.tsv")
    plots, plot_counts = read_plots(source / "tmdb_overviews.csv", raw["item_id"], suspect_ids)
    poster_files = _poster_files(source / "posters")

    genre_names = [pl.when(pl.col(f"genre_{i}") == 1).then(pl.lit(name)) for i, name in enumerate(GENRES)]
    is_suspect = pl.col("item_id").is_in(pl.Series(suspect_ids, dtype=pl.Int64).implode())
    poster_name = pl.col("item_id").cast(pl.String) + ".jpg"
    has_poster = poster_name.is_in(pl.Series(sorted(poster_files), dtype=pl.String).implode())
    items = (
        raw.with_columns(
            pl.concat_str(genre_names, separator="|", ignore_nulls=True).replace("", None).alias("genres"),
            pl.col("release_date").str.slice(-4).cast(pl.Float64, strict=False).alias("year"),
            is_suspect.alias("suspect"),
            has_poster.alias("poster_file"),
        )
        .join(plots, on="item_id", how="left")
        .with_columns(
            pl.concat_str(
                pl.col("title"),
                pl.lit(". Genres: "),
                pl.col("genres").fill_null("none").str.replace_all("|", ", ", literal=True),
                pl.lit("."),
            ).alias("text_head"),
            pl.when(pl.col("poster_file") & ~pl.col("suspect")).then(pl.lit("posters/") + poster_name).alias("image"),
        )
        .with_columns(
            pl.when(pl.col("plot").is_not_null())
            .then(pl.concat_str([pl.col("text_head"), pl.col("plot")], separator=" "))
            .otherwise(pl.col("text_head"))
            .alias("text")
        )
    )
    n = items.height
    posters_present = int(items["image"].is_not_null().sum())
    posters_suspect = int((items["suspect"] & items["poster_file"]).sum())
    titles_shared = items.filter(pl.col("title").is_duplicated())
    counts = {
        "posters": {
            "total": n,
            "present": posters_present,
            "missing": n - posters_present - posters_suspect,
            "suspect_dropped": posters_suspect,
            "files_without_item": len(poster_files - set(items["item_id"].cast(pl.String) + ".jpg")),
        },
        "plots": plot_counts,
        "suspect_tmdb_ids": len(suspect_ids),
        "titles_shared_by_several_ids": {"titles": titles_shared["title"].n_unique(), "items_kept": titles_shared.height},
    }
    # no title column: a near-unique string would pass for a categorical feature; the text starts with it
    columns = ["item_id", "text", "image", "genres", "year", "runtime_min", "language"]
    return items.select(columns), counts


def read_suspect_ids(path: Path) -> list[int]:
    """Movie ids whose TMDB poster/overview belong to another film (empty when the file is absent)."""
    if not path.is_file():
        return []
    try:
        suspects = pl.read_csv(path, separator="\t", quote_char=None, schema_overrides={"movie_id": pl.Int64})
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: cannot parse as a tab-separated file with a movie_id column: {exc}") from None
    if "movie_id" not in suspects.columns:
        raise DataError(f"{path}: no 'movie_id' column (columns: {', '.join(suspects.columns)})")
    return sorted(suspects["movie_id"].drop_nulls().unique().to_list())


def read_plots(path: Path, item_ids: pl.Series, suspect_ids: list[int]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """One TMDB plot (and runtime/language) per item, null where absent, empty, conflicting or suspect; with counts."""
    columns = {"movie_id": pl.Int64, "overview": pl.String, "runtime": pl.Float64, "original_language": pl.String}
    if path.is_file():
        try:
            records = pl.read_csv(path, columns=list(columns), schema_overrides=columns)
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{path}: needs columns {', '.join(columns)}: {str(exc).strip().splitlines()[0]}") from None
    else:
        records = pl.DataFrame(schema=columns)
    records = records.rename({"movie_id": "item_id"}).with_columns(pl.col("overview").str.strip_chars().replace("", None))
    per_item = records.group_by("item_id").agg(
        pl.len().alias("records"),
        (pl.col("overview").n_unique() > 1).alias("conflicting"),
        pl.col("overview", "runtime", "original_language").first(),
    )
    status = (
        pl.DataFrame({"item_id": item_ids})
        .join(per_item, on="item_id", how="left")
        .with_columns(
            pl.when(pl.col("item_id").is_in(pl.Series(suspect_ids, dtype=pl.Int64).implode())).then(pl.lit("suspect_dropped"))
            .when(pl.col("records").is_null()).then(pl.lit("no_record"))
            .when(pl.col("conflicting")).then(pl.lit("conflicting_dropped"))
            .when(pl.col("overview").is_null()).then(pl.lit("empty"))
            .otherwise(pl.lit("present"))
            .alias("plot_status")
        )
    )  # fmt: skip
    keep = pl.col("plot_status") == "present"
    plots = status.select(
        "item_id",
        pl.when(keep).then(pl.col("overview")).alias("plot"),
        pl.when(keep).then(pl.col("runtime")).alias("runtime_min"),
        pl.when(keep).then(pl.col("original_language")).alias("language"),
    )
    by_status = dict(status["plot_status"].value_counts().iter_rows())
    counts = {
        "total": status.height,
        **{name: int(by_status.get(name, 0)) for name in ("present", "empty", "suspect_dropped", "conflicting_dropped", "no_record")},
        "tmdb_records": records.height,
        "tmdb_duplicate_records_dropped": records.height - per_item.height,
        "tmdb_records_without_item": per_item.join(status, on="item_id", how="anti").height,
    }
    return plots, counts


# -- posters -----------------------------------------------------------------------------
def _poster_files(posters: Path) -> set[str]:
    """Names of the non-empty regular files in the posters directory (empty set when absent)."""
    if not posters.is_dir():
        return set()
    with os.scandir(posters) as entries:
        return {e.name for e in entries if e.is_file() and e.stat().st_size > 0}


def link_posters(source_posters: Path, link: Path) -> str | None:
    """Point ``out/posters`` at the source posters (absolute symlink) so image paths stay relative; never copy."""
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise DataError(f"{link} exists and is not a symlink: remove it or choose another --out (posters are linked, never copied)")
    if not source_posters.is_dir():
        return None
    link.symlink_to(source_posters.resolve(), target_is_directory=True)
    return str(source_posters.resolve())
