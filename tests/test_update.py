"""`recsys update`: vocabularies and tables grow append-only, histories continue across the boundary, updates chain and resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from features.synth import synthesize
from features.update import _features_like_base, prepare_update
from recsys.cli import main as recsys_main
from recsys.errors import DataError
from recsys.rundir import RunDir, read_json
from training.data import load_training_data
from training.epochs import build_model
from training.train_single import fuse_tables
from training.warm_start import warm_start

FAST = [
    "embed.text_model=none", "train.epochs=2", "train.batch_size=256", "eval.baselines=", "eval.baseline_mf=false",
    "eval.bootstrap=20", "model.dim=16", "model.embedding_dim=8", "data.history_len=10",
]  # fmt: skip
CUTS = (0.6, 0.75, 0.8, 0.9)  # base < 0.6 <= new1 train < 0.75 <= new1 test < 0.8 <= new2 train < 0.9 <= new2 test


LATE_USERS = [f"u{i}" for i in range(250, 300)]  # they arrive after BASE's data


def _write(out: Path, source: Path, rows: pl.DataFrame, until: int, late_users: list[str]) -> Path:
    """A dataset of ``rows`` with the catalogue and users known by time ``until`` (items by creation), ``late_users`` left out."""
    out.mkdir(parents=True)
    items = pl.read_parquet(source / "items.parquet").filter(pl.col("created_at") < until)
    first_seen = pl.read_parquet(source / "interactions.parquet").filter(pl.col("timestamp") < until).select("user_id").unique()
    users = pl.read_parquet(source / "users.parquet").join(first_seen, on="user_id", how="semi").filter(~pl.col("user_id").is_in(late_users))
    rows.join(items.select("item_id"), on="item_id", how="semi").join(users.select("user_id"), on="user_id", how="semi").write_parquet(out / "interactions.parquet")
    items.write_parquet(out / "items.parquet")
    users.write_parquet(out / "users.parquet")
    return out


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> dict[str, Path]:
    """Synthetic logs cut in time: BASE's dataset, two NEW windows (train then test rows), users and items arriving."""
    root = tmp_path_factory.mktemp("update")
    synthesize(root / "full", users=300, items=200, seed=3, images=False)
    full = pl.read_parquet(root / "full" / "interactions.parquet")
    cut = [int(full["timestamp"].quantile(q)) for q in CUTS]
    t = pl.col("timestamp")
    windows = {
        "base": (full.filter(t < cut[0]), cut[0]),
        "new1": (full.filter((t >= cut[0]) & (t < cut[2])).with_columns(split=pl.when(t < cut[1]).then(pl.lit("train")).otherwise(pl.lit("test"))), cut[2]),
        "new2": (full.filter(t >= cut[2]).with_columns(split=pl.when(t < cut[3]).then(pl.lit("train")).otherwise(pl.lit("test"))), 2**62),
    }
    paths = {name: _write(root / name, root / "full", rows, until, LATE_USERS if name == "base" else []) for name, (rows, until) in windows.items()}
    assert recsys_main(["-q", "run", "--data", str(paths["base"]), "--out", str(root / "base_run"), *sum((["--set", s] for s in FAST), [])]) == 0
    paths["base_run"] = root / "base_run"
    assert recsys_main(["-q", "update", "--run", str(paths["base_run"]), "--data", str(paths["new1"]), "--out", str(root / "run2"), "--set", "update.gate=false"]) == 0
    paths["run2"] = root / "run2"
    return paths


def vocab(run: Path, side: str) -> pl.DataFrame:
    return pl.read_parquet(run / "data" / f"{side}s.parquet")


# -- vocabularies and tables ---------------------------------------------------------------
@pytest.mark.parametrize("side", ["user", "item"])
def test_vocabularies_grow_append_only(stream, side):
    old, new = vocab(stream["base_run"], side), vocab(stream["run2"], side)
    assert len(new) > len(old)  # users and items arrived in NEW
    assert new.head(len(old)).select(old.columns).equals(old)  # ids, indices and feature codes of BASE's rows unchanged
    fresh = new.slice(len(old))
    assert fresh[f"{side}_idx"].to_list() == list(range(len(old) + 1, len(new) + 1))
    assert fresh[f"{side}_id"].to_list() == sorted(fresh[f"{side}_id"].to_list())
    assert not set(fresh[f"{side}_id"]) & set(old[f"{side}_id"])


