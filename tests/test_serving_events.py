"""POST /events: live user histories that the next /recommend reads, an fsynced event log in RUN/events, bounded memory, reloads."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import polars as pl
import pytest
from fastapi.testclient import TestClient

from recsys.cli import run_step
from recsys.config import load_config
from recsys.events import read_events
from recsys.rundir import RunDir, write_parquet
from serving.app import create_app

from service import ADMIN, TOKEN, serving, string_id_run
from test_serving import PLANTED_CONFIG, group_of, planted_dataset, recommended


NOW = int(time.time())


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> RunDir:
    """A model trained on ``test_serving.planted_dataset``: group-a users click red items, group-b users blue ones."""
    root = tmp_path_factory.mktemp("planted-events")
    run = RunDir.create(root / "run", load_config(None, PLANTED_CONFIG), planted_dataset(root / "data"))
    for step in ("prepare", "embed", "train", "index"):
        run_step(step, run)
    return run


@pytest.fixture
def planted(planted_run, tmp_path) -> TestClient:
    """A service over a fresh copy of the planted run (each test its own event log)."""
    run = tmp_path / "run"
    shutil.copytree(planted_run.root, run)
    return TestClient(create_app(run, admin_token=TOKEN))


def post_events(client: TestClient, *events: dict) -> httpx.Response:
    return client.post("/events", json={"events": list(events)}, headers=ADMIN)


def clicks(user: str, *items: str, start: int = NOW - 100) -> list[dict]:
    return [{"user_id": user, "item_id": item, "timestamp": start + t} for t, item in enumerate(items)]


def logged(client: TestClient) -> pl.DataFrame:
    service = client.app.state.service
    return read_events(service.event_log.directory, service.event_log.schema)


# -- the next /recommend sees the event ------------------------------------------------------
def test_a_new_users_clicks_give_them_recommendations_of_that_group(planted):
    before = planted.post("/recommend", json={"user_id": "newcomer", "k": 3}).json()
    assert before["source"] == "popular"
    assert post_events(planted, *clicks("newcomer", "a01", "a02", "a03")).json() == {"accepted": 3, "live_users": 1}
    assert post_events(planted, *clicks("other", "b01", "b02", "b03")).status_code == 200
    red = planted.post("/recommend", json={"user_id": "newcomer", "k": 3}).json()
    blue = recommended(planted, user_id="other", k=3)
    assert red["source"] == "history" and "live click" in red["warnings"][0]
    assert [group_of(item["item_id"]) for item in red["items"]] == ["a"] * 3
    assert [group_of(item["item_id"]) for item in blue] == ["b"] * 3
    assert not {"a01", "a02", "a03"} & {item["item_id"] for item in red["items"]}  # live clicks count as seen


def test_a_known_users_live_clicks_follow_their_stored_history(planted):
    # ub01 clicked every blue item: before, the one unseen blue item leads; after five red clicks
    # (the model's whole history length) the user tower and the ranker read a red history.
    assert recommended(planted, user_id="ub01", k=1)[0]["item_id"] == "b-cold"
    post_events(planted, *clicks("ub01", "a01", "a02", "a03", "a04", "a05"))
    after = recommended(planted, user_id="ub01", k=3)
    assert [group_of(item["item_id"]) for item in after] == ["a"] * 3
    assert not {f"a0{i}" for i in range(1, 6)} & {item["item_id"] for item in after}


def test_impressions_without_a_click_are_logged_but_not_history(planted):
    before = recommended(planted, user_id="ub01", k=3)
    response = post_events(planted, *({**event, "click": 0} for event in clicks("ub01", "a01", "a02", "a03", "a04", "a05")))
    assert response.json()["accepted"] == 5 and response.json()["live_users"] == 0
    assert recommended(planted, user_id="ub01", k=3) == before
    assert logged(planted)["click"].to_list() == [0] * 5


def test_late_events_slot_into_the_history_by_timestamp(planted):
    post_events(planted, *clicks("late", "a01", "a02", start=NOW - 10))
    post_events(planted, *clicks("late", "b01", start=NOW - 50))
    assert planted.app.state.service.live.items("late") == ["b01", "a01", "a02"]


# -- the event log -------------------------------------------------------------------------
def test_every_accepted_event_is_in_the_log_with_its_values(planted):
    events = [
        {"user_id": "ua01", "item_id": "b02", "timestamp": NOW - 5, "click": 1, "conversion": 1, "rating": 4.5},
        {"user_id": "new", "item_id": "a03", "timestamp": NOW - 4, "click": 0},
        {"user_id": "new", "item_id": "a04", "timestamp": NOW - 3},
    ]
    post_events(planted, *events)
    frame = logged(planted)
    assert frame.select("user_id", "item_id", "timestamp", "click", "conversion", "rating").rows() == [
        ("ua01", "b02", NOW - 5, 1, 1, 4.5), ("new", "a03", NOW - 4, 0, None, None), ("new", "a04", NOW - 3, 1, None, None),
    ]  # fmt: skip
    assert frame["received_ms"].min() >= NOW * 1000 - 5000


BAD_EVENTS = [
    ({"item_id": "nope"}, 404, "events[1].item_id 'nope' is not in the index"),  # as GET /items/nope/similar: no such item
    ({"timestamp": NOW + 10 * 86_400}, 409, "events[1].timestamp"),  # conflicts with the service's clock (the schema cannot say "now")
    ({"click": 0, "conversion": 1}, 422, "conversion is 1 but click is 0"),  # the schema says so too ("not")
    ({"rating": 7.0}, 422, "less than or equal to 5"),  # the schema's bound: the run's rating range
    ({"timestamp": "yesterday"}, 422, "timestamp"),
    ({"click": 2}, 422, "click"),
    ({"click": True}, 422, "click"),
    ({"user_id": ""}, 422, "user_id"),
    ({"rating": "NaN"}, 422, "rating"),
    ({"weight": 3}, 422, "weight"),
]


@pytest.mark.parametrize(("change", "status", "names"), BAD_EVENTS, ids=[str(change) for change, _, _ in BAD_EVENTS])
def test_a_bad_event_refuses_the_batch_naming_row_and_field_and_applies_nothing(planted, change, status, names):
    good = {"user_id": "newcomer", "item_id": "a01", "timestamp": NOW}
    response = post_events(planted, good, {**good, **change})
    assert response.status_code == status, response.text
    assert names in response.text
    if isinstance(response.json()["detail"], list):  # a schema error: pydantic names the row by its index
        assert response.json()["detail"][0]["loc"][:3] == ["body", "events", 1]
    assert logged(planted).is_empty() and planted.app.state.service.live.items("newcomer") == []


def test_events_need_the_admin_token(planted):
    response = planted.post("/events", json={"events": clicks("u", "a01")})
    assert response.status_code == 401 and logged(planted).is_empty()


# -- bounded memory ------------------------------------------------------------------------
def test_live_users_are_bounded_and_the_least_recently_active_is_evicted_to_the_log_only(tmp_path):
    run = string_id_run(tmp_path / "run", ["serve.live_users=2"])
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    post_events(client, *clicks("first", "it1"))
    post_events(client, *clicks("second", "it2"))
    post_events(client, *clicks("first", "it3"))  # first is now the most recently active
    response = post_events(client, *clicks("third", "it4"))
    live = client.app.state.service.live
    assert response.json()["live_users"] == 2 and live.evicted == 1
    assert live.items("second") == [] and live.items("first") == ["it1", "it3"] and live.items("third") == ["it4"]
    assert sorted(set(logged(client)["user_id"])) == ["first", "second", "third"]  # evicted from memory, not from the log
    assert "recsys_live_users_evicted 1.0" in client.get("/metrics").text


def test_a_users_live_history_keeps_the_models_history_length(tmp_path):
    run = string_id_run(tmp_path / "run")
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    items = [f"it{i}" for i in range(1, 13)]
    post_events(client, *clicks("busy", *items))
    history_len = client.app.state.service.recommender.history_len
    assert client.app.state.service.live.items("busy") == items[-history_len:]
    assert len(logged(client)) == 12


# -- restarts and reloads -----------------------------------------------------------------
def test_a_restart_rebuilds_the_live_histories_from_the_log(planted):
    post_events(planted, *clicks("newcomer", "a01", "a02", "a03"))
    before = recommended(planted, user_id="newcomer", k=5)
    restarted = TestClient(create_app(planted.app.state.service.recommender.run.root, admin_token=TOKEN))
    assert restarted.app.state.service.live.items("newcomer") == ["a01", "a02", "a03"]
    assert recommended(restarted, user_id="newcomer", k=5) == before


def test_after_a_reload_events_past_the_new_runs_data_stay_live_and_move_into_its_log(planted, tmp_path):
    service = planted.app.state.service
    old_root = service.recommender.run.root
    newer = tmp_path / "newer"  # the same run, its data reaching to NOW - 1000: as if retrained on logs up to then
    shutil.copytree(old_root, newer, ignore=shutil.ignore_patterns("events"))
    train = pl.read_parquet(newer / "data" / "train.parquet")
    write_parquet(train.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(NOW - 1000).otherwise(pl.col("timestamp")).alias("timestamp")), newer / "data" / "train.parquet")

    post_events(planted, *clicks("newcomer", "a01", start=NOW - 2000))  # in the newer run's data
    post_events(planted, *clicks("newcomer", "a02", "a03", start=NOW - 500))  # news to it
    response = planted.post("/admin/reload", json={"run": str(newer)}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert service.live.items("newcomer") == ["a02", "a03"]
    assert read_events(newer / "events")["item_id"].to_list() == ["a02", "a03"]  # the next update from its log sees them
    post_events(planted, *clicks("newcomer", "a04"))
    assert read_events(newer / "events")["item_id"].to_list() == ["a02", "a03", "a04"]
    assert read_events(old_root / "events")["item_id"].to_list() == ["a01", "a02", "a03"]  # the old log is left as it was

    back = planted.post("/admin/reload", json={"run": str(old_root)}, headers=ADMIN)
    assert back.status_code == 200
    assert read_events(old_root / "events")["item_id"].to_list() == ["a01", "a02", "a03", "a04"]  # nothing copied twice


def test_events_posted_during_reloads_are_all_kept(planted, tmp_path):
    service = planted.app.state.service
    twin = tmp_path / "twin"
    shutil.copytree(service.recommender.run.root, twin, ignore=shutil.ignore_patterns("events"))
    roots = [service.recommender.run.root, twin]
    stop = threading.Event()
    failures: list[str] = []

    def reload_back_and_forth() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            response = planted.post("/admin/reload", json={"run": str(roots[n % 2])}, headers=ADMIN)
            if response.status_code != 200:
                failures.append(response.text)

    reloader = threading.Thread(target=reload_back_and_forth)
    reloader.start()
    try:
        for i in range(40):
            response = post_events(planted, {"user_id": f"user{i}", "item_id": "a01", "timestamp": NOW - 100 + i})
            assert response.status_code == 200, response.text
    finally:
        stop.set()
        reloader.join()
    assert not failures
    live_root = service.recommender.run.root
    assert sorted(read_events(live_root / "events")["user_id"].to_list()) == sorted(f"user{i}" for i in range(40))
    assert all(service.live.items(f"user{i}") == ["a01"] for i in range(40))


@pytest.mark.slow
def test_kill_9_of_the_server_while_events_arrive_loses_no_acknowledged_event(tmp_path):
    run = string_id_run(tmp_path / "run", ["serve.events_segment_rows=20"])  # rolls into parquet segments as it goes
    acknowledged: list[str] = []

    def post_until_refused(base: str) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            for i in range(100_000):
                try:
                    response = client.post("/events", json={"events": clicks(f"user{i}", "it1", "it2")}, headers=ADMIN)
                except httpx.TransportError:
                    return
                assert response.status_code == 200, response.text
                acknowledged.append(f"user{i}")

    with serving(run) as server:
        poster = threading.Thread(target=post_until_refused, args=(server.base,))
        poster.start()
        while len(acknowledged) < 30:
            time.sleep(0.05)
        server.kill()  # mid-stream: some request is being written
        poster.join()
    logged_users = set(read_events(run.root / "events")["user_id"])
    assert set(acknowledged) <= logged_users and len(logged_users) - len(acknowledged) <= 1  # at most the one in flight, never acknowledged
    assert any(path.suffix == ".parquet" for path in (run.root / "events").iterdir())
    with serving(run) as server:  # a restarted service reads them back into the live histories
        body = httpx.post(f"{server.base}/recommend", json={"user_id": "user7", "k": 3}).json()
        assert body["source"] == "history" and not {"it1", "it2"} & {item["item_id"] for item in body["items"]}
