"""Trust boundaries of the service: /admin/reload only under serve.runs_root, a request body limit."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app

from service import ADMIN, TOKEN, string_id_run


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """runs/served (the served run), runs/sibling (another run), outside/elsewhere (a run outside the root)."""
    root = tmp_path_factory.mktemp("bounds")
    served = string_id_run(root / "runs" / "served", ["serve.max_body_bytes=4096"])
    shutil.copytree(served.root, root / "runs" / "sibling")
    shutil.copytree(served.root, root / "outside" / "elsewhere")
    (root / "runs" / "escape").symlink_to(root / "outside" / "elsewhere")
    client = TestClient(create_app(served.root, admin_token=TOKEN))
    return root, client


def reload(client: TestClient, run: str):
    return client.post("/admin/reload", json={"run": run}, headers=ADMIN)


def test_a_run_beside_the_served_one_is_reloaded_by_path_or_by_name(layout):
    root, client = layout
    assert reload(client, str(root / "runs" / "sibling")).status_code == 200
    assert client.get("/healthz").json()["run"] == str(root / "runs" / "sibling")
    assert reload(client, "served").status_code == 200  # relative to the runs root
    assert client.get("/healthz").json()["run"] == str(root / "runs" / "served")


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlink", "slash"])
def test_a_run_outside_the_runs_root_is_403_and_nothing_is_loaded(layout, where):
    root, client = layout
    run = {
        "outside": str(root / "outside" / "elsewhere"),
        "dotdot": str(root / "runs" / ".." / "outside" / "elsewhere"),
        "symlink": "escape",  # inside by name, outside once resolved
        "slash": "/",
    }[where]
    before = client.get("/healthz").json()["run"]
    response = reload(client, run)
    assert response.status_code == 403, response.text
    assert "outside serve.runs_root" in response.json()["detail"]
    assert client.get("/healthz").json()["run"] == before


@pytest.mark.parametrize("run", ["no-such-run", ".", "x" * 300, "a\x00b"])  # absent, the runs root (no run), a name too long for the file system, a NUL
def test_a_run_that_does_not_exist_is_404(layout, run):
    _, client = layout
    response = reload(client, run)
    assert response.status_code == 404 and "no run directory" in response.json()["detail"]


def test_runs_root_can_be_configured(tmp_path):
    served = string_id_run(tmp_path / "a" / "served", [f"serve.runs_root={tmp_path}"])
    shutil.copytree(served.root, tmp_path / "b" / "other")
    client = TestClient(create_app(served.root, admin_token=TOKEN))
    assert reload(client, "b/other").status_code == 200


def test_a_body_above_the_limit_is_413_with_a_message_and_serving_goes_on(layout):
    _, client = layout
    big = {"items": [{"item_id": "big", "text": "x" * 5000}]}  # under the text limit, over serve.max_body_bytes = 4096
    response = client.post("/items", json=big, headers=ADMIN)
    assert response.status_code == 413
    assert response.json()["detail"] == "request body over serve.max_body_bytes = 4096 bytes"
    assert client.post("/recommend", json={"k": 2}).status_code == 200


def test_a_streamed_body_without_content_length_is_cut_at_the_limit(layout):
    _, client = layout

    def chunks():
        yield b'{"items": [{"item_id": "big", "text": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    response = client.post("/items", content=chunks(), headers={**ADMIN, "content-type": "application/json"})
    assert response.status_code == 413 and "max_body_bytes" in response.json()["detail"]
