"""The prepare step of ``recsys update``: BASE's prepared data + a NEW dataset -> RUN2/data/.

- **Vocabularies grow append-only.** Every user and item of BASE keeps its ``user_idx`` /
  ``item_idx``; ids new in NEW get the next indices (sorted among themselves). Categorical feature
  codes grow the same way (a value BASE knew keeps its code), numeric features keep BASE's
  standardisation (recovered exactly from BASE's table: it is affine in the raw value).
- **Histories continue across the boundary.** BASE's rows (all of its splits: they all precede
  NEW) are written as train rows of RUN2, so a NEW row's history holds the user's earlier BASE
  clicks, the served histories and the retrieval exclusions know them, and the baselines learn
  from all of the past. Only a ``update.replay`` sample of them is trained on again: the others
  carry ``context = true`` and the trainer skips them (``training.data.read_split``).
- NEW's own split (its ``split`` column, else ``data.split``) gives RUN2's train / valid / test:
  its test rows are the evaluation window. The leak-free rule of ``features.pipeline`` holds.
  Rows that NEW holds again (same user, item and timestamp: typically BASE's test window, now
  trained on) are taken from NEW, so a daily chain (train day d, test day d+1; then train d+1)
  counts every interaction once.

NEW must be the current catalogue (every item BASE knows, and new ones; texts and images may have
changed: the embed step re-encodes only what the content cache lacks) and must not contradict
BASE (id types, label columns, feature columns), or preparing stops with a DataError saying what.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import polars as pl

from features.dataset import Dataset, load_dataset
from features.pipeline import (
    HISTORY_RULE, _add_negatives, _feature_meta, _history_bounds, _items_table, _labelled_events, _Stages, _write_splits,
)  # fmt: skip
from recsys.errors import DataError, RunError
from recsys.rundir import RunDir, read_json, write_json, write_parquet

log = logging.getLogger("recsys")

KEY = ["user_idx", "item_idx", "timestamp"]  # one interaction
BASE_COLUMNS = ("user_idx", "item_idx", "timestamp", "click", "conversion", "rating", "sampled")


def prepare_update(run: RunDir, base: RunDir, replay: float, seed: int = 0) -> dict[str, Any]:
    """Write RUN2/data/ from BASE/data and the run's dataset (NEW); return the step summary."""
    cfg = run.config().data
    base_meta = read_json(base.require(base.data / "meta.json", "prepare"))
    stages = _Stages()
    with stages("validate"):
        ds = load_dataset(run.dataset_dir(), cfg, quarantine_dir=run.quarantine)
        base_users = pl.read_parquet(base.data / "users.parquet")
        base_items = pl.read_parquet(base.data / "items.parquet")
        _check_compatible(ds, base, base_meta, base_users, base_items, cfg.history_len)
    with stages("vocabularies and item/user tables"):
        items_vocab = _grown_vocabulary(base_items.select("item_id", "item_idx"), ds.items.select("item_id"), "item_id", "item_idx")
        user_ids = [ds.interactions.select("user_id")] + ([ds.users.select("user_id")] if ds.users is not None else [])
        users_vocab = _grown_vocabulary(base_users.select("user_id", "user_idx"), pl.concat(user_ids), "user_id", "user_idx")
        items_table = _grown_items(ds, items_vocab, base_items)
        users_table = _grown_users(ds, users_vocab, base_users)
        item_features, user_features = _feature_meta(items_table), _feature_meta(users_table)
        write_parquet(items_table, run.data / "items.parquet")
        write_parquet(users_table, run.data / "users.parquet")
    with stages("labels and split"):
        new, split_mode = _labelled_events(ds, items_vocab, users_vocab, cfg)
        cut = data_cut(base)
        if new.height and new["timestamp"].max() <= cut:
            raise DataError(f"{ds.root / 'interactions.parquet'}: every timestamp is at or before BASE's data cut ({cut}, {base.root}): NEW must hold the interactions since BASE's data")
        if base_meta["tasks"].get("rating") and "rating" not in new.columns:  # no rated row in NEW: the head stays, its rows unrated
            new = new.with_columns(rating=pl.lit(None, dtype=pl.Float32))
        tasks = {"click": True, "conversion": "conversion" in new.columns, "rating": "rating" in new.columns}
        negatives = {"sampled": 0, "unavailable": 0}
        if not ds.has_click and cfg.negatives_per_positive > 0:
            new, negatives = _add_negatives(new, len(items_vocab), cfg)
        past = _base_events(base, new.columns, replay, seed)
        again = past.join(new.filter(~pl.col("sampled")).select(KEY).unique(), on=KEY, how="semi").height
        past = past.join(new.select(KEY).unique(), on=KEY, how="anti")  # rows NEW holds again (BASE's test window, trained on now): NEW's
        events = pl.concat([past, new.with_columns(pl.col("seq") + past.height, context=pl.lit(False))], how="vertical_relaxed")
    with stages("history and write"):
        events = events.sort(["user_idx", "timestamp", "seq"], maintain_order=True)
        bounded, clicks = _history_bounds(events, cfg.history_len)
        del events
        rows_out = _write_splits(bounded, clicks, users_vocab["user_id"], items_vocab["item_id"], run.data)

    trained = int(((bounded["split"] == 0) & ~bounded["context"]).sum())
    if trained == 0:
        raise DataError(f"{ds.root}: the update leaves no row to train on (no train rows in NEW and update.replay = {replay})")
    meta = {
        **{k: base_meta[k] for k in ("impressions", "rating_range", "history_len") if k in base_meta},
        "n_users": len(users_vocab) + 1,
        "n_items": len(items_vocab) + 1,
        "tasks": tasks,
        "user_features": user_features,
        "item_features": item_features,
        "split": split_mode,
        "rows": rows_out,
        "history_rule": HISTORY_RULE,
        "update": {"base": str(base.root.resolve()), "base_cut": cut, "replay": replay, "context_rows": int(bounded["context"].sum()), "trained_rows": trained},
    }
    write_json(run.data / "meta.json", meta)
    summary = {
        "rows_in": ds.rows_in,
        "dropped": ds.dropped,
        "quarantine": str(ds.quarantine_path) if ds.quarantine_path else None,
        "rows_out": rows_out,
        "negatives": negatives,
        "users": len(users_vocab),
        "items": len(items_vocab),
        "new_users": len(users_vocab) - base_users.height,
        "new_items": len(items_vocab) - base_items.height,
        "base_rows": past.height,
        "base_rows_in_new": again,
        "replayed_rows": int((~past["context"]).sum()),
        "split": split_mode,
        "tasks": tasks,
        "timings_s": stages.seconds,
        "seconds": stages.total(),
    }
    run.record("prepare", summary)
    log.info(
        "update prepare: %d new rows (%d new users, %d new items) on %d of BASE's (%d replayed), %.1f s",
        new.height, summary["new_users"], summary["new_items"], past.height, summary["replayed_rows"], summary["seconds"],
    )
    return summary


