"""Serving benchmark: `recsys serve` (uvicorn, one process) over a 1M-item catalogue, loopback only.

Builds (once, cached in ``--run-dir``) a run with 1M items, 100k users, random content vectors
and an untrained model, indexes it with ``recsys index``'s ``build_index``, starts
``python -m recsys serve`` in a subprocess and drives it from a separate client process with a
light keep-alive HTTP/1.1 client (asyncio streams, so the client's own CPU stays small on a
2-core machine):

1. open loop at ``--rate`` req/s for ``--seconds``: p50/p99 latency measured from each request's
   scheduled send time (no coordinated omission);
2. stepped open-loop rates (``--steps``), each for ``--step-seconds``: the highest rate served
   with no errors, at least 95% of the offered rate completed and p99 under ``--max-p99-ms``.

Every phase is bounded in request count and time. Where the time goes comes from the server's
own /metrics (pipeline stage histograms vs. in-app request time vs. client latency).
Prints a final JSON line.

    python benchmarks/serving.py [--items 1000000 --candidates 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# -- the run ---------------------------------------------------------------------------------
def bench_config(candidates: int, overrides: list[str] = ()):
    """The built run's config: no encoders, ``candidates`` for the ranker, history 20, then ``--set`` overrides."""
    from recsys.config import load_config

    return load_config(None, ["embed.text_model=none", "embed.image_model=none", f"serve.candidates={candidates}", "data.history_len=20", *overrides])


def cached_run_dir(args) -> Path:
    """The cache of a built run: its sizes and content in the name, and a digest of its whole config
    (a changed default builds anew); ``--set serve.*`` goes to ``recsys serve --set`` instead."""
    digest = bench_config(args.candidates, split_overrides(args.set)[0]).digest()[:8]
    return Path(args.run_dir) / f"items{args.items}-c{args.candidates}-{args.content}-config{digest}"


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """The ``--set`` overrides the built run is made with, and the ``serve.*`` ones, the server's (``recsys serve --set``)."""
    serve = [o for o in overrides if o.strip().startswith("serve.")]
    return [o for o in overrides if o not in serve], serve


