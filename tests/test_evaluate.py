"""The evaluation step on a tiny hand-built run directory (RUN/data, RUN/content, RUN/model per architecture.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from recsys.config import ModelConfig, load_config
from recsys.errors import RunError
from recsys.rundir import RunDir, read_json, write_json

model_module = pytest.importorskip("recsys.model", reason="recsys.model (RecsysModel, save_model) is not written yet")
from training.evaluate import evaluate, padded_history, rank_catalogue  # noqa: E402

N_USERS, N_ITEMS, HISTORY_LEN, TEXT_DIM, IMAGE_DIM = 12, 30, 4, 6, 5  # real ids 1..N, index 0 reserved
ALL_TASKS = ("click", "conversion", "rating")


def _split(rng: np.random.Generator, rows: int, t0: int, tasks: tuple[str, ...]) -> pl.DataFrame:
    user_idx = rng.integers(1, N_USERS + 1, rows)
    item_idx = rng.integers(1, N_ITEMS + 1, rows)
    click = (rng.random(rows) < 0.4).astype(np.int8)
    lengths = rng.integers(0, HISTORY_LEN + 1, rows)
    history = [rng.integers(1, N_ITEMS + 1, n).tolist() for n in lengths]
    frame = pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in user_idx],
            "item_id": [f"i{i}" for i in item_idx],
            "user_idx": user_idx.astype(np.int64),
            "item_idx": item_idx.astype(np.int64),
            "timestamp": (t0 + np.arange(rows) * 10).astype(np.int64),
            "click": click,
            "history": pl.Series(history, dtype=pl.List(pl.Int64)),
            "sampled": np.zeros(rows, dtype=bool),
        }
    )
    if "conversion" in tasks:
        frame = frame.with_columns(pl.Series("conversion", (click * (rng.random(rows) < 0.5)).astype(np.int8)))
    if "rating" in tasks:
        rating = np.where(click == 1, rng.integers(1, 6, rows).astype(np.float32), np.nan)
        frame = frame.with_columns(pl.Series("rating", rating, dtype=pl.Float32).fill_nan(None))
    return frame


def make_run(root: Path, tasks: tuple[str, ...] = ALL_TASKS, ann_recall: float | None = 0.97) -> RunDir:
    """A run directory with prepared data, content, a (random-weight) model, index.json and a training log."""
    run = RunDir.create(root, load_config(None, ["eval.bootstrap=20"]), root / "dataset")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    run.data.mkdir(parents=True)
    for name, rows, t0 in (("train", 300, 0), ("valid", 60, 10_000), ("test", 90, 20_000)):
        _split(rng, rows, t0, tasks).write_parquet(run.data / f"{name}.parquet")
    pl.DataFrame({"item_id": [f"i{i}" for i in range(1, N_ITEMS + 1)], "item_idx": np.arange(1, N_ITEMS + 1)}).write_parquet(run.data / "items.parquet")
    pl.DataFrame({"user_id": [f"u{u}" for u in range(1, N_USERS + 1)], "user_idx": np.arange(1, N_USERS + 1)}).write_parquet(run.data / "users.parquet")
    task_flags = {t: t in tasks for t in ALL_TASKS}
    write_json(run.data / "meta.json", {"n_users": N_USERS + 1, "n_items": N_ITEMS + 1, "history_len": HISTORY_LEN, "impressions": True, "tasks": task_flags, "rating_range": [1.0, 5.0], "user_features": {}, "item_features": {}, "split": "given", "rows": {"train": 300, "valid": 60, "test": 90}})

    text_mask = torch.ones(N_ITEMS + 1, dtype=torch.uint8)
    text_mask[[0, 3, 7]] = 0  # row 0 is padding; items 3 and 7 have no text
    image_mask = torch.ones(N_ITEMS + 1, dtype=torch.uint8)
    image_mask[[0, 5]] = 0
    run.content.mkdir()
    save_file({"text": torch.randn(N_ITEMS + 1, TEXT_DIM), "text_mask": text_mask, "image": torch.randn(N_ITEMS + 1, IMAGE_DIM), "image_mask": image_mask}, str(run.content / "embeddings.safetensors"))

    spec = model_module.ModelSpec(
        n_users=N_USERS + 1, n_items=N_ITEMS + 1, history_len=HISTORY_LEN, text_dim=TEXT_DIM, image_dim=IMAGE_DIM, tasks=tasks,
        config=ModelConfig(dim=8, embedding_dim=8, experts=3, expert_dim=8, tower_dim=4),
    )  # fmt: skip
    model_module.save_model(model_module.RecsysModel(spec), run.model, {"best_epoch": 1})
    if ann_recall is not None:
        write_json(run.index / "index.json", {"type": "flat", "dim": 8, "count": N_ITEMS, "sha256": "x", "params": {}, "ann_recall@100": ann_recall})
    run.train_log.write_text("".join(json.dumps({"epoch": e, "train_loss": {"click": 0.7 - 0.1 * e}, "task_weights": {"click": 1.0}}) + "\n" for e in (1, 2)))
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, dict]:
    run = make_run(tmp_path_factory.mktemp("full") / "run")
    return run, evaluate(run)


@pytest.fixture(scope="module")
def click_only_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, dict]:
    run = make_run(tmp_path_factory.mktemp("click") / "run", tasks=("click",), ann_recall=None)
    return run, evaluate(run)


def test_predictions_have_one_row_per_test_row_in_order(full_run):
    run, _ = full_run
    predictions = pl.read_parquet(run.predictions / "test.parquet")
    test = pl.read_parquet(run.data / "test.parquet")
    assert predictions.columns == ["user_id", "item_id", "timestamp", "p_click", "p_conversion", "p_ctcvr", "rating_pred"]
    assert predictions.select("user_id", "item_id", "timestamp").equals(test.select("user_id", "item_id", "timestamp"))


def test_p_ctcvr_is_p_click_times_p_conversion_and_ratings_lie_in_range(full_run):
    run, _ = full_run
    p = pl.read_parquet(run.predictions / "test.parquet")
    np.testing.assert_allclose(p["p_ctcvr"].to_numpy(), (p["p_click"] * p["p_conversion"]).to_numpy(), rtol=1e-5)
    assert p["rating_pred"].min() >= 1.0 and p["rating_pred"].max() <= 5.0


def test_metrics_json_has_exactly_the_design_keys(full_run):
    run, returned = full_run
    written = read_json(run.metrics_path)
    assert written["click"].keys() == {"auc", "logloss"}
    assert written["conversion"].keys() == {"auc"} and written["ctcvr"].keys() == {"auc"}
    assert written["rating"].keys() == {"rmse", "mae"}
    assert written["retrieval"].keys() == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 20, 50, 100)}
    assert written["ann"] == {"recall@100": 0.97}
    assert written["click"] == returned["click"]


def test_headline_click_auc_matches_the_written_predictions(full_run):
    from recsys.metrics import auc

    run, metrics = full_run
    p = pl.read_parquet(run.predictions / "test.parquet")
    test = pl.read_parquet(run.data / "test.parquet")
    assert metrics["click"]["auc"] == pytest.approx(auc(test["click"].to_numpy(), p["p_click"].to_numpy()), abs=1e-6)


def test_absent_tasks_and_ann_are_left_out(click_only_run):
    run, metrics = click_only_run
    assert not {"conversion", "ctcvr", "rating", "ann"} & metrics.keys()
    assert pl.read_parquet(run.predictions / "test.parquet").columns == ["user_id", "item_id", "timestamp", "p_click"]


def test_retrieval_lists_never_contain_a_users_train_or_valid_positive(full_run):
    run, _ = full_run
    from recsys.model import load_model
    from training.evaluate import all_item_vectors, load_content

    model = load_model(run.model)
    test = pl.read_parquet(run.data / "test.parquet")
    result = rank_catalogue(run, model, all_item_vectors(model, load_content(run, model)), test, run.config().eval)
    positives = pl.concat([pl.read_parquet(run.data / f"{s}.parquet") for s in ("train", "valid")]).filter(pl.col("click") == 1)
    recommended = {(int(u), int(i)) for u, items in zip(result.user_idx, result.top_items) for i in items if i > 0}
    assert len(recommended) > 0
    assert not recommended & set(zip(positives["user_idx"].to_list(), positives["item_idx"].to_list()))


def test_report_files_and_summary_are_written(full_run):
    run, _ = full_run
    assert run.report_html.is_file() and run.report_md.is_file()
    assert read_json(run.summary_path)["evaluate"]["test_rows"] == 90


def test_slices_count_rows_of_items_without_text(full_run):
    run, metrics = full_run
    test = pl.read_parquet(run.data / "test.parquet")
    assert metrics["slices"]["text"]["missing text"]["rows"] == test.filter(pl.col("item_idx").is_in([3, 7])).height
    assert sum(s["rows"] for s in metrics["slices"]["user_activity"].values()) == test.height


def test_missing_test_split_names_the_file_and_the_step(tmp_path):
    run = RunDir.create(tmp_path / "run", load_config(), tmp_path)
    with pytest.raises(RunError, match=r"meta.json is missing: run `recsys prepare"):
        evaluate(run)


def test_model_trained_on_other_data_is_an_error_telling_to_retrain(tmp_path):
    run = make_run(tmp_path / "run", tasks=("click",))
    meta = read_json(run.data / "meta.json")
    write_json(run.data / "meta.json", meta | {"n_items": N_ITEMS + 5})
    with pytest.raises(RunError, match=r"n_items=31 but .*n_items=35: the model was trained on other data; run `recsys train"):
        evaluate(run)


def test_compare_run_without_metrics_is_an_error_naming_it(full_run, tmp_path):
    run, _ = full_run
    with pytest.raises(RunError, match=r"other/metrics.json is missing: run `recsys evaluate --run"):
        evaluate(run, compare=[tmp_path / "other"])


def test_padded_history_keeps_the_last_items_oldest_first():
    history = pl.Series([[1, 2, 3, 4, 5, 6], [], [9]], dtype=pl.List(pl.Int64))
    assert padded_history(history, 4).tolist() == [[3, 4, 5, 6], [0, 0, 0, 0], [9, 0, 0, 0]]


def test_retrieval_history_is_the_last_known_clicks_of_train_and_valid_not_test(tmp_path):
    from training.evaluate import _known_history

    run = RunDir(tmp_path / "run")
    run.data.mkdir(parents=True)
    split = lambda rows: pl.DataFrame(rows, schema={"user_idx": pl.Int64, "item_idx": pl.Int64, "timestamp": pl.Int64, "click": pl.Int8, "sampled": pl.Boolean}, orient="row")  # noqa: E731
    split([(1, 5, 30, 1, False), (1, 6, 10, 1, False), (1, 7, 40, 0, False), (1, 8, 50, 0, True), (2, 9, 5, 1, False)]).write_parquet(run.data / "train.parquet")
    split([(1, 4, 20, 1, False), (1, 3, 60, 1, False)]).write_parquet(run.data / "valid.parquet")
    split([(1, 2, 15, 1, False)]).write_parquet(run.data / "test.parquet")  # a test click earlier than train ones: never history
    known = {row["user_idx"]: row["history"] for row in _known_history(run, length=3).iter_rows(named=True)}
    assert known == {1: [4, 5, 3], 2: [9]}  # by time: 6@10, 4@20, 5@30, 3@60 -> last 3; unclicked and sampled rows left out
