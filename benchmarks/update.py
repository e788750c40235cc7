"""Benchmark ``recsys update`` on a drifting 10-day synthetic stream: updated vs stale vs full retrain.

    .venv/bin/python benchmarks/update.py [--users 2000] [--items 1000] [--days 10] [--epochs 5] [--out DIR]

Data: ``recsys data synth --days D`` (users and items arrive day by day, preferences drift).
Runs, each a real ``recsys`` process timed from outside:

- base: ``recsys run`` on days 1..D-3 (its test window: day D-2);
- two chained daily updates: ``recsys update`` base -> day D-2 (test D-1) -> day D-1 (test D);
- full: ``recsys run`` on days 1..D-1 from scratch (test D), the reference;
- stale: the base model scored on day D's rows (``training.gate``: same rows as the update);
- a corrupted update: day D-1 with shuffled click/conversion labels, which the gate must refuse.

Targets (issue 13): the last update within 0.01 AUC of the full retrain on click, CVR and CTCVR
and within 5% on recall@20; the stale base measurably worse; one update's wall time <= 1/4 of
the full retrain's; users and items new on day D-1 get recommendations. The last line printed
is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recsys.rundir import RunDir, read_json, write_json  # noqa: E402

TASKS = (("click", "auc"), ("conversion", "auc"), ("ctcvr", "auc"))


def recsys(*args: str) -> tuple[float, int, str]:
    """Run ``recsys ARGS`` as a process: (wall seconds, exit code, stderr tail)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "recsys", "-q", *args], cwd=REPO, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done.returncode, done.stderr[-2000:]


def must(*args: str) -> float:
    seconds, code, err = recsys(*args)
    if code != 0:
        raise SystemExit(f"recsys {' '.join(args)} failed ({code}):\n{err}")
    return seconds


def figures(metrics: dict) -> dict[str, float]:
    out = {f"{task}.{name}": metrics[task][name] for task, name in TASKS if task in metrics}
    out["retrieval.recall@20"] = metrics["retrieval"]["recall@20"]
    return out


