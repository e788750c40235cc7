"""Benchmark ``recsys prepare``: seconds and peak RSS at 10M interactions / 1M items, and speed vs plain pandas.

    .venv/bin/python benchmarks/pipeline.py [--rows 10000000] [--items 1000000] [--pandas-rows 200000]

The dataset (contract format, no images) is generated here with numpy: users with ~100
impressions each, Zipf-like item popularity, click / conversion / rating labels. ``prepare``
runs in a child process so its peak RSS is measured alone (RUSAGE_CHILDREN). The pandas
baseline is the same job written the obvious way (groupby + a per-user loop for history)
on the first ``--pandas-rows`` rows. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recsys.config import load_config  # noqa: E402
from recsys.rundir import RunDir  # noqa: E402

log = logging.getLogger("bench")
TARGET_SECONDS, TARGET_RSS_GB, TARGET_SPEEDUP = 30.0, 4.0, 5.0


def generate(out: Path, rows: int, items: int, events_per_user: int, seed: int) -> None:
    """A contract-format dataset: impressions with click/conversion/rating, items with text and features."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    users = max(1, rows // events_per_user)
    user = np.sort(rng.integers(0, users, rows))  # grouped by user, ~events_per_user each
    popularity = 1.0 / (np.arange(items) + 10.0) ** 0.9
    item = np.searchsorted(np.cumsum(popularity), rng.random(rows) * popularity.sum()).clip(0, items - 1)
    click = (rng.random(rows) < 0.3).astype(np.int8)
    conversion = (click == 1) & (rng.random(rows) < 0.2)
    rating = np.where(click == 1, rng.integers(1, 6, rows), np.nan)
    pl.DataFrame({
        "user_id": pl.Series(user).cast(pl.String).str.pad_start(7, "0"),
        "item_id": item.astype(np.int64),
        "timestamp": rng.integers(1_600_000_000, 1_600_000_000 + 30 * 86_400, rows),
        "click": click,
        "conversion": conversion.astype(np.int8),
        "rating": pl.Series(rating).fill_nan(None),
    }).write_parquet(out / "interactions.parquet")
    ids = np.arange(items, dtype=np.int64)
    frame = pl.DataFrame({"item_id": ids, "genre": ids % 97, "price": rng.gamma(2.0, 10.0, items)})
    frame.with_columns(text=pl.format("item {} in genre {}", "item_id", "genre")).write_parquet(out / "items.parquet")


def run_prepare_child(run_dir: Path) -> tuple[float, float, float, dict]:
    """prepare() in a fresh process: (wall seconds, CPU seconds, peak RSS in GB, summary)."""
    code = (
        "import logging, sys; sys.path.insert(0, %r); logging.basicConfig(level=logging.INFO, format='%%(asctime)s %%(message)s');"
        "from features.pipeline import prepare; from recsys.rundir import RunDir; prepare(RunDir(%r))" % (str(REPO), str(run_dir))
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_gb = usage.ru_maxrss / 1024**2  # Linux: KiB
    summary = json.loads((run_dir / "summary.json").read_text())["prepare"]
    return seconds, usage.ru_utime + usage.ru_stime, peak_gb, summary


def pandas_prepare(dataset: Path, out: Path, rows: int, history_len: int) -> float:
    """The obvious pandas version of the same job on the first ``rows`` rows; returns seconds."""
    started = time.perf_counter()
    inter = pd.read_parquet(dataset / "interactions.parquet").head(rows)
    items = pd.read_parquet(dataset / "items.parquet")
    item_idx = {item_id: i + 1 for i, item_id in enumerate(sorted(items["item_id"]))}
    user_idx = {user_id: i + 1 for i, user_id in enumerate(sorted(inter["user_id"].unique()))}
    inter["item_idx"] = inter["item_id"].map(item_idx)
    inter["user_idx"] = inter["user_id"].map(user_idx)
    valid_from, test_from = inter["timestamp"].quantile([0.8, 0.9], interpolation="higher")
    inter["split"] = np.where(inter["timestamp"] >= test_from, "test", np.where(inter["timestamp"] >= valid_from, "valid", "train"))
    histories = {}
    for _, events in inter.sort_values(["user_idx", "timestamp"]).groupby("user_idx"):
        clicked: list[tuple[int, int]] = []  # (timestamp, item_idx) so far
        for index, row in events.iterrows():
            histories[index] = [item for ts, item in clicked if ts < row["timestamp"]][-history_len:]
            if row["click"] == 1:
                clicked.append((row["timestamp"], row["item_idx"]))
    inter["history"] = pd.Series(histories)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in inter.groupby("split"):
        part.drop(columns="split").to_parquet(out / f"{name}.parquet")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--events-per-user", type=int, default=100)
    parser.add_argument("--pandas-rows", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--history-len", type=int, default=50, help="data.history_len (the README's figures were measured at 50, the default before it became 100)")
    parser.add_argument("--workdir", default=None, help="keep the dataset and run here (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(args.workdir or tmp)
        dataset, run_dir = work / "dataset", work / "run"
        started = time.perf_counter()
        generate(dataset, args.rows, args.items, args.events_per_user, args.seed)
        log.info("generated %d interactions, %d items in %.1f s", args.rows, args.items, time.perf_counter() - started)

        RunDir.create(run_dir, load_config(None, [f"data.seed={args.seed}", f"data.history_len={args.history_len}"]), dataset)
        load_before = os.getloadavg()[0]
        seconds, cpu_seconds, peak_gb, summary = run_prepare_child(run_dir)
        log.info("prepare: %.1f s (%.1f CPU s), peak RSS %.2f GB", seconds, cpu_seconds, peak_gb)

        pandas_rows = min(args.pandas_rows, args.rows)
        pandas_seconds = pandas_prepare(dataset, work / "pandas", pandas_rows, args.history_len)
        log.info("pandas on %d rows: %.1f s", pandas_rows, pandas_seconds)

    speedup = (pandas_seconds / pandas_rows) / (seconds / args.rows)
    result = {
        "benchmark": "pipeline.prepare",
        "rows": args.rows,
        "items": args.items,
        "seconds": round(seconds, 2),
        "prepare_seconds_inside": summary["seconds"],
        "cpu_seconds": round(cpu_seconds, 2),
        "load_average_before": round(load_before, 1),  # the machine is shared: > 2 means contended cores
        "timings_s": summary["timings_s"],
        "peak_rss_gb": round(peak_gb, 3),
        "history_mean_len": summary["history"]["mean_len"],
        "rows_out": summary["rows_out"],
        "pandas_rows": pandas_rows,
        "pandas_seconds": round(pandas_seconds, 2),
        "speedup_per_row_vs_pandas": round(speedup, 1),
        "targets": {"seconds": TARGET_SECONDS, "peak_rss_gb": TARGET_RSS_GB, "speedup": TARGET_SPEEDUP},
        "meets_targets": seconds <= TARGET_SECONDS and peak_gb <= TARGET_RSS_GB and speedup >= TARGET_SPEEDUP,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
