"""Benchmark the training job's memory: the train split in memory against the same split read in chunks.

    .venv/bin/python benchmarks/train_memory.py [--rows 2000000] [--items 100000] [--budget-mb 64]

The dataset is ``benchmarks/pipeline.py``'s (impressions grouped by user, Zipf-like items, no
content), prepared once with history 50. Then one epoch of ``recsys train`` runs twice, each in
a fresh process that reports its own peak RSS: with ``train.memory_budget_mb = 0`` (the whole
split in memory: 36 bytes a row plus 4 per history item, ``training.data.bytes_per_row``) and with
``--budget-mb`` (``training.data.StreamedSplit``: the 1-D columns whole, the other rows a window at a time). The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pipeline import generate  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from recsys.config import load_config
from recsys.rundir import RunDir
from recsys.cli import run_step
run = RunDir({run!r})
started = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - started, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def child(run: Path, body: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), run=str(run), body=body)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--budget-mb", type=int, default=64)
    parser.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="recsys-bench-memory-"))
    generate(work / "data", args.rows, args.items, events_per_user=100, seed=0)
    from recsys.config import load_config
    from recsys.rundir import RunDir

    out: dict[str, object] = {"rows": args.rows, "items": args.items, "budget_mb": args.budget_mb}
    runs = {}
    for name, budget in (("in_memory", 0), ("chunks", args.budget_mb)):
        cfg = load_config(None, ["train.epochs=1", "train.batch_size=4096", "eval.baseline_mf=false", f"train.memory_budget_mb={budget}", "model.use_text=false", "model.use_image=false", "data.history_len=50"])
        runs[name] = RunDir.create(work / name, cfg, work / "data").root
    prepared = child(runs["in_memory"], "run_step('prepare', run)")
    shutil.copytree(runs["in_memory"] / "data", runs["chunks"] / "data", dirs_exist_ok=True)  # the same prepared rows
    out["prepare_s"] = round(prepared["seconds"], 1)
    for name, path in runs.items():
        started = time.perf_counter()
        measured = child(path, "run_step('train', run)")
        summary = json.loads((path / "summary.json").read_text())["train"]
        out[name] = {"peak_rss_mb": round(measured["peak_rss_mb"]), "seconds": round(time.perf_counter() - started, 1),
                     "samples_per_s": round(summary["samples_per_s"] or 0), "read": summary["train_read"], "train_rows": summary["train_rows"]}  # fmt: skip
        print(f"{name}: peak RSS {out[name]['peak_rss_mb']} MB, {out[name]['seconds']} s, {out[name]['samples_per_s']} samples/s ({out[name]['read']})", flush=True)
    out["rss_saved_mb"] = out["in_memory"]["peak_rss_mb"] - out["chunks"]["peak_rss_mb"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