def shuffled(window: Path, out: Path, seed: int = 0) -> Path:
    """A copy of a window dataset whose train rows' click and conversion labels are permuted (the gate must refuse it)."""
    out.mkdir(parents=True)
    for entry in window.iterdir():
        if entry.name != "interactions.parquet":
            (out / entry.name).symlink_to(entry.resolve())
    rows = pl.read_parquet(window / "interactions.parquet")
    train = rows.filter(pl.col("split") == "train")
    labels = train.select("click", "conversion", "rating").sample(fraction=1.0, shuffle=True, seed=seed)
    train = train.with_columns(labels["click"], labels["conversion"], labels["rating"])
    pl.concat([train, rows.filter(pl.col("split") != "train")]).write_parquet(out / "interactions.parquet")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every run (fixed: no valid day)")
    parser.add_argument("--update-epochs", type=int, default=1, help="epochs of each update (0 = --epochs)")
    parser.add_argument("--replay", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-update-"))
    root.mkdir(parents=True, exist_ok=True)
    d = args.days
    common = [f"train.epochs={args.epochs}", f"train.patience={args.epochs}", "eval.bootstrap=50", *args.set]
    sets = sum((["--set", s] for s in common), [])
    update_sets = ["--set", f"update.replay={args.replay}", "--set", f"update.epochs={args.update_epochs or args.epochs}"]

    if not (root / "stream" / "stream.json").is_file():
        must("data", "synth", "--days", str(d), "--users", str(args.users), "--items", str(args.items), "--seed", str(args.seed), "--out", str(root / "stream"))
    windows = {
        "base": (f"1-{d - 3}", d - 2), "day_a": (str(d - 2), d - 1), "day_b": (str(d - 1), d), "full": (f"1-{d - 1}", d),
    }  # fmt: skip
    for name, (train, test) in windows.items():
        if not (root / name / "interactions.parquet").is_file():
            must("data", "window", "--source", str(root / "stream"), "--train", train, "--test", str(test), "--out", str(root / name))

    timed = root / "seconds.json"  # kept, so that --out DIR again reuses the finished runs
    seconds = read_json(timed) if timed.is_file() else {}
    commands = {
        "base": ("run", "--data", str(root / "base"), "--out", str(root / "base_run"), *sets),
        "update_a": ("update", "--run", str(root / "base_run"), "--data", str(root / "day_a"), "--out", str(root / "run_a"), *update_sets),
        "update_b": ("update", "--run", str(root / "run_a"), "--data", str(root / "day_b"), "--out", str(root / "run_b"), *update_sets),
        "full": ("run", "--data", str(root / "full"), "--out", str(root / "full_run"), *sets),
    }
    for name, command in commands.items():
        if name not in seconds:
            seconds[name] = must(*command)
            write_json(timed, seconds)
    if not (root / "run_b_corrupt" / "update.json").is_file() or "corrupt" not in seconds:
        shutil.rmtree(root / "run_b_corrupt", ignore_errors=True)
        shutil.rmtree(root / "day_b_shuffled", ignore_errors=True)
        corrupt_s, corrupt_code, _ = recsys("update", "--run", str(root / "run_a"), "--data", str(shuffled(root / "day_b", root / "day_b_shuffled")), "--out", str(root / "run_b_corrupt"), *update_sets)
        seconds["corrupt"], seconds["corrupt_code"] = corrupt_s, corrupt_code
        write_json(timed, seconds)
    corrupt_s, corrupt_code = seconds["corrupt"], seconds["corrupt_code"]

    updated = figures(read_json(root / "run_b" / "metrics.json"))
    full = figures(read_json(root / "full_run" / "metrics.json"))
    gate_b = read_json(root / "run_b" / "update.json")["gate"]
    stale = {name: row["live"] for name, row in gate_b["metrics"].items()}  # run_a, scored on day D's rows
    from training.gate import gate

    stale_base = {name: row["live"] for name, row in gate(RunDir(root / "run_b"), RunDir(root / "base_run"), write=False)["metrics"].items()}
    corrupt = read_json(root / "run_b_corrupt" / "update.json") if (root / "run_b_corrupt" / "update.json").is_file() else {}

    from serving.recommender import Recommender

    recommender = Recommender.load(RunDir(root / "run_b"))
    day_users = pl.read_parquet(root / "stream" / f"day{d - 1:02d}" / "truth_users.parquet")
    arrived = day_users.filter(pl.col("arrived_at") >= pl.read_parquet(root / "stream" / f"day{d - 1:02d}" / "interactions.parquet")["timestamp"].min())["user_id"].to_list()
    served_new = [u for u in arrived[:50] if recommender.user_row.get(u) and recommender.recommend(user_id=u, k=10).items]
    items_before = set(pl.read_parquet(root / "stream" / f"day{d - 2:02d}" / "items.parquet")["item_id"])
    new_items = [i for i in pl.read_parquet(root / "stream" / f"day{d - 1:02d}" / "items.parquet")["item_id"] if i not in items_before]
    similar_new = [i for i in new_items[:50] if recommender.similar(i, 5)]

    full_steps = read_json(root / "full_run" / "summary.json")
    full_model_s = round(sum(full_steps[step]["seconds"] for step in ("prepare", "embed", "train", "index") if "seconds" in full_steps.get(step, {})), 2)  # a usable model, before its report
    gaps = {name: round(updated[name] - full[name], 4) for name in updated if name in full}
    recall_ratio = updated["retrieval.recall@20"] / full["retrieval.recall@20"] if full["retrieval.recall@20"] else None
    summary = {
        "data": {"users": args.users, "items": args.items, "days": d, "epochs": args.epochs, "update_epochs": args.update_epochs or args.epochs, "replay": args.replay},
        "updated": updated, "full_retrain": full, "stale_base": stale_base, "stale_yesterday": stale,
        "updated_minus_full": gaps,
        "recall_ratio_updated_over_full": round(recall_ratio, 4) if recall_ratio else None,
        "seconds": {k: round(v, 1) for k, v in seconds.items() if k != "corrupt_code"},
        "update_over_full_wall": round(seconds["update_b"] / seconds["full"], 3),
        "to_verdict_s": {"update_b": read_json(root / "run_b" / "update.json")["seconds_to_verdict"], "full_until_indexed": full_model_s},
        "update_verdict_over_full_model": round(read_json(root / "run_b" / "update.json")["seconds_to_verdict"] / full_model_s, 3),
        "gate_normal": {"passed": gate_b["passed"]},
        "gate_corrupted": {"exit_code": corrupt_code, "published": corrupt.get("published"), "seconds": round(corrupt_s, 1)},
        "new_users_served": [len(served_new), min(50, len(arrived))],
        "new_items_similar": [len(similar_new), min(50, len(new_items))],
        "targets": {
            "auc_within_0.01": all(abs(gaps[n]) <= 0.01 or gaps[n] > 0 for n in gaps if n.endswith(".auc")),
            "recall_within_5pct": recall_ratio is not None and recall_ratio >= 0.95,
            "stale_worse": all(stale_base[n] < updated[n] for n in updated if n in stale_base),
            "update_le_quarter_of_full": seconds["update_b"] <= seconds["full"] / 4,
            "update_verdict_le_quarter_of_full_model": read_json(root / "run_b" / "update.json")["seconds_to_verdict"] <= full_model_s / 4,
            "corrupted_refused": corrupt_code != 0 and corrupt.get("published") is False,
        },
        "dir": str(root),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
