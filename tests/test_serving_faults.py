"""The service under faults, with real `recsys serve` processes on loopback: hostile ids, kill -9, damaged files, load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from recsys.rundir import RunDir, read_json, sha256_file, write_json

from service import ADMIN, FIRST_INT_ITEM, REPO, Server, integer_id_run, serving, string_id_run
from test_index import N_ITEMS
from test_serving import png

HOSTILE_IDS = ["--5", "%C2%B2", "%D9%A3", "5%0A", "%2B-5", "9223372036854775808", "-9223372036854775809", "1e3", "0x1F", "%00", "%F0%9F%98%80"]


def check_hostile_ids(client: httpx.Client) -> None:
    """On an integer catalogue: ids that are no int64 are 422, never 500; a real one is served."""
    statuses = {raw: client.get(f"/items/{raw}/similar").status_code for raw in HOSTILE_IDS}
    statuses |= {f"user {raw!r}": client.post("/recommend", json={"user_id": raw}).status_code for raw in ["--5", "²", "5\n", " 5"]}
    statuses |= {f"history {raw!r}": client.post("/recommend", json={"history": [raw]}).status_code for raw in ["--5", "²"]}
    assert set(statuses.values()) == {422}, statuses
    assert client.get(f"/items/{FIRST_INT_ITEM + 3}/similar", params={"k": 2}).status_code == 200


def _add_until_killed(server: Server, prefix: str, acknowledged: list[str], stop: threading.Event) -> None:
    """POST /items, 1-3 items a call, recording the ids of every 201, until the server dies."""
    n = 0
    with httpx.Client(base_url=server.base, timeout=10) as client:
        while not stop.is_set():
            ids = [f"{prefix}-{n + j}" for j in range(1 + n % 3)]
            n += len(ids)
            items = [{"item_id": item_id, "image_base64": png((n % 250, 40, 90))} for item_id in ids]
            try:
                response = client.post("/items", json={"items": items}, headers=ADMIN)
            except httpx.TransportError:
                return  # killed mid-request: that add was never acknowledged
            if response.status_code == 201:
                acknowledged.extend(ids)


@pytest.mark.slow  # two server starts: ~11 s
def test_kill_9_during_a_burst_of_adds_loses_no_acknowledged_item(tmp_path):
    run = string_id_run(tmp_path / "run")
    server = Server(run)
    server.wait_healthy()
    acknowledged: list[str] = []
    stop = threading.Event()
    writers = [threading.Thread(target=_add_until_killed, args=(server, f"w{w}", acknowledged, stop)) for w in range(3)]
    for writer in writers:
        writer.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 40 and time.monotonic() < deadline:
        time.sleep(0.005)
    server.kill()  # SIGKILL with adds in flight
    stop.set()
    for writer in writers:
        writer.join(timeout=10)
    server.stop()
    assert len(acknowledged) >= 40
    with serving(run) as restarted, httpx.Client(base_url=restarted.base, timeout=10) as client:
        items = client.get("/healthz").json()["items"]
        print(json.dumps({"acknowledged_before_kill": len(acknowledged), "added_items_after_restart": items - N_ITEMS}))
        assert items >= N_ITEMS + len(acknowledged)  # adds in flight at the kill may have landed too
        missing = [item_id for item_id in acknowledged if client.get(f"/items/{item_id}/similar", params={"k": 1}).status_code != 200]
        assert missing == []
        added = client.post("/items", json={"items": [{"item_id": "after-restart", "text": "t"}]}, headers=ADMIN)
        assert added.status_code == 201 and added.json()["count"] == items + 1


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage_with_a_matching_checksum(run: RunDir) -> str:
    """A crafted index file whose checksum index.json vouches for: faiss.read_index must refuse it, not crash."""
    meta = read_json(run.index / "index.json")
    path = run.index / meta["files"]["index"]
    path.write_bytes(b"IxMp" + os.urandom(4096))
    meta["sha256"]["index"] = sha256_file(path)
    write_json(run.index / "index.json", meta)
    return path.name


DAMAGES = {
    "truncated index": lambda run: (_truncate(run.index / read_json(run.index / "index.json")["files"]["index"]), read_json(run.index / "index.json")["files"]["index"])[1],
    "crafted index": _garbage_with_a_matching_checksum,
    "truncated model": lambda run: (_truncate(run.model / "model.safetensors"), "model.safetensors")[1],
}


@pytest.mark.slow  # three server starts at once: ~15 s on 2 cores
def test_a_damaged_index_or_model_file_stops_recsys_serve_with_an_error_naming_it(tmp_path):
    """Each damage on its own run copy; the servers start together (each spends seconds importing torch)."""
    started = {}
    for name, damage in DAMAGES.items():
        run = string_id_run(tmp_path / name.replace(" ", "-"))
        damaged_file = damage(run)
        command = [sys.executable, "-m", "recsys", "-q", "serve", "--run", str(run.root), "--port", "1"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        started[name] = (damaged_file, subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for name, (damaged_file, process) in started.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, (name, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])
        error = [line for line in stderr.splitlines() if line.startswith("recsys: error:")]
        assert len(error) == 1 and damaged_file in error[0], (name, stderr[-2000:])


# -- load: fixed-rate /recommend while adds and reloads loop -----------------------------------
def load_under_writes(run: RunDir, seconds: float, rate_per_s: float) -> dict:
    """Open-loop /recommend at ``rate_per_s`` for ``seconds`` while POST /items and /admin/reload (of the same run) loop.

    ``run`` has integer ids (``integer_id_run``); the hostile ids are tried first, on the same server.
    """
    with serving(run) as server:
        with httpx.Client(base_url=server.base, timeout=10) as client:
            check_hostile_ids(client)
        stop = threading.Event()
        adds: list[tuple[int, list[str]]] = []
        reloads: list[int] = []

        def add_loop() -> None:
            with httpx.Client(base_url=server.base, timeout=30) as client:
                n = 0
                while not stop.is_set():
                    ids = [10_000 + n, 10_001 + n]
                    n += 2
                    items = [{"item_id": item_id, "image_base64": png((n % 250, 10, 10))} for item_id in ids]
                    adds.append((client.post("/items", json={"items": items}, headers=ADMIN).status_code, ids))

        def reload_loop() -> None:
            with httpx.Client(base_url=server.base, timeout=60) as client:
                while not stop.is_set():
                    reloads.append(client.post("/admin/reload", json={"run": str(run.root)}, headers=ADMIN).status_code)

        def one_request(client: httpx.Client, user: int) -> tuple[int, float]:
            started = time.perf_counter()
            try:
                status = client.post("/recommend", json={"user_id": user, "k": 10}).status_code
            except httpx.TransportError:
                status = 0
            return status, time.perf_counter() - started

        writers = [threading.Thread(target=add_loop), threading.Thread(target=reload_loop)]
        for writer in writers:
            writer.start()
        results = []
        with httpx.Client(base_url=server.base, timeout=30, limits=httpx.Limits(max_connections=16)) as client, ThreadPoolExecutor(16) as pool:
            t0, futures = time.perf_counter(), []
            for i in range(int(seconds * rate_per_s)):
                time.sleep(max(0.0, t0 + i / rate_per_s - time.perf_counter()))  # open loop: the schedule does not wait for answers
                futures.append(pool.submit(one_request, client, 1 + i % 20))
            results = [f.result() for f in futures]
        stop.set()
        for writer in writers:
            writer.join(timeout=60)
        acknowledged = [item_id for status, ids in adds if status == 201 for item_id in ids]
        with httpx.Client(base_url=server.base, timeout=10) as client:
            lost = [item_id for item_id in acknowledged if client.get(f"/items/{item_id}/similar", params={"k": 1}).status_code != 200]
    latencies_ms = np.array([s for _, s in results]) * 1000
    return {
        "requests": len(results), "failed": sum(status != 200 for status, _ in results),
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 1), "p99_ms": round(float(np.percentile(latencies_ms, 99)), 1),
        "adds": len(adds), "add_statuses": sorted({status for status, _ in adds}), "acknowledged_items": len(acknowledged), "lost_items": lost,
        "reloads": len(reloads), "reload_statuses": sorted(set(reloads)),
    }


def check_load(figures: dict) -> None:
    print(json.dumps(figures))
    assert figures["failed"] == 0 and figures["lost_items"] == []
    assert figures["reloads"] >= 2 and figures["reload_statuses"] == [200]
    assert figures["acknowledged_items"] >= 10 and set(figures["add_statuses"]) <= {201, 503}  # 503: refused, never acknowledged


def test_hostile_ids_and_recommend_at_a_fixed_rate_while_adds_and_reloads_loop_fail_nothing(tmp_path):
    check_load(load_under_writes(integer_id_run(tmp_path / "run"), seconds=3, rate_per_s=40))


@pytest.mark.slow
def test_recommend_at_a_fixed_rate_for_60_s_while_adds_and_reloads_loop_fails_nothing(tmp_path):
    check_load(load_under_writes(integer_id_run(tmp_path / "run"), seconds=60, rate_per_s=100))
