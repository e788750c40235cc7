"""`recsys update --follow` and `recsys serve --follow`: events in, a trained generation published and served, SIGTERM out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import polars as pl
import pytest
from fastapi.testclient import TestClient

from features.synth import synthesize
from recsys.cli import main as recsys_main
from recsys.rundir import PUBLISHED_FILE, RunDir, read_json, write_json
from serving.app import create_app

from service import ADMIN, TOKEN, serving
from test_update import FAST

REPO = Path(__file__).resolve().parents[1]


def test_a_service_following_a_directory_reloads_each_published_run(tmp_path):
    from service import string_id_run

    run = string_id_run(tmp_path / "runs" / "a")
    shutil.copytree(run.root, tmp_path / "runs" / "b")
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    service = client.app.state.service
    stop = threading.Event()
    reloads: list[int] = []
    follower = threading.Thread(target=service.follow, args=(tmp_path / "runs" / "follow", client.app.state.contract, stop, lambda: reloads.append(1)))
    (tmp_path / "runs" / "follow").mkdir()
    follower.start()
    try:
        (tmp_path / "runs" / "follow" / PUBLISHED_FILE).write_text("{not json")  # half-written or damaged: ignored
        write_json(tmp_path / "runs" / "follow" / PUBLISHED_FILE, {"run": str(tmp_path / "runs" / "missing")})  # not a run: skipped, the live one stays
        time.sleep(2.5)
        assert service.recommender.run.root == run.root
        write_json(tmp_path / "runs" / "follow" / PUBLISHED_FILE, {"run": str(tmp_path / "runs" / "b")})
        deadline = time.monotonic() + 30
        while service.recommender.run.root != tmp_path / "runs" / "b":
            assert time.monotonic() < deadline, "not reloaded"
            time.sleep(0.1)
        assert reloads == [1] and client.post("/recommend", json={"user_id": "u1", "k": 3}).status_code == 200
    finally:
        stop.set()
        follower.join(timeout=10)


@pytest.mark.slow
def test_events_reach_a_published_generation_that_the_following_service_serves(tmp_path):
    runs = tmp_path / "runs"
    synthesize(tmp_path / "data", users=300, items=200, seed=4, images=False)
    assert recsys_main(["-q", "run", "--data", str(tmp_path / "data"), "--out", str(runs / "base"), *sum((["--set", s] for s in FAST), [])]) == 0
    base = RunDir(runs / "base")
    items = pl.read_parquet(base.data / "items.parquet")["item_id"].to_list()
    settings = ["update.epochs=1", "update.follow_every_s=0", "update.follow_min_events=20", "update.follow_poll_s=0.5", "update.gate=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    follower = subprocess.Popen([sys.executable, "-m", "recsys", "-q", "update", "--follow", "--run", str(base.root), "--out", str(runs / "follow"), *sum((["--set", s] for s in settings), [])],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        with serving(base, extra=["--follow", str(runs / "follow")]) as server:
            now = int(time.time())
            events = [{"user_id": "newcomer", "item_id": items[i], "timestamp": now - 60 + i} for i in range(10)]
            events += [{"user_id": f"u{i}", "item_id": items[(7 * i) % len(items)], "timestamp": now - 30 + i % 20} for i in range(30)]
            posted = time.monotonic()
            assert httpx.post(f"{server.base}/events", json={"events": events}, headers=ADMIN, timeout=30).status_code == 200
            assert httpx.post(f"{server.base}/recommend", json={"user_id": "newcomer", "k": 5}).json()["source"] == "history"  # live, not yet trained
            deadline = time.monotonic() + 240
            while (health := httpx.get(f"{server.base}/healthz").json())["run"] != str((runs / "follow" / "gen-0001").resolve()):
                assert follower.poll() is None, follower.stderr.read()
                assert time.monotonic() < deadline, f"no generation served within 240 s: {health}"
                time.sleep(0.5)
            served_after_s = time.monotonic() - posted
            body = httpx.post(f"{server.base}/recommend", json={"user_id": "newcomer", "k": 5}).json()
            assert body["source"] == "user" and len(body["items"]) == 5  # a trained user now
            assert not {e["item_id"] for e in events[:10]} & {item["item_id"] for item in body["items"]}
        published = read_json(runs / "follow" / PUBLISHED_FILE)
        assert published["generation"] == 1 and published["event_to_publish_s"] is not None
        print(json.dumps({"event_to_publish_s": published["event_to_publish_s"], "event_to_served_s": round(served_after_s, 1)}))
        generation = RunDir(runs / "follow" / "gen-0001")
        assert read_json(generation.root / "update.json")["parent"] == str(base.root.resolve())
        assert "newcomer" in pl.read_parquet(generation.data / "users.parquet")["user_id"].to_list()
    finally:
        follower.send_signal(signal.SIGTERM)
        try:
            code = follower.wait(timeout=120)
        except subprocess.TimeoutExpired:
            follower.kill()
            raise
    assert code == 0, follower.stderr.read()
    state = read_json(runs / "follow" / "follow.json")
    assert state["live"] == str((runs / "follow" / "gen-0001").resolve()) and state["generations"][0]["published"] is True
