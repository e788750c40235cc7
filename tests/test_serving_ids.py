"""Request ids are parsed as exactly what the catalogue's id type holds; library errors are 4xx/503, never 500."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from recsys.rundir import RunDir
from serving.app import create_app
from serving.recommender import INT64_MAX, INT64_MIN, parse_id

from service import ADMIN, FIRST_INT_ITEM, TOKEN, integer_id_run, string_id_run

NOT_INT64 = ["--5", "²", "٣", "５", " 5", "5 ", "5\n", "+-5", "5e3", "0x10", "", "-", str(INT64_MAX + 1), str(INT64_MIN - 1), "1" * 20]


@pytest.fixture(scope="module")
def int_run(tmp_path_factory) -> RunDir:
    return integer_id_run(tmp_path_factory.mktemp("ids") / "int-run")


@pytest.fixture(scope="module")
def int_client(int_run) -> TestClient:
    return TestClient(create_app(int_run.root, admin_token=TOKEN), raise_server_exceptions=False)


@pytest.mark.parametrize("raw", NOT_INT64)
def test_text_that_is_no_int64_is_no_integer_id(raw):
    assert parse_id(raw, integer=True) is None


@pytest.mark.parametrize("raw, value", [("5", 5), ("+5", 5), ("-5", -5), ("007", 7), (str(INT64_MAX), INT64_MAX), (str(INT64_MIN), INT64_MIN), (12, 12)])
def test_ascii_digits_with_a_sign_within_int64_are_integer_ids(raw, value):
    assert parse_id(raw, integer=True) == value


@pytest.mark.parametrize("raw", [True, INT64_MAX + 1, INT64_MIN - 1, 1.0, None])
def test_non_int64_values_are_no_integer_ids(raw):
    assert parse_id(raw, integer=True) is None


@pytest.mark.parametrize("raw", ["--5", "%C2%B2", "5%0A", "%20%35", "9223372036854775808"])
def test_similar_with_an_id_that_is_no_int64_is_422_naming_it(int_client, raw):
    response = int_client.get(f"/items/{raw}/similar")
    assert response.status_code == 422, response.text
    assert "item_id" in response.text


@pytest.mark.parametrize("user_id", ["--5", "²", 2**63, True, 1.5])
def test_recommend_for_a_user_id_that_is_no_int64_is_422(int_client, user_id):
    assert int_client.post("/recommend", json={"user_id": user_id}).status_code == 422


def test_recommend_takes_an_integer_user_id_as_number_or_text(int_client):
    as_number = int_client.post("/recommend", json={"user_id": 3, "k": 5}).json()
    as_text = int_client.post("/recommend", json={"user_id": "+3", "k": 5}).json()
    assert as_number["source"] == as_text["source"] == "user"
    assert as_number["items"] == as_text["items"] and all(isinstance(item["item_id"], int) for item in as_number["items"])


def test_similar_on_an_integer_catalogue_answers_integer_ids(int_client):
    items = int_client.get(f"/items/{FIRST_INT_ITEM + 7}/similar", params={"k": 4}).json()["items"]
    same = int_client.get(f"/items/+0{FIRST_INT_ITEM + 7}/similar", params={"k": 4}).json()["items"]
    assert items == same and len(items) == 4
    assert all(isinstance(item["item_id"], int) and FIRST_INT_ITEM < item["item_id"] <= FIRST_INT_ITEM + 60 for item in items)


@pytest.mark.parametrize("item_id", [2**63, "9" * 19, "--9", "abc"])
def test_new_items_with_ids_beyond_int64_are_422_and_change_nothing(int_client, item_id):
    count = int_client.get("/healthz").json()["items"]
    response = int_client.post("/items", json={"items": [{"item_id": item_id, "text": "t"}]}, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert int_client.get("/healthz").json()["items"] == count


def test_a_new_item_at_the_int64_bound_is_added(tmp_path):
    run = integer_id_run(tmp_path / "run")
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    response = client.post("/items", json={"items": [{"item_id": str(INT64_MAX), "text": "the last id"}]}, headers=ADMIN)
    assert response.status_code == 201, response.text
    assert response.json()["added"][0]["item_id"] == INT64_MAX
    assert client.get(f"/items/{INT64_MAX}/similar", params={"k": 1}).status_code == 200


def test_a_string_catalogue_takes_any_text_as_an_id(tmp_path_factory):
    run = string_id_run(tmp_path_factory.mktemp("ids") / "str-run")
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    assert client.get("/items/--5/similar").status_code == 404  # a string id that is not indexed
    assert client.post("/recommend", json={"user_id": "--5", "k": 2}).json()["source"] == "popular"


def test_an_encoder_the_host_lacks_is_503_naming_the_config_key(tmp_path):
    run = string_id_run(tmp_path / "run", ["embed.image_model=hf:/no/such/model"])
    client = TestClient(create_app(run.root, admin_token=TOKEN))
    response = client.post("/items", json={"items": [{"item_id": "new", "text": "t"}]}, headers=ADMIN)
    assert response.status_code == 503
    assert "embed.image_model" in response.json()["detail"] and "/no/such/model" in response.json()["detail"]


def test_an_unexpected_error_is_a_500_with_a_request_id_that_the_log_names(int_run, caplog):
    app = create_app(int_run.root, admin_token=TOKEN)

    def broken() -> None:
        raise ZeroDivisionError("a bug")

    app.add_api_route("/broken", broken)  # a real route with a real bug
    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/broken")
    assert response.status_code == 500
    request_id = response.json()["request_id"]
    assert response.headers["x-request-id"] == request_id and "a bug" not in response.text
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info[0] is ZeroDivisionError
