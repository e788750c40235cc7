"""Concurrency of the service: readers in parallel, one writer, adds never lost to a reload, torch threads untouched."""

from __future__ import annotations

import shutil
import threading
import time

import torch
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.index import ReadersWriterLock

from service import ADMIN, TOKEN, string_id_run
from test_serving import png


def test_two_readers_hold_the_index_lock_at_once():
    lock = ReadersWriterLock()
    first_in, second_in = threading.Event(), threading.Event()

    def first() -> None:
        with lock.reading():
            first_in.set()
            second_in.wait(timeout=5)  # a mutex would deadlock here until the timeout

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(timeout=5)
    with lock.reading():
        second_in.set()
    thread.join(timeout=5)
    assert second_in.is_set() and not thread.is_alive()


def test_a_writer_waits_for_readers_and_holds_new_readers_back():
    lock = ReadersWriterLock()
    order: list[str] = []
    reader_in, writer_waiting = threading.Event(), threading.Event()

    def reader() -> None:
        with lock.reading():
            reader_in.set()
            writer_waiting.wait(timeout=5)
            time.sleep(0.05)
            order.append("reader done")

    def writer() -> None:
        writer_waiting.set()
        with lock.writing():
            order.append("writer")

    def late_reader() -> None:
        with lock.reading():
            order.append("late reader")

    threads = [threading.Thread(target=reader)]
    threads[0].start()
    reader_in.wait(timeout=5)
    threads.append(threading.Thread(target=writer))
    threads[1].start()
    writer_waiting.wait(timeout=5)
    time.sleep(0.01)  # the writer is queued
    threads.append(threading.Thread(target=late_reader))
    threads[2].start()
    for thread in threads:
        thread.join(timeout=5)
    assert order == ["reader done", "writer", "late reader"]


def test_an_add_during_a_reload_waits_and_lands_in_the_new_run(tmp_path):
    served = string_id_run(tmp_path / "runs" / "served")
    shutil.copytree(served.root, tmp_path / "runs" / "next")
    client = TestClient(create_app(served.root, admin_token=TOKEN))
    service = client.app.state.service
    reloaded: list[int] = []
    reload = threading.Thread(target=lambda: reloaded.append(client.post("/admin/reload", json={"run": "next"}, headers=ADMIN).status_code))
    reload.start()
    deadline = time.monotonic() + 10
    while not service.reloading and reload.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert service.reloading, "the reload finished before the add could overlap it"
    added = client.post("/items", json={"items": [{"item_id": "during", "image_base64": png((9, 9, 200))}]}, headers=ADMIN)
    reload.join(timeout=30)
    assert reloaded == [200] and added.status_code == 201
    assert client.get("/healthz").json()["run"].endswith("next")
    assert client.get("/items/during/similar", params={"k": 1}).status_code == 200  # in the live (new) run
    assert (tmp_path / "runs" / "next" / "index" / "added_items.log").is_file()
    assert not (tmp_path / "runs" / "served" / "index" / "added_items.log").exists()


def test_adding_items_never_changes_torchs_process_wide_thread_count(tmp_path):
    run = string_id_run(tmp_path / "run")
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    threads_before = torch.get_num_threads()
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.add(torch.get_num_threads())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        items = [{"item_id": f"t{i}", "image_base64": png((i, 2 * i, 100))} for i in range(64)]
        assert client.post("/items", json={"items": items}, headers=ADMIN).status_code == 201
    finally:
        done.set()
        watcher.join(timeout=5)
    assert seen == {threads_before}
    encoder = client.app.state.service.recommender._encoders[1]
    assert encoder.threads == threads_before  # so features.encoders.torch_threads never switches it


def test_a_reload_while_another_runs_is_409(tmp_path):
    served = string_id_run(tmp_path / "runs" / "served")
    client = TestClient(create_app(served.root, admin_token=TOKEN))
    service = client.app.state.service
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(client.post("/admin/reload", json={"run": "served"}, headers=ADMIN).status_code)) for _ in range(2)]
    with service._reload_gate:  # a reload in progress
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    assert statuses == [409, 409] and client.get("/readyz").status_code == 200
