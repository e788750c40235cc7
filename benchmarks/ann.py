"""ANN benchmark: ItemIndex (IVF or HNSW) against exact inner-product search.

Data (``--data``): "topics" (default) is a two-level mixture, closer to trained item-tower
vectors than iid gaussians: one unit topic centre per 1000 items, 20 sub-clusters around each
(spread ``--sub-spread``), items around those (noise ``--noise``), all L2-normalised, so a
query's top-100 lies mostly within its topic, across several sub-clusters. "flat" is a
one-level mixture of 50-item clusters: a query's top-100 is then its cluster plus near-random
points, close to the iid worst case. Queries come from the same mixture, independently of the
items (they are not perturbed catalogue items).

Measures build time, recall@100 against exact search, and queries/s of both, batched
(throughput) and one query at a time on one thread (as the service calls it). Prints a final JSON line.

    python benchmarks/ann.py [--items 1000000 --dim 64 --kind ivf]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.config import IndexConfig  # noqa: E402
from serving.index import ItemIndex, exact_top, normalise, recall_at  # noqa: E402


def mixture(centres: np.ndarray, n: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors around randomly picked centres (gaussian noise of norm ~``spread``). (n, d)"""
    dim = centres.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # chunks keep the temporaries small
        stop = min(n, start + 100_000)
        picks = rng.integers(0, len(centres), stop - start)
        out[start:stop] = centres[picks] + rng.normal(scale=spread / math.sqrt(dim), size=(stop - start, dim))
    return normalise(out)


def centres_for(args: argparse.Namespace, rng: np.random.Generator) -> np.ndarray:
    if args.data == "flat":
        return normalise(rng.normal(size=(max(1, args.items // 50), args.dim)))
    topics = normalise(rng.normal(size=(max(1, args.items // 1000), args.dim)))
    subs = np.repeat(topics, 20, axis=0)
    return normalise(subs + rng.normal(scale=args.sub_spread / math.sqrt(args.dim), size=subs.shape))


def per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--data", choices=["topics", "flat"], default="topics")
    parser.add_argument("--sub-spread", type=float, default=0.8, help="sub-cluster spread around a unit topic centre")
    parser.add_argument("--noise", type=float, default=0.6, help="item noise around its unit sub-cluster centre")
    parser.add_argument("--kind", choices=["ivf", "hnsw"], default="ivf")
    parser.add_argument("--queries", type=int, default=1000, help="batched queries timed (ANN and exact)")
    parser.add_argument("--single", type=int, default=100, help="one-at-a-time queries timed (exact is slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    centres = centres_for(args, rng)
    t0 = time.perf_counter()
    items = mixture(centres, args.items, args.noise, rng)
    calibration = mixture(centres, 500, args.noise, rng)
    queries = mixture(centres, args.queries, args.noise, rng)
    data_s = time.perf_counter() - t0
    ids = np.arange(1, args.items + 1, dtype=np.int64)
    print(f"data: {args.items} x {args.dim} in {data_s:.1f} s", file=sys.stderr)

    t0 = time.perf_counter()
    cfg = IndexConfig(kind=args.kind, exact_below=0)
    index = ItemIndex.build(items, ids, ids, ids.tolist(), cfg, queries=calibration, seed=args.seed)
    build_s = time.perf_counter() - t0
    print(f"build: {build_s:.1f} s, params {index.params}, calibration recall {index.recall:.3f}", file=sys.stderr)

    # recall@100 on held-out queries (not the calibration sample)
    t0 = time.perf_counter()
    truth = ids[exact_top(items, queries, 100)]
    exact_batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    found, _ = index.search(queries, 100)
    ann_batch_s = time.perf_counter() - t0
    recall = recall_at(found, truth)

    single = queries[: args.single]
    batch_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query at a time, as the service runs them (serve.threads = 1)
    t0 = time.perf_counter()
    for q in single:
        exact_top(items, q[None, :], 100)
    exact_single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for q in single:
        index.search(q[None, :], 100)
    ann_single_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(batch_threads)

    result = {
        "benchmark": "ann",
        "data": f"{args.data}: {len(centres)} gaussian clusters, noise {args.noise}" + (f", sub-spread {args.sub_spread}" if args.data == "topics" else ""),
        "items": args.items,
        "dim": args.dim,
        "kind": index.kind,
        "params": index.params,
        "threads": {"batched": batch_threads, "single": 1},
        "build_s": round(build_s, 1),
        "recall@100": round(recall, 4),
        "calibration_recall@100": round(index.recall, 4),
        "batched_qps": {"ann": per_second(len(queries), ann_batch_s), "exact": per_second(len(queries), exact_batch_s)},
        "single_qps": {"ann": per_second(len(single), ann_single_s), "exact": per_second(len(single), exact_single_s)},
        "speedup_batched": round(exact_batch_s / ann_batch_s, 1),
        "speedup_single": round(exact_single_s / len(single) / (ann_single_s / len(single)), 1),
        "ann_single_ms": round(1000 * ann_single_s / len(single), 3),
        "memory_mb": round(index.count * args.dim * 4 / 2**20, 1),
        "targets_met": bool(recall >= 0.95 and exact_batch_s / ann_batch_s >= 20),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
