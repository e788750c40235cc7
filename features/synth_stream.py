"""Synthetic daily logs for testing model updates (``recsys data synth --days D``).

The generative story of ``features.synth``, unrolled over ``D`` days:

- Items arrive as there: a ``new_item_fraction`` share is created during the ``D`` days, the
  rest exists before day 1. Users arrive the same way (``new_user_fraction``). An impression's
  item and user are drawn among those arrived by its time.
- Preference drift: each user's latent follows a random walk from day to day,
  ``u_k = sqrt(1 - X^2) u_{k-1} + X noise_k`` (``X = drift``, standard normal noise), which keeps
  unit variance per dimension; ``corr(u_1, u_k) = sqrt(1 - X^2)^(k-1)``. Day 1's latents are
  those of the one-shot generator. Items, task weights and every other user attribute stay fixed.
- Each day's impressions are ``features.synth``'s, drawn from that day's latents with
  timestamps uniform inside the day; ``interactions // D`` rows per day (the first days take
  the remainder).

Files: ``DIR/dayNN/`` (``NN`` = 01 .. D) is a dataset of the contract: that day's
``interactions.parquet`` in time order, ``items.parquet`` and ``users.parquet`` as of the end of
the day (everything arrived by then), and the oracle for the day: ``truth.parquet`` (aligned with
its interactions), ``truth_items.parquet``, ``truth_users.parquet`` (the day's latents and each
user's ``arrived_at``) and ``truth.json``. The PNGs are rendered once into ``DIR/images/``; each
day's ``images`` is a relative symlink to it (the contract wants image paths inside the dataset
directory; the loader checks the path text, the file system follows the link).
``DIR/stream.json``: the parameters, per-day counts and the drift check: the oracle's click AUC
on the last day's rows with the true latents (``fresh``), with yesterday's, and with those of
``check_lag_days`` days before (``stale``), as a model not updated since then would know them.

Random streams continue ``features.synth``'s: ``[seed, 10]`` user arrivals, ``[seed, 11, day]``
the drift noise, ``[seed, 12, day, ...]`` the day's impressions.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.synth import (
    DAY_S,
    SynthParams,
    _arrival_times,
    _auc,
    _catalogue,
    _arguments,
    _check_args,
    _draw_items,
    _draw_users,
    _ids,
    _impressions,
    _label_stats,
    _oracle,
    _tables,
    _truth_items,
    _truth_summary,
    _truth_users,
    _user_table,
    _write_images,
    _write_rows,
)
from recsys.errors import DataError
from recsys.rundir import write_json, write_parquet

MAX_DAYS = 99  # day directories are named with two digits
# Walk step 0.25: corr(u_7, u_10) = 0.91, corr(u_1, u_10) = 0.75. At 10 days x 2000 users x 1000 items
# (seeds 0-2) the oracle's click AUC on day 10 is 0.023-0.031 lower with the day-7 latents than with
# the true ones, and 0.014-0.020 lower than with day 9's (0.15: 0.009-0.012, too close to the noise).
DEFAULT_DRIFT = 0.25


@dataclass(frozen=True)
class StreamParams:
    """Knobs of the stream on top of ``SynthParams`` (written to stream.json)."""

    days: int = 10
    drift: float = DEFAULT_DRIFT  # X: walk step of the user latents per day, in [0, 1]
    new_user_fraction: float = 0.3  # users who arrive during the stream (the rest exist before day 1)
    check_lag_days: int = 3  # the drift check's stale latents: this many days before the last


def day_dir(root: Path, day: int) -> Path:
    """``root/dayNN``: the directory of day ``day`` (1-based)."""
    return Path(root) / f"day{day:02d}"


def synthesize_stream(
    out: Path,
    days: int = 10,
    users: int = 2000,
    items: int = 1000,
    interactions: int | None = None,
    seed: int = 0,
    drift: float = DEFAULT_DRIFT,
    images: bool = True,
    task_correlation: float = 0.8,
    params: SynthParams | None = None,
    new_user_fraction: float = 0.3,
) -> dict[str, Any]:
    """Write ``days`` day directories (+ shared images and stream.json) to ``out``; returns stream.json's body, timed."""
    stream = StreamParams(days=days, drift=drift, new_user_fraction=new_user_fraction)
    n_rows = 50 * users if interactions is None else interactions
    out = Path(out)
    _check_stream_args(stream, n_rows)
    params = replace(params or SynthParams(), span_days=days)  # new items arrive over the stream's days
    _check_args(out, users, items, n_rows, seed, task_correlation, params)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tables = _tables(np.random.default_rng([seed, 1]), params, task_correlation)
    user_draw = _draw_users(np.random.default_rng([seed, 2]), np.random.default_rng([seed, 8]), users, tables, params)
    user_draw = replace(user_draw, arrived_at=_arrival_times(np.random.default_rng([seed, 10]), users, new_user_fraction, params))
    item_draw = _draw_items(np.random.default_rng([seed, 3]), np.random.default_rng([seed, 9]), items, tables, params)
    user_ids, item_ids = _ids("u", users, "user_id"), _ids("i", items, "item_id")
    item_frame = _catalogue(seed, item_ids, item_draw, params, images)
    truth_item_frame = _truth_items(item_ids, item_draw)
    user_frame = _user_table(user_ids, user_draw)
    if images:
        _write_images(out, item_draw, seed, params)  # once for the whole catalogue: days link to it

    step = math.sqrt(1.0 - drift**2)
    latent = user_draw.latent.astype(np.float64)  # (U, d): walked in float64, handed out as float32
    check_days = {"stale": max(1, days - stream.check_lag_days), "yesterday": max(1, days - 1)}
    remembered: dict[int, np.ndarray] = {}  # day -> latents the drift check needs
    per_day: list[dict[str, Any]] = []
    for day in range(1, days + 1):
        if day > 1:
            latent = step * latent + drift * np.random.default_rng([seed, 11, day]).standard_normal(latent.shape)
        day_users = replace(user_draw, latent=latent.astype(np.float32))
        if day in check_days.values():
            remembered[day] = day_users.latent
        day_start = params.start_s + (day - 1) * DAY_S
        day_end = day_start + DAY_S
        n_day = n_rows // days + (day <= n_rows % days)
        rows = _impressions((seed, 12, day), n_day, day_start, day_end, day_users, item_draw, tables, params)

        folder = day_dir(out, day)
        folder.mkdir(parents=True, exist_ok=True)
        items_in = item_draw.created_at < day_end  # the catalogue at the end of the day
        users_in = user_draw.arrived_at < day_end
        write_parquet(item_frame.filter(items_in), folder / "items.parquet")
        write_parquet(truth_item_frame.filter(items_in), folder / "truth_items.parquet")
        write_parquet(user_frame.filter(users_in), folder / "users.parquet")
        truth_users = _truth_users(user_ids, day_users).with_columns(pl.Series("arrived_at", user_draw.arrived_at))
        write_parquet(truth_users.filter(users_in), folder / "truth_users.parquet")
        _write_rows(folder, user_ids, item_ids, rows)
        if images:
            link_dir(folder / "images", out / "images")
        stats = _label_stats(rows, item_draw)
        window = {"day": day, "start_s": day_start, "end_s": day_end, "drift": drift}
        write_json(folder / "truth.json", {**_truth_summary(seed, users, items, n_day, images, task_correlation, params, tables, stats), "day": window})
        per_day.append({
            "day": day, "dir": folder.name, "interactions": n_day, "items": int(items_in.sum()), "users": int(users_in.sum()),
            "new_items": int(np.count_nonzero(items_in & (item_draw.created_at >= day_start))),
            "new_users": int(np.count_nonzero(users_in & (user_draw.arrived_at >= day_start))),
            "ctr": stats["ctr"], "oracle_click_auc": stats["oracle_click_auc"],
        })  # fmt: skip

    # The last day's rows scored with older latents: what a model that stopped learning then could know at best.
    click = rows["click"].astype(bool)
    check: dict[str, Any] = {"day": days, "rows": int(click.size), "fresh_click_auc": _auc(rows["p_click"], click)}
    for name, day in check_days.items():
        older = _oracle(rows["user"], rows["item"], replace(user_draw, latent=remembered[day]), item_draw, tables, params)
        check |= {f"{name}_day": day, f"{name}_click_auc": _auc(older["p_click"], click)}
    summary = {  # stream.json: no paths or timings, so the same arguments write the same bytes
        **_arguments(seed, users, items, n_rows, images, task_correlation),
        "stream": asdict(stream),
        "params": asdict(params),
        "days": per_day,
        "drift_check": check,
    }
    write_json(out / "stream.json", summary)
    return {"out": str(out), **summary, "seconds": round(time.perf_counter() - started, 3)}


