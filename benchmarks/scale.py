"""The whole job at growing sizes: wall time and peak RSS of every step, each step its own process.

    .venv/bin/python benchmarks/scale.py [--sizes 1000000,5000000,20000000] [--items 1000000]
                                         [--prepare-rows 100000000] [--out DIR] [--text none|minilm]

For each size N: ``recsys data synth --users N/50 --items ITEMS --interactions N --no-images``
(timed apart, it is the benchmark's input, not the job), then a run directory with one training
epoch and the steps ``prepare``, ``embed``, ``train``, ``index``, ``evaluate`` as separate
``python -m recsys STEP --run RUN`` processes, so each step's peak RSS is its own (``os.wait4``).
Text is off by default (``embed.text_model=none``): MiniLM on 1M item texts would take most of
an hour on 2 cores and say nothing about scaling; ``--text minilm`` turns it on. The retrieval
metrics read a uniform sample of ``--eval-users`` test users (10,000; every user is still scored on
its test rows), so evaluate's ranking cost stays flat while the rows grow. Then ``recsys
prepare`` alone at ``--prepare-rows`` (the generator of ``benchmarks/pipeline.py``, without the
model steps). Each line printed is one step; the last line is a JSON summary with the issue's
targets (peak RSS <= 6 GB at 20M, <= 12 GB for prepare at 100M, sub-linear growth of RSS from 5M
to 20M, training samples/s at the largest size within 20% of the smallest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recsys.config import load_config  # noqa: E402
from recsys.rundir import RunDir, read_json  # noqa: E402

STEPS = ("prepare", "embed", "train", "index", "evaluate")
TARGET_RSS_GB_20M, TARGET_PREPARE_RSS_GB_100M, TARGET_TRAIN_SPEED_RATIO = 6.0, 12.0, 0.8


def child(args: list[str], log: Path) -> dict:
    """Run ``python ARGS`` in its own process; its wall seconds, its own peak RSS (MB) and exit code."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "rc": process.returncode}


def one_size(rows: int, items: int, out: Path, overrides: list[str]) -> dict:
    data, run_dir, log = out / f"data_{rows}", out / f"run_{rows}", out / f"log_{rows}.txt"
    result: dict = {"rows": rows, "items": items, "users": rows // 50, "steps": {}}
    if not (data / "interactions.parquet").is_file():
        result["synth"] = child(["-m", "recsys", "data", "synth", "--out", str(data), "--users", str(rows // 50), "--items", str(items),
                                 "--interactions", str(rows), "--no-images", "--seed", "0"], log)  # fmt: skip
        print(f"{rows:>11,} rows  synth (input)  {result['synth']['seconds']:8.1f} s  {result['synth']['peak_rss_mb']:7,} MB", flush=True)
    run = RunDir.create(run_dir, load_config(None, overrides), data)
    for step in STEPS:
        measured = result["steps"][step] = child(["-m", "recsys", step, "--run", str(run.root)], log)
        print(f"{rows:>11,} rows  {step:<14} {measured['seconds']:8.1f} s  {measured['peak_rss_mb']:7,} MB" + ("" if measured["rc"] == 0 else f"  FAILED rc={measured['rc']} (see {log})"), flush=True)
        if measured["rc"] != 0:
            result["failed_at"] = step
            return result
    summary, metrics = read_json(run.summary_path), read_json(run.metrics_path)
    train = summary.get("train", {})
    result["train_samples_per_s"] = train.get("samples_per_s")
    result["train_read"] = train.get("train_read")
    result["quality"] = {"click.auc": metrics.get("click", {}).get("auc"), "retrieval.recall@20": metrics.get("retrieval", {}).get("recall@20")}
    result["peak_rss_mb"] = max(s["peak_rss_mb"] for s in result["steps"].values())
    result["total_seconds"] = round(sum(s["seconds"] for s in result["steps"].values()), 1)
    return result


def prepare_only(rows: int, items: int, out: Path, history_len: int) -> dict:
    """``recsys prepare`` alone on benchmarks/pipeline.py's generated impressions (~100 per user)."""
    from benchmarks.pipeline import generate

    data, run_dir, log = out / f"data_prepare_{rows}", out / f"run_prepare_{rows}", out / f"log_prepare_{rows}.txt"
    if not (data / "interactions.parquet").is_file():
        generate(data, rows, items, events_per_user=100, seed=0)
    run = RunDir.create(run_dir, load_config(None, ["embed.text_model=none", f"data.history_len={history_len}"]), data)
    measured = child(["-m", "recsys", "prepare", "--run", str(run.root)], log)
    print(f"{rows:>11,} rows  prepare alone  {measured['seconds']:8.1f} s  {measured['peak_rss_mb']:7,} MB" + ("" if measured["rc"] == 0 else f"  FAILED rc={measured['rc']}"), flush=True)
    return {"rows": rows, "items": items, **measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,5000000,20000000", help="interactions per end-to-end run, comma-separated")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--prepare-rows", type=int, default=100_000_000, help="recsys prepare alone at this many rows (0 = skip)")
    parser.add_argument("--out", default="/tmp/recsys-scale", help="datasets and runs (kept: reruns reuse the datasets)")
    parser.add_argument("--text", choices=["none", "minilm"], default="none")
    parser.add_argument("--eval-users", type=int, default=10_000, help="eval.max_eval_users: the retrieval metrics on a uniform sample of this many test users (0 = all)")
    parser.add_argument("--history-len", type=int, default=50, help="data.history_len of every run (the curve in docs/scaling.md was measured at 50, the default before it became 100)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides for the runs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["train.epochs=1", f"embed.text_model={args.text}", f"eval.max_eval_users={args.eval_users}", f"data.history_len={args.history_len}", *args.set]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    runs = [one_size(rows, args.items, out, overrides) for rows in sizes]
    prepare = prepare_only(args.prepare_rows, args.items, out, args.history_len) if args.prepare_rows else None

    done = [r for r in runs if "failed_at" not in r]
    by_rows = {r["rows"]: r for r in done}
    targets: dict = {}
    if 20_000_000 in by_rows:
        targets["peak_rss_gb_at_20m"] = round(by_rows[20_000_000]["peak_rss_mb"] / 1024, 2)
        targets["rss_20m_le_6gb"] = targets["peak_rss_gb_at_20m"] <= TARGET_RSS_GB_20M
    if {5_000_000, 20_000_000} <= by_rows.keys():
        growth = by_rows[20_000_000]["peak_rss_mb"] / by_rows[5_000_000]["peak_rss_mb"]
        targets["rss_growth_5m_to_20m"] = round(growth, 2)
        targets["rss_sublinear"] = growth < 4.0
    if len(done) >= 2 and done[0]["train_samples_per_s"] and done[-1]["train_samples_per_s"]:
        ratio = done[-1]["train_samples_per_s"] / done[0]["train_samples_per_s"]
        targets["train_speed_largest_over_smallest"] = round(ratio, 3)
        targets["train_speed_within_20pct"] = ratio >= TARGET_TRAIN_SPEED_RATIO
    if prepare and prepare["rc"] == 0:
        targets["prepare_rss_gb"] = round(prepare["peak_rss_mb"] / 1024, 2)
        targets["prepare_rss_le_12gb"] = targets["prepare_rss_gb"] <= TARGET_PREPARE_RSS_GB_100M
    print(json.dumps({"cpu_count": os.cpu_count(), "overrides": overrides, "runs": runs, "prepare_only": prepare, "targets": targets}))


if __name__ == "__main__":
    main()
