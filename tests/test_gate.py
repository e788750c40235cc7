"""training.gate: a candidate run against the live run it would replace, on the candidate's test rows (`recsys evaluate --gate`)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys import metrics as m
from recsys.cli import main, run_step
from recsys.config import load_config
from recsys.errors import ConfigError, RunError
from recsys.model import RecsysModel, load_model, save_model
from recsys.rundir import RunDir, read_json, write_json, write_parquet
from training.evaluate import load_content, score_rows
from training.gate import gate, parse_max_drop
from test_index import make_tiny_run
from test_serving import PLANTED_CONFIG, planted_dataset

QUICK_EVAL = ["eval.bootstrap=0", "eval.baseline_mf=false", "eval.baselines="]  # the gate tests read only the headline metrics
GATE_BOOTSTRAP = 300


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> RunDir:
    """A model trained on ``planted_dataset`` (users click their own colour), evaluated: the live run."""
    root = tmp_path_factory.mktemp("gate")
    data = planted_dataset(root / "data")
    run = RunDir.create(root / "live", load_config(None, [*PLANTED_CONFIG, *QUICK_EVAL]), data)
    for step in ("prepare", "embed", "train", "evaluate"):
        run_step(step, run)
    return run


def copy_run(run: RunDir, root: Path) -> RunDir:
    return RunDir(shutil.copytree(run.root, root, ignore=shutil.ignore_patterns("gate.json")))


@pytest.fixture(scope="module")
def shuffled(live, tmp_path_factory) -> RunDir:
    """A copy of the live run retrained on its train rows with the label columns shuffled across rows, evaluated."""
    run = copy_run(live, tmp_path_factory.mktemp("shuffled") / "run")
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        path = run.data / f"{split}.parquet"
        if not path.is_file():
            continue
        frame = pl.read_parquet(path)
        labels = frame.select(c for c in ("click", "conversion", "rating") if c in frame.columns)
        write_parquet(frame.with_columns(labels[rng.permutation(frame.height)].get_columns()), path)  # one permutation: labels stay consistent
    run_step("train", run)
    run_step("evaluate", run)
    return run


@pytest.fixture(scope="module")
def refused(shuffled, live) -> tuple[int, dict]:
    """`recsys evaluate --run SHUFFLED --gate LIVE`: the exit code and RUN/gate.json."""
    code = main(["-q", "evaluate", "--run", str(shuffled.root), "--gate", str(live.root), "--bootstrap", str(GATE_BOOTSTRAP)])
    return code, read_json(shuffled.gate_path)


# -- a run against itself ----------------------------------------------------------------------
def test_a_run_gated_against_itself_passes_with_every_drop_exactly_zero(live):
    verdict = gate(live, live, bootstrap=GATE_BOOTSTRAP)
    assert verdict["passed"] and verdict["refused"] == []
    assert set(verdict["metrics"]) == {"click.auc", "conversion.auc", "ctcvr.auc", "rating.rmse", "retrieval.recall@20"}
    measured = {name: entry for name, entry in verdict["metrics"].items() if entry["status"] != "undefined"}
    assert set(measured) == {"click.auc", "ctcvr.auc", "rating.rmse", "retrieval.recall@20"}
    for name, entry in measured.items():
        assert entry["drop"] == 0.0 and entry["interval"] == [0.0, 0.0], name
        assert entry["live"] == entry["candidate"], name
    assert {name for name, entry in measured.items() if entry["passed"]} == {"click.auc", "ctcvr.auc", "retrieval.recall@20"}
    assert measured["rating.rmse"]["status"] == "not gated"  # reported; gated only when --max-drop names it
    assert read_json(live.gate_path) == verdict


def test_a_metric_undefined_on_the_test_rows_is_reported_and_not_gated(live):
    conversion = gate(live, live, bootstrap=1)["metrics"]["conversion.auc"]  # every clicked planted test row converts: one class
    assert conversion["status"] == "undefined" and conversion["passed"] is None
    assert conversion["live"] is None and conversion["candidate"] is None and conversion["allowed"] == 0.005


def test_the_gate_scores_the_rows_that_evaluate_scores(live):
    verdict = gate(live, live, bootstrap=1)
    metrics = read_json(live.metrics_path)
    test = pl.read_parquet(live.data / "test.parquet")
    assert verdict["rows"] == test.height == metrics["counts"]["test_rows"]
    assert verdict["retrieval_users"] == metrics["counts"]["retrieval_users"]
    for name in ("click.auc", "ctcvr.auc", "rating.rmse", "retrieval.recall@20"):
        task, key = name.split(".")
        assert verdict["metrics"][name]["live"] == pytest.approx(metrics[task][key], abs=1e-12), name


# -- a worse candidate -----------------------------------------------------------------------
def test_a_candidate_trained_on_shuffled_labels_is_refused_with_a_non_zero_exit(refused, shuffled, capsys):
    code, verdict = refused
    assert code == 3
    assert verdict["passed"] is False and "click.auc" in verdict["refused"]
    assert verdict["metrics"]["click.auc"]["passed"] is False


def test_the_verdict_compares_the_live_model_with_the_candidate_not_one_model_twice(refused, live, shuffled):
    _, verdict = refused
    click = verdict["metrics"]["click.auc"]
    assert verdict["live"] == str(live.root.resolve()) and verdict["candidate"] == str(shuffled.root.resolve())
    # The same test rows (the copy kept them): each column is what that run's own evaluation measured.
    assert click["live"] == pytest.approx(read_json(live.metrics_path)["click"]["auc"], abs=1e-12)
    assert click["candidate"] == pytest.approx(read_json(shuffled.metrics_path)["click"]["auc"], abs=1e-12)
    assert click["live"] > 0.8 and abs(click["candidate"] - 0.5) < 0.25
    assert click["drop"] == pytest.approx(click["live"] - click["candidate"], abs=1e-12)
    low, high = click["interval"]
    assert click["allowed"] < low <= click["drop"] <= high  # significantly worse by more than the tolerance


def test_an_allowed_drop_larger_than_the_worst_resample_lets_the_candidate_through(refused, shuffled, live):
    _, verdict = refused
    loose = {name: 1.0 for name in verdict["metrics"] if name != "rating.rmse"} | {"rating.rmse": 10.0}
    assert gate(shuffled, live, max_drop=loose, bootstrap=50)["passed"] is True


# -- what the gate refuses to compare --------------------------------------------------------
def test_a_candidate_whose_vocabulary_does_not_extend_the_live_one_is_refused_clearly(live, tmp_path):
    other = copy_run(live, tmp_path / "other")
    users = pl.read_parquet(other.data / "users.parquet")
    swapped = users["user_id"].to_list()
    swapped[0], swapped[1] = swapped[1], swapped[0]  # two users trade indices: not the ids the live model learned
    write_parquet(users.with_columns(pl.Series("user_id", swapped)), other.data / "users.parquet")
    with pytest.raises(RunError, match="ancestor whose ids it keeps") as error:
        gate(other, live)
    assert "users.parquet" in str(error.value) and "2 of" in str(error.value)
    assert not other.gate_path.exists()


def test_a_candidate_embedded_with_other_encoders_is_refused_clearly(live, tmp_path):
    other = copy_run(live, tmp_path / "other")
    meta = read_json(other.content / "meta.json")
    meta["image"]["identity"] += "|another"
    write_json(other.content / "meta.json", meta)
    with pytest.raises(RunError, match="differ in their encoders"):
        gate(other, live)


def test_an_unknown_max_drop_metric_is_an_error_naming_it(live, capsys):
    assert main(["-q", "evaluate", "--run", str(live.root), "--gate", str(live.root), "--max-drop", "click.auc=0.01,click.acu=0.01"]) == 2
    err = capsys.readouterr().err
    assert "click.acu" in err and "retrieval.recall@20" in err  # the unknown name and the ones the gate knows
    with pytest.raises(ConfigError, match="click.acu"):
        gate(live, live, max_drop={"click.acu": 0.01})


def test_max_drop_parses_comma_separated_and_repeated_pairs():
    assert parse_max_drop(["click.auc=0.002,retrieval.recall@20=0.005", "rating.rmse=inf"]) == {
        "click.auc": 0.002, "retrieval.recall@20": 0.005, "rating.rmse": float("inf"),
    }
    with pytest.raises(ConfigError, match="METRIC=NUMBER"):
        parse_max_drop(["click.auc"])
    with pytest.raises(ConfigError, match=">= 0"):
        parse_max_drop(["click.auc=-0.1"])


# -- ids new since the live run ----------------------------------------------------------------
def test_users_and_items_new_since_the_live_run_reach_it_as_unknown_with_the_candidates_content(tmp_path):
    candidate = make_tiny_run(tmp_path / "candidate", seed=0)  # 20 users, 60 items
    live = copy_run(candidate, tmp_path / "live")
    n_users, n_items = 16, 21  # the live run knew users 1..15 and items 1..20 (test items are 6..25)
    for name, column, size in (("users.parquet", "user_idx", n_users), ("items.parquet", "item_idx", n_items)):
        write_parquet(pl.read_parquet(live.data / name).filter(pl.col(column) < size), live.data / name)
    write_json(live.data / "meta.json", read_json(live.data / "meta.json") | {"n_users": n_users, "n_items": n_items})
    torch.manual_seed(1)
    live_spec = dataclasses.replace(load_model(candidate.model).spec, n_users=n_users, n_items=n_items)
    save_model(RecsysModel(live_spec).eval(), live.model)

    verdict = gate(candidate, live, bootstrap=20)
    test = pl.read_parquet(candidate.data / "test.parquet")
    assert (verdict["new_users"], verdict["new_items"]) == (5, 40)  # users 16..20, items 21..60
    assert verdict["rows_of_new_users"] == int((test["user_idx"] >= n_users).sum()) > 0
    assert verdict["rows_of_new_items"] == int((test["item_idx"] >= n_items).sum()) > 0
    # The live model's ratings: new users as the unknown user 0, every item with the candidate's content (new items by content only).
    live_model = load_model(live.model)
    as_unknown = test.with_columns(pl.when(pl.col("user_idx") >= n_users).then(0).otherwise(pl.col("user_idx")).alias("user_idx"))
    scores, _ = score_rows(live_model, as_unknown, load_content(candidate, live_model))
    rating = verdict["metrics"]["rating.rmse"]
    assert rating["live"] == pytest.approx(m.rmse(test["rating"].to_numpy(), scores["rating"]), abs=1e-6)
    assert rating["drop"] == pytest.approx(rating["candidate"] - rating["live"], abs=1e-12)  # lower is better: drop = candidate - live
    assert verdict["metrics"]["retrieval.recall@20"]["live"] is not None  # the live model ranked the grown catalogue


def test_the_weighted_resample_metrics_equal_the_metrics_of_the_drawn_rows():
    from training.evaluate import row_metrics
    from training.gate import _weighted_metrics
    from training.retrieval import mean_over_users

    rng = np.random.default_rng(0)
    n, users = 400, 60
    click = (rng.random(n) < 0.4).astype(np.float32)
    conversion = click * (rng.random(n) < 0.5)
    labels = {"click": click, "conversion": conversion, "ctcvr": conversion, "rating": np.where(click > 0, rng.integers(1, 6, n), np.nan).astype(np.float32)}
    scores = {"p_click": rng.random(n), "p_cvr": rng.random(n), "p_ctcvr": rng.random(n), "rating": rng.random(n) * 4 + 1}
    recall = np.where(rng.random(users) < 0.2, np.nan, rng.random(users))
    retrieval = type("R", (), {"per_user": {"recall@20": recall}})()
    measured = ["click.auc", "conversion.auc", "ctcvr.auc", "rating.rmse", "retrieval.recall@20"]
    values = _weighted_metrics(labels, (scores, retrieval), measured)
    rows, drawn_users = rng.integers(0, n, n), rng.integers(0, users, users)
    got = values(np.bincount(rows, minlength=n), np.bincount(drawn_users, minlength=users))
    direct = row_metrics(labels, scores, rows)
    assert got["click.auc"] == pytest.approx(direct["click"]["auc"]) and got["conversion.auc"] == pytest.approx(direct["conversion"]["auc"])
    assert got["ctcvr.auc"] == pytest.approx(direct["ctcvr"]["auc"]) and got["rating.rmse"] == pytest.approx(direct["rating"]["rmse"])
    assert got["retrieval.recall@20"] == pytest.approx(mean_over_users(recall[drawn_users]))