def test_categorical_codes_of_new_rows_follow_bases_coding(stream):
    old, new = vocab(stream["base_run"], "item"), vocab(stream["run2"], "item")
    raw = pl.read_parquet(stream["new1"] / "items.parquet").select("item_id", "category")
    base_map = dict(old.join(raw, on="item_id").select("category", "cat_category").unique().rows())
    new_map = new.join(raw, on="item_id").select("category", "cat_category").unique()
    assert new_map["category"].is_unique().all()  # one code per value, old and new items alike
    assert all(base_map[value] == code for value, code in new_map.rows() if value in base_map)


def test_features_in_bases_coding_on_a_hand_made_table():
    base = pl.DataFrame({"item_id": ["a", "b", "c"], "cat_colour": [1, 2, 1], "num_price": [-1.0, 1.0, -1.0]}, schema_overrides={"num_price": pl.Float32})
    raw = pl.DataFrame({"item_id": ["a", "b", "c", "d", "e", "f"], "colour": ["blue", "red", "blue", "green", "red", None], "price": [10.0, 20.0, 10.0, 15.0, 30.0, None]})
    coded = _features_like_base(raw, base, "item_id", {"colour": "cat", "price": "num"})
    assert coded["cat_colour"].to_list() == [1, 2, 1, 3, 2, 0]  # BASE's codes kept, a new value gets the next code, null 0
    assert coded["num_price"].to_list() == pytest.approx([-1.0, 1.0, -1.0, 0.0, 3.0, 0.0])  # BASE's (x - 15) / 5 carried on


def test_grown_tables_keep_old_rows_and_their_optimizer_state_bit_identical(stream):
    run2 = RunDir(stream["run2"])
    base = RunDir(stream["base_run"])
    data = load_training_data(run2, use_text=False, use_image=True)
    model = build_model(data, run2.config())
    fuse_tables(model, run2.config().train.embedding_lr)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    summary = warm_start(model, base)
    old = load_file(str(base.model / "model.safetensors"))
    state = model.state_dict()
    grown = 0
    assert state["item_tower.trained"][: old["item_tower.trained"].shape[0]][old["item_tower.trained"]].all()  # trained in BASE: still trained
    for name, value in old.items():
        if name.endswith((".cat_values", ".num_values", ".trained")):  # buffers of this run's data, not weights
            continue
        if name == "item_prior":  # chosen again after the update trains: 0 until then, whatever BASE's was
            assert not state[name].any()
            continue
        rows = value.shape[0] if value.dim() else None
        assert torch.equal(state[name][:rows] if rows is not None else state[name], value), name
        if value.dim() and state[name].shape[0] > rows:
            grown += 1
            assert torch.equal(state[name][rows:], initial[name][rows:]), name  # new rows: training's initialisation
    assert grown >= 2 and {"user.weight", "item.weight"} <= {k.split("embedding_bags.")[-1] for k in summary["tables_grown"]}
    checkpoint = load_file(str(next((base.model / "checkpoint").glob("epoch-*.safetensors"))))
    momentum = model.embedding_tables.fused_optimizer().state_dict()["state"]
    for key, saved in ((k.removeprefix("fused/"), v) for k, v in checkpoint.items() if k.startswith("fused/")):
        param_key, name = key.split("/", 1)
        now = momentum[param_key][name]
        assert torch.equal(now[: saved.shape[0]], saved) and not now[saved.shape[0] :].any(), key


def test_new_rows_histories_continue_from_bases_clicks(stream):
    splits = [stream["base_run"] / "data" / f"{s}.parquet" for s in ("train", "valid", "test")]
    base_clicks = pl.concat([pl.read_parquet(p) for p in splits if p.is_file()], how="diagonal_relaxed").filter(pl.col("click") == 1)
    new_start = int(pl.read_parquet(stream["new1"] / "interactions.parquet")["timestamp"].min())
    new_rows = pl.read_parquet(stream["run2"] / "data" / "train.parquet").filter(pl.col("timestamp") >= new_start)
    first = new_rows.sort("timestamp").group_by("user_idx", maintain_order=True).first()  # no NEW click precedes it
    checked = 0
    for user_idx, history in first.select("user_idx", "history").rows():
        before = base_clicks.filter(pl.col("user_idx") == user_idx).sort("timestamp")["item_idx"].to_list()
        if before:
            assert history == before[-10:], user_idx  # data.history_len = 10
            checked += 1
    assert checked >= 20


