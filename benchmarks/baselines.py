"""Benchmark the factorisation baselines of ``recsys evaluate`` at scale: sparse vs dense steps, and the budget.

    .venv/bin/python benchmarks/baselines.py [--rows 5000000] [--users 200000] [--items 100000] [--steps 150]

The clicked train rows are generated here with numpy (Zipf-like item popularity, ratings 1-5),
the size of the issue's 5M-interaction case. ``--steps`` steps of BPR-MF (batch 4096) are timed
two ways, one thread each: ``training.baseline.train_bpr`` (closed-form gradients, row-wise
Adagrad on the batch's rows) and the obvious autograd version with dense Adam over the whole
tables (what the baseline did before, written out here). Then BPR-MF and biased MF are trained
as ``recsys evaluate`` trains them, within ``eval.baseline_max_samples`` sample steps (20M by
default), and timed whole. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import baseline  # noqa: E402


def generate(rows: int, users: int, items: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8
    item_idx = 1 + rng.choice(items, size=rows, p=popularity / popularity.sum())
    return pl.DataFrame(
        {
            "user_idx": rng.integers(1, users + 1, rows),
            "item_idx": item_idx,
            "click": np.ones(rows, dtype=np.int8),
            "rating": rng.integers(1, 6, rows).astype(np.float32),
        }
    )


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def dense_adam_bpr(train: pl.DataFrame, spec: baseline.MFSpec, steps: int, dim: int = 32, batch_size: int = 4096) -> None:
    """The BPR-MF baseline as it was: nn.Embedding tables, autograd, dense Adam (every step touches every row)."""
    users = torch.from_numpy(train["user_idx"].to_numpy().astype(np.int64))
    positives = torch.from_numpy(train["item_idx"].to_numpy().astype(np.int64))
    user_table, item_table = torch.nn.Embedding(spec.n_users, dim), torch.nn.Embedding(spec.n_items, dim)
    optimizer = torch.optim.Adam([*user_table.parameters(), *item_table.parameters()], lr=0.01)
    for _ in range(steps):
        rows = torch.randint(0, len(users), (batch_size,))
        u, i = user_table(users[rows]), item_table(positives[rows])
        j = item_table(torch.randint(1, spec.n_items, (batch_size,)))
        loss = -F.logsigmoid((u * (i - j)).sum(-1)).mean() + 1e-4 * (u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum()) / batch_size
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=150, help="steps timed for each table form")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = generate(args.rows, args.users, args.items, args.seed)
    spec = baseline.MFSpec(n_users=args.users + 1, n_items=args.items + 1, history_len=1)
    out: dict[str, object] = {"rows": args.rows, "users": args.users, "items": args.items, "steps": args.steps}

    before_s, _ = timed(lambda: dense_adam_bpr(train, spec, args.steps))
    after_s, _ = timed(lambda: baseline.train_bpr(train, spec, max_samples=args.steps * 4096))
    out["dense_adam_bpr_ms_per_step"] = round(1000 * before_s / args.steps, 2)
    out["rowwise_bpr_ms_per_step"] = round(1000 * after_s / args.steps, 2)
    out["bpr_speedup"] = round(before_s / after_s, 1)
    print(f"BPR-MF step: dense Adam {out['dense_adam_bpr_ms_per_step']} ms, row-wise Adagrad {out['rowwise_bpr_ms_per_step']} ms ({out['bpr_speedup']}x)", flush=True)

    bpr_s, (_, bpr_schedule) = timed(lambda: baseline.train_bpr(train, spec))
    mf_s, (_, mf_schedule) = timed(lambda: baseline.train_rating_mf(train, spec.n_users, spec.n_items))
    out["bpr_seconds"], out["bpr_training"] = round(bpr_s, 1), bpr_schedule.summary()
    out["mf_seconds"], out["mf_training"] = round(mf_s, 1), mf_schedule.summary()
    dense_bpr_estimate = out["dense_adam_bpr_ms_per_step"] * 30 * -(-args.rows // 4096) / 1000
    out["dense_bpr_30_epochs_estimate_s"] = round(dense_bpr_estimate)
    print(f"as evaluate trains them: BPR-MF {bpr_s:.1f} s ({bpr_schedule.note}), biased MF {mf_s:.1f} s ({mf_schedule.note})")
    print(f"before (dense Adam, 30 epochs of BPR-MF on every row): about {dense_bpr_estimate:.0f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
