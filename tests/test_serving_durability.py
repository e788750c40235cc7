"""POST /items is durable and incremental: an fsynced append-only log, replayed at load, folded by --compact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from recsys.cli import main as recsys_main
from recsys.errors import RunError
from recsys.rundir import RunDir
from serving.app import create_app
from serving.index import ItemIndex, build_index
from serving.journal import LOG_FILE, read_log
from serving.recommender import Recommender

from service import ADMIN, TOKEN, string_id_run
from test_index import N_ITEMS
from test_serving import png


@pytest.fixture
def run(tmp_path) -> RunDir:
    return string_id_run(tmp_path / "run")


def add(client: TestClient, *item_ids: str) -> None:
    items = [{"item_id": item_id, "image_base64": png((10 * i % 250, 80, 200))} for i, item_id in enumerate(item_ids)]
    response = client.post("/items", json={"items": items}, headers=ADMIN)
    assert response.status_code == 201, response.text


def index_files(run: RunDir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.index.iterdir() if p.name != LOG_FILE}


def test_an_add_appends_to_the_log_and_leaves_the_index_files_alone(run):
    before = index_files(run)
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    add(client, "new1", "new2")
    add(client, "new3")
    assert index_files(run) == before  # O(new items): nothing rewritten
    batches, end = read_log(run.index / LOG_FILE)
    assert [b.item_ids for b in batches] == [["new1", "new2"], ["new3"]] and end == (run.index / LOG_FILE).stat().st_size
    assert batches[0].faiss_ids.tolist() == [N_ITEMS + 1, N_ITEMS + 2] and batches[0].arrays["image"].shape == (2, 160)


def test_a_restart_replays_the_log_with_the_same_ids_vectors_and_texts(run):
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    response = client.post("/items", json={"items": [{"item_id": "told", "text": "a described thing", "image_base64": png((1, 200, 1))}]}, headers=ADMIN)
    live = client.app.state.service.recommender
    restarted = Recommender.load(run)
    faiss_id = restarted.index.faiss_id("told")
    assert faiss_id == response.json()["added"][0]["faiss_id"] and restarted.text_of("told") == "a described thing"
    np.testing.assert_array_equal(restarted.index.vectors(np.array([faiss_id])), live.index.vectors(np.array([faiss_id])))
    np.testing.assert_array_equal(restarted.index.content(np.array([faiss_id])), live.index.content(np.array([faiss_id])))


def test_compact_folds_the_log_into_a_new_generation_of_the_files(run, capsys):
    add(TestClient(create_app(run.root, admin_token=TOKEN)), "folded")
    assert recsys_main(["-q", "index", "--run", str(run.root), "--compact"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    meta = json.loads((run.index / "index.json").read_text())
    assert summary["folded_items"] == 1 and (meta["count"], meta["generation"]) == (N_ITEMS + 1, 1)
    assert meta["log_offset"] == (run.index / LOG_FILE).stat().st_size
    unreplayed = ItemIndex.load(run.index, replay=False)  # the files alone hold it now
    assert unreplayed.faiss_id("folded") == N_ITEMS + 1 and ItemIndex.load(run.index).count == N_ITEMS + 1


def test_a_torn_last_record_is_ignored_and_cut_off_by_the_next_add(run):
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    add(client, "whole")
    log_path = run.index / LOG_FILE
    whole = log_path.read_bytes()
    log_path.write_bytes(whole + whole[: len(whole) // 2])  # a crash in the middle of the next append
    restarted = TestClient(create_app(run.root, admin_token=TOKEN))
    assert restarted.get("/healthz").json()["items"] == N_ITEMS + 1
    add(restarted, "after")
    assert [b.item_ids for b in read_log(log_path)[0]] == [["whole"], ["after"]]
    assert Recommender.load(run).index.count == N_ITEMS + 2


def test_a_corrupt_record_followed_by_whole_ones_is_an_error_naming_the_log_and_offset(run):
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    add(client, "first")
    add(client, "second")
    log_path = run.index / LOG_FILE
    data = bytearray(log_path.read_bytes())
    data[40] ^= 0xFF  # inside the first record
    log_path.write_bytes(bytes(data))
    with pytest.raises(RunError, match=rf"{LOG_FILE}: record at byte 0 is corrupt and records follow it"):
        Recommender.load(run)


def test_files_of_an_unfinished_save_are_ignored(run):
    """A crash between writing a generation's files and switching index.json: the old set and the log still load."""
    add(TestClient(create_app(run.root, admin_token=TOKEN)), "kept")
    (run.index / "items.1.faiss").write_bytes(b"half written")
    assert Recommender.load(run).index.faiss_id("kept") == N_ITEMS + 1


def test_a_rebuild_after_items_joined_the_catalogue_does_not_index_them_twice(run):
    import polars as pl

    from recsys.rundir import write_parquet

    add(TestClient(create_app(run.root, admin_token=TOKEN)), "later")
    items = pl.read_parquet(run.data / "items.parquet")
    write_parquet(items.with_columns(pl.when(pl.col("item_id") == "it60").then(pl.lit("later")).otherwise(pl.col("item_id")).alias("item_id")), run.data / "items.parquet")
    summary = build_index(run)  # "later" is a catalogue item now (it took it60's row)
    rebuilt = Recommender.load(run)
    assert summary["added_items_kept"] == 0 and rebuilt.index.count == N_ITEMS and rebuilt.index.faiss_id("later") == N_ITEMS