def test_the_trainer_reads_the_replay_sample_and_the_new_rows_only(stream):
    train2 = pl.read_parquet(stream["run2"] / "data" / "train.parquet")
    meta = read_json(stream["run2"] / "data" / "meta.json")["update"]
    base_rows = sum(read_json(stream["base_run"] / "data" / "meta.json")["rows"].values())
    assert train2["context"].sum() == meta["context_rows"] and 0.1 < 1 - meta["context_rows"] / base_rows < 0.3  # update.replay = 0.2
    assert read_json(stream["run2"] / "summary.json")["train"]["train_rows"] == int((~train2["context"]).sum()) == meta["trained_rows"]


def test_the_update_records_its_parent_and_test_rows_are_news_window(stream):
    record = read_json(stream["run2"] / "update.json")
    assert record["parent"] == str(stream["base_run"].resolve()) and record["steps_done"] == ["prepare", "embed", "train", "index", "gate", "evaluate"]
    test = pl.read_parquet(stream["run2"] / "data" / "test.parquet")
    new_test = pl.read_parquet(stream["new1"] / "interactions.parquet").filter(pl.col("split") == "test")
    assert test.height == new_test.height and not test["context"].any()


def test_updates_chain_and_old_indices_stay_stable_across_two(stream, tmp_path):
    run3 = tmp_path / "run3"
    assert recsys_main(["-q", "update", "--run", str(stream["run2"]), "--data", str(stream["new2"]), "--out", str(run3), "--set", "update.gate=false"]) == 0
    for side in ("user", "item"):
        first, second, third = (vocab(p, side) for p in (stream["base_run"], stream["run2"], run3))
        assert third.head(len(second)).select(second.columns).equals(second) and third.head(len(first)).select(first.columns).equals(first)
    assert read_json(run3 / "update.json")["chain"] == [str(stream["base_run"].resolve()), str(stream["run2"].resolve())]


# -- errors ---------------------------------------------------------------------------------
def _broken_new(stream, tmp_path, change) -> Path:
    new = tmp_path / "broken"
    shutil.copytree(stream["new1"], new)
    change(new)
    return new