def data_cut(run: RunDir) -> int:
    """The latest timestamp of a run's prepared data."""
    return max(int(pl.scan_parquet(run.data / f"{split}.parquet").select(pl.col("timestamp").max()).collect().item() or 0) for split in ("train", "valid", "test") if (run.data / f"{split}.parquet").is_file())


def _check_compatible(ds: Dataset, base: RunDir, meta: dict[str, Any], users: pl.DataFrame, items: pl.DataFrame, history_len: int) -> None:
    """NEW against BASE: the same id types, label columns, features and history length; every BASE item in NEW's catalogue."""
    where = ds.root
    for name, frame in (("user_id", users), ("item_id", items)):
        new_type = ds.interactions.collect_schema()[name]
        if new_type != frame.schema[name]:
            raise DataError(f"{where / 'interactions.parquet'}: {name} is {new_type} but BASE ({base.root}) has {frame.schema[name]} ids: an update keeps the id type")
    if ds.has_click != meta.get("impressions", True):
        have = "impressions (a click column)" if meta.get("impressions", True) else "positives only (no click column)"
        raise DataError(f"{where / 'interactions.parquet'}: BASE was trained on {have}; NEW must be the same kind of log")
    base_tasks = meta["tasks"]
    for task, column in (("conversion", "conversion"), ("rating", "rating")):
        if base_tasks.get(task) and column not in ds.interactions.collect_schema().names() and not (task == "conversion" and ds.has_rating):
            raise DataError(f"{where / 'interactions.parquet'}: BASE trains the {task} head but NEW has no '{column}' column")
    if meta.get("history_len", history_len) != history_len:
        raise DataError(f"data.history_len = {history_len} but BASE was prepared with {meta['history_len']}: an update keeps the model's history length")
    for file, kinds, base_features in (("items.parquet", ds.item_features, meta.get("item_features", {})), ("users.parquet", ds.user_features, meta.get("user_features", {}))):
        new_names = {f"{'cat' if kind == 'cat' else 'num'}_{name}" for name, kind in kinds.items()}
        if new_names != set(base_features):
            raise DataError(f"{where / file}: feature columns {sorted(new_names)} differ from BASE's {sorted(base_features)}: an update keeps the features (names and kinds)")
    missing = items.lazy().join(ds.items.select("item_id"), on="item_id", how="anti").select("item_id").collect()["item_id"]
    if len(missing):
        raise DataError(f"{where / 'items.parquet'} lacks {len(missing)} item(s) of BASE's catalogue (e.g. {missing.head(5).to_list()}): NEW holds the current catalogue, old items and new ones")


def _grown_vocabulary(base: pl.DataFrame, ids: pl.LazyFrame, id_column: str, idx_column: str) -> pl.DataFrame:
    """BASE's id -> idx, then ids it lacks, sorted, numbered on from its last index."""
    fresh = ids.unique().join(base.lazy().select(id_column), on=id_column, how="anti").sort(id_column).collect()
    start = int(base[idx_column].max() or 0) + 1
    fresh = fresh.with_row_index(idx_column, offset=start).with_columns(pl.col(idx_column).cast(pl.Int64)).select(id_column, idx_column)
    return pl.concat([base.select(id_column, pl.col(idx_column).cast(pl.Int64)), fresh]).sort(idx_column)


