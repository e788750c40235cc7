"""serving: the retrieve -> rank pipeline, `recsys recommend` and the HTTP service (DESIGN.md)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from recsys.rundir import RunDir
from serving.app import create_app
from serving.index import build_index
from serving.pipeline import Recommender

from test_index import N_ITEMS, make_tiny_run

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def template_run(tmp_path_factory) -> RunDir:
    """A complete tiny run (data, content, untrained model, index), built once per module."""
    run = make_tiny_run(tmp_path_factory.mktemp("serving") / "run")
    build_index(run)
    return run


@pytest.fixture
def run(template_run, tmp_path) -> RunDir:
    """A private copy, for tests that change the run (upserts)."""
    return RunDir(shutil.copytree(template_run.root, tmp_path / "run"))


@pytest.fixture(scope="module")
def client(template_run) -> TestClient:
    """Read-only client over the shared run."""
    return TestClient(create_app(template_run.root, admin_token=TOKEN))


def png(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def user_clicks(user: int) -> set[str]:
    """Items user u{user} clicked in the tiny run (all splits): it{u} .. it{u+5}."""
    return {f"it{((user + j - 1) % N_ITEMS) + 1}" for j in range(6)}


# -- pipeline --------------------------------------------------------------------------------
def test_known_user_history_is_their_last_clicks_over_all_splits_oldest_first(template_run):
    recommender = Recommender.load(template_run)
    user_idx = recommender.user_row["u3"]
    assert recommender.behaviour.history[user_idx].tolist() == [4, 5, 6, 7, 8]  # clicks 3..8, last 5 (test split included)


def test_sampled_negatives_are_not_part_of_the_history_or_the_seen_set(template_run):
    recommender = Recommender.load(template_run)
    seen = recommender._seen(recommender.user_row["u3"]).tolist()
    assert sorted(seen) == [3, 4, 5, 6, 7, 8]  # the sampled negative (item 57) is absent


def test_precomputed_user_vectors_equal_the_tower_on_the_stored_history(template_run):
    recommender = Recommender.load(template_run)
    users = torch.arange(recommender.model.spec.n_users)
    with torch.inference_mode():
        direct = recommender.model.user_vectors(users, torch.from_numpy(recommender.behaviour.history))
    assert recommender.user_vecs is not None
    torch.testing.assert_close(recommender.user_vecs, direct)


def test_recommend_command_prints_a_table_with_ids_text_and_predictions(template_run, capsys):
    from serving.recommend import main

    main(template_run, user="u2", history=None, k=3)
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("#"))
    assert out[header].split() == ["#", "item_id", "text", "score", "p_click", "p_conv", "p_ctcvr", "rating"]
    rows = out[header + 1 : header + 4]
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]
    assert all("item number" in row for row in rows)


# -- /healthz, /recommend ------------------------------------------------------------------
def test_healthz_reports_the_loaded_run_and_index(client, template_run):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["run"], body["items"], body["index_type"]) == ("ok", str(template_run.root), N_ITEMS, "flat")
    assert body["model_version"].startswith("v1-")


def test_recommend_for_a_known_user_returns_k_items_with_every_prediction(client):
    body = client.post("/recommend", json={"user_id": "u3", "k": 5}).json()
    assert body["source"] == "user" and body["warnings"] == []
    assert len(body["items"]) == 5
    for item in body["items"]:
        assert set(item) == {"item_id", "score", "p_click", "p_conversion", "p_ctcvr", "rating"}
        assert 0 <= item["p_click"] <= 1 and 0 <= item["p_conversion"] <= 1
        assert item["p_ctcvr"] == pytest.approx(item["p_click"] * item["p_conversion"], rel=1e-5)
        assert 1.0 <= item["rating"] <= 5.0


def test_recommend_scores_are_the_configured_blend_sorted_descending(client):
    items = client.post("/recommend", json={"user_id": "u5", "k": 10}).json()["items"]
    for item in items:  # defaults: w_click 1, w_ctcvr 1, w_rating 0.5; rating mapped from [1, 5] to [0, 1]
        expected = (item["p_click"] + item["p_ctcvr"] + 0.5 * (item["rating"] - 1) / 4) / 2.5
        assert item["score"] == pytest.approx(expected, rel=1e-5)
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)


def test_recommend_never_returns_items_the_user_has_seen(client):
    items = client.post("/recommend", json={"user_id": "u3", "k": 20}).json()["items"]
    assert len(items) == 20
    assert not {item["item_id"] for item in items} & user_clicks(3)


def test_recommend_from_a_history_excludes_the_history_items(client):
    body = client.post("/recommend", json={"history": ["it10", "it11"], "k": 20}).json()
    assert body["source"] == "history"
    assert not {item["item_id"] for item in body["items"]} & {"it10", "it11"}


def test_unknown_history_ids_are_ignored_and_reported_in_warnings(client):
    body = client.post("/recommend", json={"history": ["it10", "no-such-item"], "k": 3}).json()
    assert body["source"] == "history" and len(body["items"]) == 3
    assert len(body["warnings"]) == 1 and "no-such-item" in body["warnings"][0]


def test_no_user_and_no_history_falls_back_to_popular_clicked_items(client):
    body = client.post("/recommend", json={"k": 10}).json()
    clicked = set().union(*(user_clicks(u) for u in range(1, 21)))
    assert body["source"] == "popular" and len(body["items"]) == 10
    assert {item["item_id"] for item in body["items"]} <= clicked


def test_unknown_user_is_warned_about_and_served_from_its_history(client):
    body = client.post("/recommend", json={"user_id": "u999", "history": ["it4"], "k": 3}).json()
    assert body["source"] == "history"
    assert any("u999" in warning for warning in body["warnings"])


@pytest.mark.parametrize(
    "payload",
    [
        {"user_id": "u1", "k": 0},
        {"user_id": "u1", "k": 21},  # serve.max_k = 20 in the tiny run
        {"user_id": "u1", "k": "ten"},
        {"user_id": ["u1"]},
        {"history": "it1"},
        {"history": ["it1"] * 1001},
        {"user": "u1"},  # unknown field
        {"user_id": ""},
    ],
)
def test_bad_recommend_requests_are_422(client, payload):
    assert client.post("/recommend", json=payload).status_code == 422


def test_malformed_json_is_a_4xx_not_a_5xx(client):
    response = client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


# -- /items/{id}/similar ---------------------------------------------------------------------
def test_similar_returns_k_other_items_by_descending_cosine(client):
    items = client.get("/items/it7/similar", params={"k": 5}).json()["items"]
    assert len(items) == 5 and "it7" not in {item["item_id"] for item in items}
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)


def test_similar_for_an_unknown_item_is_404(client):
    response = client.get("/items/nope/similar")
    assert response.status_code == 404 and "nope" in response.json()["detail"]


@pytest.mark.parametrize("k", ["0", "21", "x"])
def test_similar_with_a_bad_k_is_422(client, k):
    assert client.get("/items/it7/similar", params={"k": k}).status_code == 422


# -- admin auth ------------------------------------------------------------------------------
def test_admin_call_without_a_token_is_401(client):
    assert client.post("/items", json={"items": [{"item_id": "x", "text": "t"}]}).status_code == 401


def test_admin_call_with_a_wrong_token_is_403(client):
    response = client.post("/admin/reload", json={"run": "/tmp"}, headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 403


def test_admin_calls_are_refused_when_no_token_is_configured(template_run):
    no_admin = TestClient(create_app(template_run.root, admin_token=None))
    response = no_admin.post("/admin/reload", json={"run": str(template_run.root)}, headers=ADMIN)
    assert response.status_code == 403 and "RECSYS_ADMIN_TOKEN" in response.json()["detail"]


# -- POST /items (cold start) ----------------------------------------------------------------
def test_added_item_is_at_once_known_to_similar_and_recommend(run):
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    response = client.post("/items", json={"items": [{"item_id": "fresh", "image_base64": png((250, 20, 20))}]}, headers=ADMIN)
    assert response.status_code == 201
    assert response.json()["added"] == [{"item_id": "fresh", "faiss_id": N_ITEMS + 1}]
    assert response.json()["count"] == N_ITEMS + 1
    assert len(client.get("/items/fresh/similar", params={"k": 3}).json()["items"]) == 3
    body = client.post("/recommend", json={"history": ["fresh"], "k": 3}).json()
    assert body["warnings"] == [] and body["source"] == "history"  # a known id now


def test_added_item_is_ranked_by_recommend(tmp_path):
    run = make_tiny_run(tmp_path / "run", ["serve.candidates=100", "serve.max_k=100"])
    build_index(run)
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    client.post("/items", json={"items": [{"item_id": "fresh", "image_base64": png((0, 0, 250))}]}, headers=ADMIN)
    items = client.post("/recommend", json={"history": ["it1"], "k": 100}).json()["items"]
    assert len(items) == N_ITEMS  # every item but the history one, plus the new one
    assert "fresh" in {item["item_id"] for item in items}


def test_added_items_survive_a_restart(run):
    TestClient(create_app(run.root, admin_token=TOKEN)).post(
        "/items", json={"items": [{"item_id": "kept", "image_base64": png((5, 200, 5))}]}, headers=ADMIN
    )
    restarted = TestClient(create_app(run.root))
    assert restarted.get("/healthz").json()["items"] == N_ITEMS + 1
    assert restarted.get("/items/kept/similar", params={"k": 2}).status_code == 200


def test_text_of_an_added_item_survives_a_restart(run):
    TestClient(create_app(run.root, admin_token=TOKEN)).post(
        "/items", json={"items": [{"item_id": "described", "text": "a red striped umbrella"}]}, headers=ADMIN
    )
    assert Recommender.load(run).text_of("described") == "a red striped umbrella"


def test_rebuilding_the_index_forgets_items_added_at_serving_time(run):
    TestClient(create_app(run.root, admin_token=TOKEN)).post(
        "/items", json={"items": [{"item_id": "transient", "text": "gone after a rebuild"}]}, headers=ADMIN
    )
    build_index(run)
    restarted = Recommender.load(run)
    assert restarted.index.faiss_id("transient") is None and restarted.text_of("transient") is None


def test_adding_an_existing_item_id_is_409_and_changes_nothing(run):
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    response = client.post("/items", json={"items": [{"item_id": "it3", "image_base64": png((1, 2, 3))}]}, headers=ADMIN)
    assert response.status_code == 409
    assert client.get("/healthz").json()["items"] == N_ITEMS


@pytest.mark.parametrize(
    "item",
    [
        {"item_id": "a"},  # neither text nor image
        {"item_id": "a", "image_base64": "not base64 !!"},
        {"item_id": "", "text": "t"},
        {"item_id": "a", "text": "t", "price": 3},
    ],
)
def test_bad_new_items_are_422(client, item):
    assert client.post("/items", json={"items": [item]}, headers=ADMIN).status_code == 422


def test_an_undecodable_image_is_indexed_without_it_and_warned_about(run):
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    garbage = base64.b64encode(b"these bytes are no image").decode()
    body = client.post("/items", json={"items": [{"item_id": "broken", "image_base64": garbage}]}, headers=ADMIN).json()
    assert body["count"] == N_ITEMS + 1 and any("broken" in w for w in body["warnings"])


# -- /admin/reload ---------------------------------------------------------------------------
def test_reload_swaps_in_another_run(template_run, tmp_path):
    other = make_tiny_run(tmp_path / "other", seed=1)
    build_index(other)
    client = TestClient(create_app(template_run.root, admin_token=TOKEN))
    before = client.get("/healthz").json()
    response = client.post("/admin/reload", json={"run": str(other.root)}, headers=ADMIN)
    assert response.status_code == 200
    after = client.get("/healthz").json()
    assert after["run"] == str(other.root) and after["model_version"] != before["model_version"]


def test_reload_of_an_incomplete_run_is_400_and_keeps_serving_the_old_one(template_run, tmp_path):
    incomplete = make_tiny_run(tmp_path / "noindex")  # no index built
    client = TestClient(create_app(template_run.root, admin_token=TOKEN))
    response = client.post("/admin/reload", json={"run": str(incomplete.root)}, headers=ADMIN)
    assert response.status_code == 400 and "recsys index" in response.json()["detail"]
    assert client.get("/healthz").json()["run"] == str(template_run.root)


def test_requests_in_flight_during_a_reload_all_succeed(template_run, tmp_path):
    other = make_tiny_run(tmp_path / "other", seed=2)
    build_index(other)
    client = TestClient(create_app(template_run.root, admin_token=TOKEN))
    statuses: list[int] = []
    done = threading.Event()

    def hammer() -> None:
        while not done.is_set() or len(statuses) < 20:
            statuses.append(client.post("/recommend", json={"user_id": "u4", "k": 5}).status_code)

    workers = [threading.Thread(target=hammer) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(0.2)
    reload = client.post("/admin/reload", json={"run": str(other.root)}, headers=ADMIN)
    done.set()
    for worker in workers:
        worker.join(timeout=30)
    assert reload.status_code == 200
    assert len(statuses) >= 20 and set(statuses) == {200}


# -- /metrics and access logs ----------------------------------------------------------------
def test_metrics_count_requests_per_endpoint_and_report_index_and_model(template_run):
    client = TestClient(create_app(template_run.root, admin_token=TOKEN))
    client.post("/recommend", json={"user_id": "u1", "k": 2})
    client.post("/recommend", json={"user_id": "u1", "k": 2})
    client.get("/items/missing/similar")
    text = client.get("/metrics").text
    assert 'recsys_requests_total{endpoint="/recommend",method="POST",status="200"} 2' in text
    assert 'recsys_requests_total{endpoint="/items/{item_id}/similar",method="GET",status="404"} 1' in text
    assert 'recsys_request_duration_seconds_count{endpoint="/recommend"} 2' in text
    assert 'recsys_stage_duration_seconds_count{stage="rank"} 2' in text
    assert f"recsys_index_items {N_ITEMS}" in text
    assert 'recsys_model_info{version="v1-' in text


def test_each_request_writes_one_json_access_log_line(client, caplog):
    with caplog.at_level(logging.INFO, logger="recsys.access"):
        client.get("/items/it2/similar", params={"k": 2})
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "recsys.access"]
    assert len(records) == 1
    assert records[0]["endpoint"] == "/items/{item_id}/similar" and records[0]["status"] == 200 and records[0]["ms"] > 0


# -- a real server -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_recsys_serve_answers_over_http_on_loopback(template_run):
    port = free_port()
    env = {**os.environ, "RECSYS_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-m", "recsys", "-q", "serve", "--run", str(template_run.root), "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy within 60 s"
            time.sleep(0.2)
        recommended = httpx.post(f"{base}/recommend", json={"user_id": "u2", "k": 4}, timeout=10)
        assert recommended.status_code == 200 and len(recommended.json()["items"]) == 4
        reload = httpx.post(f"{base}/admin/reload", json={"run": str(template_run.root)}, headers=ADMIN, timeout=30)
        assert reload.status_code == 200
        assert 'endpoint="/recommend",method="POST",status="200"} 1' in httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