def _check_stream_args(stream: StreamParams, n_rows: int) -> None:
    """Reject stream knobs the story cannot honour, naming the argument."""
    if isinstance(stream.days, bool) or not isinstance(stream.days, (int, np.integer)) or not 1 <= stream.days <= MAX_DAYS:
        raise DataError(f"synth: --days must be an integer in [1, {MAX_DAYS}] (day directories have two digits), got {stream.days!r}")
    if not 0.0 <= stream.drift <= 1.0:
        raise DataError(f"synth: --drift must lie in [0, 1] (0: preferences stay, 1: a fresh draw every day), got {stream.drift}")
    if not 0.0 <= stream.new_user_fraction < 1.0:
        raise DataError(f"synth: new_user_fraction must lie in [0, 1), got {stream.new_user_fraction}")
    if isinstance(n_rows, (int, np.integer)) and not isinstance(n_rows, bool) and 1 <= n_rows < stream.days:
        raise DataError(f"synth: --interactions={n_rows} gives some of the {stream.days} days no row; ask for at least one per day")


def link_dir(link: Path, target: Path) -> None:
    """Make ``link`` a relative symlink to the directory ``target`` (a copy where the file system has no links).

    An earlier link is replaced; a real directory in the way is refused rather than deleted.
    """
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise DataError(f"{link} exists and is not a symlink; move it away (its files would shadow {target})")
    try:
        link.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()), target_is_directory=True)
    except OSError:
        shutil.copytree(target, link)