def _features_like_base(raw: pl.DataFrame, base: pl.DataFrame, id_column: str, kinds: dict[str, str]) -> pl.DataFrame:
    """Coded features (``cat_``/``num_``) of ``raw`` (id + raw feature values) in BASE's coding.

    Categorical: a value BASE coded keeps its code, new values get new codes past BASE's largest
    (in sorted order); null is 0. Numeric: BASE's affine standardisation, fitted exactly on the
    ids both hold (a constant column, which BASE coded 0, stays 0); null is 0.
    """
    joined = raw.join(base, on=id_column, how="left")
    out = raw.select(id_column)
    for name, kind in kinds.items():
        coded = f"{'cat' if kind == 'cat' else 'num'}_{name}"
        value = joined[name]
        if kind == "cat":
            value = value.cast(pl.Int64) if value.dtype.is_integer() or value.dtype == pl.Boolean else value.cast(pl.String)
            known = pl.DataFrame({"value": value, "code": joined[coded]}).drop_nulls().filter(pl.col("code") > 0).unique("value", keep="first")
            unseen = pl.DataFrame({"value": value}).drop_nulls().unique().join(known, on="value", how="anti").sort("value")
            start = int(base[coded].max() or 0) + 1
            codes = pl.concat([known, unseen.with_columns(code=pl.int_range(start, start + unseen.height, dtype=pl.Int64))])
            frame = pl.DataFrame({"value": value}).join(codes, on="value", how="left", maintain_order="left")
            out = out.with_columns(frame["code"].fill_null(0).cast(pl.Int64).alias(coded))
        else:
            x = value.cast(pl.Float64).fill_nan(None).to_numpy()
            y = joined[coded].cast(pl.Float64).to_numpy()
            both = ~np.isnan(x) & ~np.isnan(y)
            scale, shift = 0.0, 0.0
            if both.sum() >= 2 and np.ptp(x[both]) > 0:
                scale, shift = np.polyfit(x[both], y[both], 1)
            fitted = np.nan_to_num(scale * x + shift, nan=0.0).astype(np.float32)
            unchanged = ~np.isnan(y) & (np.abs(fitted - np.nan_to_num(y)) < 1e-4)  # an old value, not a changed one: BASE's float exactly
            out = out.with_columns(pl.Series(coded, np.where(unchanged, np.nan_to_num(y), fitted), dtype=pl.Float32))
    return out


def _grown_items(ds: Dataset, vocab: pl.DataFrame, base: pl.DataFrame) -> pl.DataFrame:
    """Every item of the grown vocabulary: NEW's text and image, features in BASE's coding."""
    table, _ = _items_table(ds, vocab)  # text, absolute image paths; its own feature codes are replaced below
    kinds = dict(ds.item_features)
    raw = ds.items.select("item_id", *kinds).collect()
    coded = _features_like_base(raw, base, "item_id", kinds)
    keep = [c for c in table.columns if not c.startswith(("cat_", "num_"))]
    return table.select(keep).join(coded, on="item_id", how="left").sort("item_idx")


def _grown_users(ds: Dataset, vocab: pl.DataFrame, base: pl.DataFrame) -> pl.DataFrame:
    """Every user of the grown vocabulary; features in BASE's coding (0 where unknown)."""
    table = vocab
    kinds = dict(ds.user_features)
    if ds.users is not None and kinds:
        raw = ds.users.select("user_id", *kinds).collect()
        coded = _features_like_base(raw, base, "user_id", kinds)
        names = coded.columns[1:]
        old = base.select("user_id", *(pl.col(n).alias(f"{n}__base") for n in names))  # BASE users absent from NEW's users.parquet keep their codes
        table = table.join(coded, on="user_id", how="left").join(old, on="user_id", how="left")
        table = table.with_columns(pl.coalesce(n, f"{n}__base").fill_null(0).alias(n) for n in names).drop(f"{n}__base" for n in names)
    return table.sort("user_idx")


def _base_events(base: RunDir, columns: list[str], replay: float, seed: int) -> pl.DataFrame:
    """BASE's rows (every split) as train rows of the update; all but a ``replay`` sample marked ``context``."""
    frames = []
    for split in ("train", "valid", "test"):
        path = base.data / f"{split}.parquet"
        if path.is_file():
            names = pl.read_parquet_schema(path).keys()
            frames.append(pl.scan_parquet(path).select([c for c in BASE_COLUMNS if c in names and (c in columns or c == "sampled")]))
    if not frames:
        raise RunError(f"{base.data} holds no prepared rows: BASE is not a prepared run")
    past = pl.concat(frames, how="diagonal_relaxed").collect()
    rng = np.random.default_rng(seed)
    replayed = rng.random(past.height) < replay
    past = past.with_columns(
        seq=pl.int_range(pl.len(), dtype=pl.UInt32),
        split=pl.lit(0, dtype=pl.UInt8),
        context=pl.Series(~replayed),
        sampled=pl.col("sampled").fill_null(False) if "sampled" in past.columns else pl.lit(False),
    )
    return past.select(*(c for c in columns if c in past.columns), "context")