def build_run(root: Path, items: int, users: int, events: int, candidates: int, content: str = "clustered", seed: int = 0, overrides: list[str] = ()) -> None:
    """A complete run (data, content, untrained model, index) with random data.

    ``content="clustered"``: item content vectors drawn around 2,000 topic centres, as real
    catalogues embed (and as ``benchmarks/ann.py`` measures); ``"isotropic"``: independent
    Gaussian directions, the worst case for any ANN index (IVF then needs a large nprobe).
    """
    import polars as pl
    import torch
    from safetensors.numpy import save_file

    from recsys.model import ModelSpec, RecsysModel, save_model
    from recsys.rundir import RunDir, write_json, write_parquet
    from serving.index import build_index

    cfg = bench_config(candidates, overrides)
    history_len, text_dim = cfg.data.history_len, 32
    run = RunDir.create(root, cfg, root)
    rng = np.random.default_rng(seed)
    item_idx = np.arange(1, items + 1)
    write_parquet(pl.DataFrame({"item_idx": item_idx}).with_columns(
        pl.format("it{}", "item_idx").alias("item_id"), pl.lit(None, pl.String).alias("text"), pl.lit(None, pl.String).alias("image")
    ).select("item_id", "item_idx", "text", "image"), run.data / "items.parquet")
    write_parquet(pl.DataFrame({"user_idx": np.arange(1, users + 1)}).with_columns(pl.format("u{}", "user_idx").alias("user_id")).select("user_id", "user_idx"), run.data / "users.parquet")
    popular = np.minimum(rng.zipf(1.3, events), items)  # a long-tailed popularity
    history = np.minimum(rng.zipf(1.3, (events, history_len)), items)
    train = pl.DataFrame({
        "user_idx": rng.integers(1, users + 1, events), "item_idx": popular, "timestamp": rng.integers(0, 10**6, events),
        "click": np.ones(events, np.int8), "conversion": rng.integers(0, 2, events).astype(np.int8),
        "rating": rng.uniform(1, 5, events).astype(np.float32), "sampled": np.zeros(events, bool),
    }).with_columns(pl.Series("history", history).cast(pl.List(pl.Int64)), pl.format("u{}", "user_idx").alias("user_id"), pl.format("it{}", "item_idx").alias("item_id"))
    write_parquet(train, run.data / "train.parquet")
    write_json(run.data / "meta.json", {"n_users": users + 1, "n_items": items + 1, "history_len": history_len, "impressions": False,
                                        "tasks": {"click": True, "conversion": True, "rating": True}, "rating_range": [1.0, 5.0],
                                        "user_features": {}, "item_features": {}, "split": "temporal", "rows": {"train": events}})
    if content == "clustered":
        centres = rng.normal(size=(2000, text_dim))
        text = (centres[rng.integers(0, len(centres), items + 1)] + 0.35 * rng.normal(size=(items + 1, text_dim))).astype(np.float32)
    else:
        text = rng.normal(size=(items + 1, text_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    run.content.mkdir(parents=True, exist_ok=True)
    save_file({"text": text, "text_mask": np.ones(items + 1, np.uint8)}, str(run.content / "embeddings.safetensors"))
    torch.manual_seed(seed)
    spec = ModelSpec(n_users=users + 1, n_items=items + 1, history_len=history_len, text_dim=text_dim,
                     tasks=("click", "conversion", "rating"), config=cfg.model)
    save_model(RecsysModel(spec).eval(), run.model)
    print(f"index: {build_index(run)}", file=sys.stderr)


# -- a light load generator (runs in its own process) ----------------------------------------
class Connection:
    """One keep-alive HTTP/1.1 connection; requests on it run one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def post(self, path: str, body: bytes, headers: bytes = b"") -> int:
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (path.encode(), headers, len(body), body))
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await self.reader.readexactly(length)
        return status


TOKEN = "bench-admin-token"


def _summary(latencies: list[float], elapsed: float, offered: float, total: int, errors: int) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "offered_rps": offered, "achieved_rps": round(len(latencies) / elapsed, 1), "requests": total, "errors": errors,
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
    }


async def open_loop(
    port: int, rate: float, seconds: float, users: int, k: int, user_format: str = "u{}", item_format: str = "it{}",
    connections: int = 16, events_rate: float = 0.0, events_batch: int = 10,
) -> dict:
    """Send /recommend at ``rate`` req/s (and POST /events at ``events_rate`` events/s in batches) for ``seconds``; latency from each scheduled send time."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(Connection(*await asyncio.open_connection("127.0.0.1", port)))
    rng = random.Random(0)
    total = int(rate * seconds)
    schedule = [(i / rate, "/recommend", json.dumps({"user_id": user_format.format(rng.randint(1, users)), "k": k}).encode() if i % 10 else
                 json.dumps({"history": [item_format.format(rng.randint(1, 1000)) for _ in range(5)], "k": k}).encode(), b"") for i in range(total)]
    event_requests = int(events_rate / events_batch * seconds) if events_rate else 0
    now = int(time.time())
    auth = b"Authorization: Bearer %s\r\n" % TOKEN.encode()
    for i in range(event_requests):
        events = [{"user_id": user_format.format(rng.randint(1, users)), "item_id": item_format.format(rng.randint(1, 1000)), "timestamp": now} for _ in range(events_batch)]
        schedule.append((i * events_batch / events_rate, "/events", json.dumps({"events": events}).encode(), auth))
    schedule.sort(key=lambda request: request[0])
    latencies: dict[str, list[float]] = {"/recommend": [], "/events": []}
    errors = {"/recommend": 0, "/events": 0}
    started = time.perf_counter()

    async def one(at: float, path: str, body: bytes, headers: bytes) -> None:
        scheduled = started + at
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        connection = await pool.get()
        try:
            status = await asyncio.wait_for(connection.post(path, body, headers), timeout=10)
            errors[path] += status != 200
            latencies[path].append(time.perf_counter() - scheduled)
            pool.put_nowait(connection)
        except (asyncio.TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            errors[path] += 1
            pool.put_nowait(Connection(*await asyncio.open_connection("127.0.0.1", port)))

    await asyncio.wait_for(asyncio.gather(*(one(*request) for request in schedule)), timeout=seconds + 30)
    elapsed = time.perf_counter() - started
    result = _summary(latencies["/recommend"], elapsed, rate, total, errors["/recommend"])
    if event_requests:
        result["events"] = {**_summary(latencies["/events"], elapsed, events_rate / events_batch, event_requests, errors["/events"]), "events_per_s": events_rate, "batch": events_batch}
    return result


def client_process(port: int, phases: list[tuple[float, float]], users: int, k: int, formats: tuple[str, str], events: tuple[float, int], out: multiprocessing.Queue) -> None:
    out.put([asyncio.run(open_loop(port, rate, seconds, users, k, *formats, events_rate=events[0], events_batch=events[1])) for rate, seconds in phases])


def run_client(port: int, phases: list[tuple[float, float]], users: int, k: int, formats: tuple[str, str] = ("u{}", "it{}"), events: tuple[float, int] = (0.0, 10)) -> list[dict]:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch, no copied state
    queue = context.Queue()
    process = context.Process(target=client_process, args=(port, phases, users, k, formats, events, queue))
    process.start()
    try:
        return queue.get(timeout=sum(s for _, s in phases) + 60 * len(phases))
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


# -- server-side breakdown -------------------------------------------------------------------
def mean_ms(metrics: str, name: str, label: str) -> float | None:
    """1000 x the mean of a histogram (a label selector such as ``stage="rank"``, or "" for none)."""
    labels = rf"\{{{label}\}}" if label else ""
    total = re.search(rf"{name}_sum{labels} ([0-9.e+-]+)", metrics)
    count = re.search(rf"{name}_count{labels} ([0-9.e+-]+)", metrics)
    if not (total and count) or float(count.group(1)) == 0:
        return None
    return round(1000 * float(total.group(1)) / float(count.group(1)), 3)


def breakdown(metrics: str) -> dict:
    stages = {stage: mean_ms(metrics, "recsys_stage_duration_seconds", f'stage="{stage}"') for stage in ("prepare", "user_tower", "retrieve", "rank")}
    in_app = mean_ms(metrics, "recsys_request_duration_seconds", 'endpoint="/recommend"')
    pipeline = sum(v for v in stages.values() if v)
    # each request records its batch's stage times: a stage's mean over requests / the batch a request ran in ~ its share of one core
    batch = mean_ms(metrics, "recsys_recommend_batch_size", "")
    return {"stages_mean_ms": stages, "in_app_mean_ms": in_app, "framework_mean_ms": round(in_app - pipeline, 3) if in_app else None,
            "batch_mean": round(batch / 1000, 2) if batch else None}


def add_items_latency(port: int, calls: int, batch: int, integer_ids: bool = False) -> dict:
    """POST /items of ``batch`` new text items, ``calls`` times one after another: p50/p99 of the call (ms).

    ``integer_ids``: the catalogue's ids are integers (MovieLens): new ids far above its own.
    """
    import httpx

    latencies, statuses = [], []
    stamp = int(time.time() * 1000)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        for call in range(calls):
            ids = [10**15 + (stamp % 10**6) * 10**6 + call * 1000 + i if integer_ids else f"bench-{stamp}-{call}-{i}" for i in range(batch)]
            items = [{"item_id": item_id, "text": f"a new item number {i} of call {call}"} for i, item_id in enumerate(ids)]
            started = time.perf_counter()
            statuses.append(client.post("/items", json={"items": items}).status_code)
            latencies.append((time.perf_counter() - started) * 1000)
    ms = np.array(latencies)
    return {"calls": calls, "items_per_call": batch, "statuses": sorted(set(statuses)), "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--run-dir", default="/tmp/recsys-bench-serving", help="cached between runs (rebuilt when incomplete)")
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--steps", default="200,300,400,500,600")
    parser.add_argument("--step-seconds", type=float, default=8)
    parser.add_argument("--max-p99-ms", type=float, default=100)
    parser.add_argument("--content", choices=["clustered", "isotropic"], default="clustered", help="item content vectors (see build_run)")
    parser.add_argument("--run", help="serve this finished run instead (e.g. MovieLens); --users and --user-format then name its users")
    parser.add_argument("--user-format", default="u{}", help="user ids sent: the format of 1..--users ('{}' for integer ids)")
    parser.add_argument("--add-calls", type=int, default=20, help="POST /items calls timed after the steady phase (0 = none)")
    parser.add_argument("--add-batch", type=int, default=10, help="new items per POST /items")
    parser.add_argument("--events-rate", type=float, default=0, help="also POST /events at this many events/s during the steady phase (0 = off)")
    parser.add_argument("--events-batch", type=int, default=10, help="events per POST /events")
    parser.add_argument("--item-format", default="it{}", help="history item ids sent (1 in 10 requests): the format of 1..1000")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable): serve.* keys go to `recsys serve --set` (also with --run), the others build their own cached run (e.g. model.attention=mlp)")
    args = parser.parse_args()
    from recsys.config import load_config
    from recsys.errors import ConfigError

    try:
        load_config(None, args.set)  # a bad key or value stops here, named, not as a server that exits during start-up
    except ConfigError as exc:
        raise SystemExit(f"--set: {exc}") from None
    build_set, serve_set = split_overrides(args.set)
    if args.run and build_set:
        raise SystemExit("--set model.* (and other sections but serve.*) configures the built run; a finished --run keeps its own config")

    root = Path(args.run) if args.run else cached_run_dir(args)
    if args.run and not (root / "index" / "index.json").is_file():
        raise SystemExit(f"{root} has no index: run `recsys index --run {root}` first")
    if not (root / "index" / "index.json").is_file():
        t0 = time.perf_counter()
        build_run(root, args.items, args.users, args.events, args.candidates, args.content, overrides=build_set)
        print(f"run built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RECSYS_ADMIN_TOKEN": TOKEN}
    serve_args = [arg for o in serve_set for arg in ("--set", o)]
    server = subprocess.Popen([sys.executable, "-m", "recsys", "-q", "serve", "--run", str(root), "--port", str(port), *serve_args],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit("server exited during start-up")
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
                break
            except httpx.TransportError:
                if time.perf_counter() - t0 > 300:
                    raise SystemExit("server not healthy within 300 s")
                time.sleep(0.5)
        load_s = time.perf_counter() - t0
        print(f"server up in {load_s:.1f} s: {health}", file=sys.stderr)
        run_client(port, [(50, 3)], args.users, args.k, (args.user_format, args.item_format))  # warm-up
        steady = run_client(port, [(args.rate, args.seconds)], args.users, args.k, (args.user_format, args.item_format), (args.events_rate, args.events_batch))[0]
        steady_breakdown = breakdown(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        print(f"at {args.rate} req/s: {steady}", file=sys.stderr)
        steps = []
        for rate in (float(r) for r in args.steps.split(",")):
            result = run_client(port, [(rate, args.step_seconds)], args.users, args.k, (args.user_format, args.item_format))[0]
            print(f"step {rate}: {result}", file=sys.stderr)
            steps.append(result)
            if not (result["errors"] == 0 and result["achieved_rps"] >= 0.95 * rate and result["p99_ms"] <= args.max_p99_ms):
                break
        adds = add_items_latency(port, args.add_calls, args.add_batch, integer_ids=args.item_format == "{}") if args.add_calls > 0 else None
        print(f"POST /items of {args.add_batch}: {adds}", file=sys.stderr)
        sustained = max([s["offered_rps"] for s in steps if s["errors"] == 0 and s["achieved_rps"] >= 0.95 * s["offered_rps"] and s["p99_ms"] <= args.max_p99_ms], default=0)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    print(json.dumps({
        "benchmark": "serving", "content": args.content, "set": args.set, "items": health["items"], "index": health["index_type"], "candidates": args.candidates, "k": args.k,
        "server_start_s": round(load_s, 1), "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "at_rate": steady, "where_time_goes": steady_breakdown, "steps": steps, "sustained_rps": sustained, "add_items": adds,
        "targets_met": bool(steady["p99_ms"] is not None and steady["p99_ms"] <= 10 and sustained >= 500 and adds is not None and adds["p99_ms"] <= 50),
    }))


if __name__ == "__main__":
    main()
