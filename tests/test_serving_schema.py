"""Schema = behaviour: a request the published OpenAPI schema admits is never refused by validation, and vice versa."""

from __future__ import annotations

import base64

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.recommender import INT64_MAX

from service import ADMIN, TOKEN, integer_id_run, string_id_run


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> dict[str, TestClient]:
    root = tmp_path_factory.mktemp("schema")
    return {
        "str": TestClient(create_app(string_id_run(root / "str").root, admin_token=TOKEN)),
        "int": TestClient(create_app(integer_id_run(root / "int").root, admin_token=TOKEN)),
    }


def body_validator(client: TestClient, path: str) -> jsonschema_rs.Validator:
    """A JSON Schema validator of the request body of POST ``path`` as /openapi.json publishes it."""
    spec = client.get("/openapi.json").json()
    ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return jsonschema_rs.Draft202012Validator({"$ref": ref, "components": spec["components"]})


RECOMMEND = [
    {"k": 1}, {"k": 20}, {"k": 21}, {"k": 0}, {"k": 2.5}, {"k": 13.0}, {"k": "3"}, {"k": True}, {"user_id": 5.0}, {"user_id": "u1"}, {"user_id": ""}, {"user_id": 5},
    {"user_id": "5"}, {"user_id": 2**53 - 1}, {"user_id": 2**53}, {"user_id": str(2**53)}, {"user_id": "--5"}, {"user_id": "²"}, {"user_id": INT64_MAX}, {"user_id": 2**64}, {"user_id": True},
    {"user_id": "x" * 257}, {"history": ["it1", "it2"]}, {"history": [1001, "1002"]}, {"history": ["1001 "]}, {"history": ["a"] * 1001},
    {"user": "u1"}, {"history": None}, {"user_id": None, "k": 3},
]
NEW_ITEMS = [
    {"item_id": "n1", "text": "t"}, {"item_id": "n2"}, {"item_id": "n3", "text": ""}, {"item_id": "n4", "text": None},
    {"item_id": "n5", "image_base64": base64.b64encode(b"abc").decode()}, {"item_id": "n6", "image_base64": "not base64 !"},
    {"item_id": "n7", "image_base64": "QUJD="}, {"item_id": "n8", "text": None, "image_base64": "QUJD"}, {"item_id": 5009, "text": "t"},
    {"item_id": "5010", "text": "t"}, {"item_id": "--5011", "text": "t"}, {"item_id": "n12", "text": "t", "price": 3},
]


@pytest.mark.parametrize("catalogue", ["str", "int"])
@pytest.mark.parametrize("payload", RECOMMEND)
def test_recommend_is_refused_exactly_when_the_schema_refuses_it(services, catalogue, payload):
    client = services[catalogue]
    admitted = body_validator(client, "/recommend").is_valid(payload)
    status = client.post("/recommend", json=payload).status_code
    assert status == (200 if admitted else 422)


@pytest.mark.parametrize("catalogue", ["str", "int"])
@pytest.mark.parametrize("item", NEW_ITEMS)
def test_new_items_are_refused_exactly_when_the_schema_refuses_them(services, catalogue, item):
    client = services[catalogue]
    payload = {"items": [item]}
    admitted = body_validator(client, "/items").is_valid(payload)
    status = client.post("/items", json=payload, headers=ADMIN).status_code
    assert status == (201 if admitted else 422)


def test_the_schema_publishes_the_runs_limits(services):
    spec = services["int"].get("/openapi.json").json()
    similar = spec["paths"]["/items/{item_id}/similar"]["get"]
    params = {p["name"]: p["schema"] for p in similar["parameters"]}
    assert params["k"]["maximum"] == 20 and params["k"]["minimum"] == 1  # serve.max_k of the tiny run
    assert params["item_id"]["pattern"].startswith("^(?:\\+?(?:[0-9]{1,18}")
    assert set(similar["responses"]) == {"200", "404", "422", "500"}
    assert spec["paths"]["/items"]["post"]["security"] == [{"HTTPBearer": []}]
    k = spec["components"]["schemas"]["RecommendRequest"]["properties"]["k"]
    assert (k["type"], k["minimum"], k["maximum"]) == ("integer", 1, 20)