def _update_error(stream, new: Path, tmp_path, *extra: str) -> str:
    """The error `recsys update` exits with (code 2), as it prints it."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = recsys_main(["-q", "update", "--run", str(stream["base_run"]), "--data", str(new), "--out", str(tmp_path / "out"), "--set", "update.gate=false", *extra])
    assert code == 2, err.getvalue()
    return err.getvalue()


def _rewrite(path: Path, change) -> None:
    change(pl.read_parquet(path)).write_parquet(path)


def test_an_id_type_change_is_refused(stream, tmp_path):
    def ints(new: Path) -> None:
        for name in ("interactions", "items"):
            _rewrite(new / f"{name}.parquet", lambda f: f.with_columns(pl.col("item_id").str.slice(1).cast(pl.Int64)))

    assert "item_id is Int64 but BASE" in _update_error(stream, _broken_new(stream, tmp_path, ints), tmp_path)


def test_a_missing_label_column_is_refused(stream, tmp_path):
    new = _broken_new(stream, tmp_path, lambda new: _rewrite(new / "interactions.parquet", lambda f: f.drop("conversion", "rating")))
    assert "BASE trains the conversion head but NEW has no 'conversion' column" in _update_error(stream, new, tmp_path)


def test_logs_all_older_than_bases_data_are_refused(stream, tmp_path):
    new = _broken_new(stream, tmp_path, lambda new: _rewrite(new / "interactions.parquet", lambda f: f.with_columns(pl.col("timestamp") - 10**9)))
    assert "at or before BASE's data cut" in _update_error(stream, new, tmp_path)


def test_a_catalogue_without_bases_items_is_refused(stream, tmp_path):
    old_item = vocab(stream["base_run"], "item")["item_id"][0]
    def drop(new: Path) -> None:
        for name in ("items", "interactions"):  # a catalogue that lost an item nobody saw since
            _rewrite(new / f"{name}.parquet", lambda f: f.filter(pl.col("item_id") != old_item))

    new = _broken_new(stream, tmp_path, drop)
    message = _update_error(stream, new, tmp_path)
    assert "lacks 1 item(s) of BASE's catalogue" in message and old_item in message


def test_sharded_training_of_an_update_is_refused_clearly(stream, tmp_path):
    assert "warm-starting sharded tables is not built" in _update_error(stream, stream["new1"], tmp_path / "a", "--nproc", "2")


def test_an_existing_out_that_is_no_update_is_refused(stream, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    assert "is not an update in progress" in _update_error(stream, stream["new1"], tmp_path)


def test_prepare_update_refuses_a_changed_history_length(stream, tmp_path):
    run = RunDir.create(tmp_path / "r", RunDir(stream["base_run"]).config().replace(**{"data.history_len": "7"}), stream["new1"])
    with pytest.raises(DataError, match="history_len = 7 but BASE was prepared with 10"):
        prepare_update(run, RunDir(stream["base_run"]), 0.2)


def test_rows_new_holds_again_are_counted_once(stream, tmp_path):
    # NEW = BASE's own test window again (now to train on) + NEW's rows: the repeated rows come from NEW, once
    base_cfg = RunDir(stream["base_run"]).config()
    base_test = pl.read_parquet(stream["base_run"] / "data" / "test.parquet").select("user_id", "item_id", "timestamp", "click", "conversion", "rating")
    new = tmp_path / "again"
    shutil.copytree(stream["new1"], new)
    rows = pl.read_parquet(new / "interactions.parquet")
    pl.concat([base_test.with_columns(split=pl.lit("train")).cast(rows.schema), rows]).write_parquet(new / "interactions.parquet")
    run = RunDir.create(tmp_path / "r", base_cfg, new)
    summary = prepare_update(run, RunDir(stream["base_run"]), 0.2)
    assert summary["base_rows_in_new"] == base_test.height
    train = pl.read_parquet(run.data / "train.parquet")
    assert train.select("user_idx", "item_idx", "timestamp").is_duplicated().sum() == 0
    repeated = train.join(pl.read_parquet(stream["base_run"] / "data" / "test.parquet").select("user_idx", "item_idx", "timestamp"), on=["user_idx", "item_idx", "timestamp"])
    assert repeated.height == base_test.height and not repeated["context"].any()  # trained on, as NEW's train rows


def test_an_update_from_the_event_log_equals_one_from_the_same_events_as_a_dataset(stream, tmp_path):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.index import build_index  # noqa: F401  (the base run is indexed by `recsys run`)

    served = tmp_path / "served"
    shutil.copytree(stream["base_run"], served)
    client = TestClient(create_app(served, admin_token="t"))
    base_items = set(vocab(stream["base_run"], "item")["item_id"])
    rows = pl.read_parquet(stream["new1"] / "interactions.parquet").filter(pl.col("item_id").is_in(list(base_items))).drop("split")
    events = rows.to_dicts()
    for start in range(0, len(events), 1000):
        response = client.post("/events", json={"events": events[start : start + 1000]}, headers={"Authorization": "Bearer t"})
        assert response.status_code == 200, response.text

    as_dataset = tmp_path / "as_dataset"
    as_dataset.mkdir()
    for entry in Path(read_json(stream["base_run"] / "source.json")["data"]).iterdir():
        if entry.name != "interactions.parquet":
            (as_dataset / entry.name).symlink_to(entry)
    rows.write_parquet(as_dataset / "interactions.parquet")

    fast = ["--set", "update.gate=false", "--set", "update.epochs=1"]
    assert recsys_main(["-q", "update", "--run", str(stream["base_run"]), "--events", str(served), "--out", str(tmp_path / "from_log"), *fast]) == 0
    assert recsys_main(["-q", "update", "--run", str(stream["base_run"]), "--data", str(as_dataset), "--out", str(tmp_path / "from_data"), *fast]) == 0
    record = read_json(tmp_path / "from_log" / "update.json")
    assert record["source"]["events"] == len(events) and record["source"]["left_out_unknown_items"] == 0
    a, b = (load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in ("from_log", "from_data"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for split in ("train", "test"):
        assert pl.read_parquet(tmp_path / "from_log" / "data" / f"{split}.parquet").equals(pl.read_parquet(tmp_path / "from_data" / "data" / f"{split}.parquet"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path]:
    """A model that has learnt something (tests/test_serving.py's planted groups) and a later log of the same kind."""
    from recsys.cli import run_step
    from recsys.config import load_config
    from test_serving import PLANTED_CONFIG, planted_dataset

    root = tmp_path_factory.mktemp("planted-update")
    run = RunDir.create(root / "base_run", load_config(None, PLANTED_CONFIG), planted_dataset(root / "base"))
    for step in ("prepare", "embed", "train", "index", "evaluate"):
        run_step(step, run)
    later = planted_dataset(root / "later")
    _rewrite(later / "interactions.parquet", lambda f: f.with_columns(pl.col("timestamp") + 10**6))
    return {"base_run": run.root, "later": later}


def test_the_gate_passes_a_normal_update_and_refuses_one_trained_on_shuffled_labels(planted, tmp_path):
    code = recsys_main(["-q", "update", "--run", str(planted["base_run"]), "--data", str(planted["later"]), "--out", str(tmp_path / "normal")])
    normal = read_json(tmp_path / "normal" / "update.json")
    assert code == 0 and normal["published"] is True and normal["gate"]["passed"] is True
    assert read_json(tmp_path / "normal" / "gate.json")["live"] == str(planted["base_run"].resolve())
    report = (tmp_path / "normal" / "report.md").read_text()
    assert "## Against the live run (gate): passed" in report and "| click.auc |" in report  # the report shows the stale comparison

    corrupted = tmp_path / "corrupted_data"
    shutil.copytree(planted["later"], corrupted)
    rows = pl.read_parquet(corrupted / "interactions.parquet")
    train = rows.filter(pl.col("split") == "train")  # the log trained on is corrupted; the test window is what happened
    labels = train.select("click", "conversion", "rating").sample(fraction=1.0, shuffle=True, seed=1)
    shuffled = train.with_columns(labels["click"], labels["conversion"], labels["rating"])
    pl.concat([shuffled, rows.filter(pl.col("split") != "train")]).write_parquet(corrupted / "interactions.parquet")
    code = recsys_main(["-q", "update", "--run", str(planted["base_run"]), "--data", str(corrupted), "--out", str(tmp_path / "corrupted"), "--set", "update.replay=0"])
    record = read_json(tmp_path / "corrupted" / "update.json")
    assert code == 3 and record["published"] is False and "click.auc" in record["gate"]["refused"]
    gated = record["gate"]["metrics"]["click.auc"]
    assert gated["live"] > 0.9 and gated["live"] - gated["candidate"] > 0.1, gated


@pytest.mark.slow
def test_an_update_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    synthesize(tmp_path / "full", users=1500, items=300, seed=5, images=False)
    full = pl.read_parquet(tmp_path / "full" / "interactions.parquet")
    cut = [int(full["timestamp"].quantile(q)) for q in (0.5, 0.9)]
    t = pl.col("timestamp")
    base = _write(tmp_path / "base", tmp_path / "full", full.filter(t < cut[0]), cut[0], [])
    new = _write(tmp_path / "new", tmp_path / "full", full.filter(t >= cut[0]).with_columns(split=pl.when(t < cut[1]).then(pl.lit("train")).otherwise(pl.lit("test"))), 2**62, [])
    assert recsys_main(["-q", "run", "--data", str(base), "--out", str(tmp_path / "base_run"), *sum((["--set", s] for s in [*FAST, "train.epochs=1"]), [])]) == 0

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}

    def update(out: str) -> subprocess.Popen:
        args = ["-q", "update", "--run", str(tmp_path / "base_run"), "--data", str(new), "--out", str(tmp_path / out), "--set", "update.gate=false", "--set", "update.epochs=4", "--set", "train.patience=10"]
        return subprocess.Popen([sys.executable, "-m", "recsys", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    assert update("straight").wait(timeout=600) == 0
    job = update("killed")
    first = tmp_path / "killed" / "model" / "checkpoint" / "epoch-0001.safetensors"
    deadline = time.monotonic() + 600
    while not first.is_file():
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read() if job.poll() is not None else "no checkpoint in time"
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    record = read_json(tmp_path / "killed" / "update.json")
    assert job.returncode == -signal.SIGKILL and "train" not in record["steps_done"]
    resumed = update("killed")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a, b = (load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(tmp_path / "killed" / "metrics.json")["click"] == read_json(tmp_path / "straight" / "metrics.json")["click"]
