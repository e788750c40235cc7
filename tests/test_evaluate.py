"""The evaluation step on a tiny hand-built run directory, and the retrieval protocol on a hand-set catalogue."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from recsys.config import EvalConfig, ModelConfig, ServeConfig, load_config
from recsys.errors import RunError
from recsys.history import padded_history
from recsys.model import ModelSpec, RecsysModel, load_model, save_model
from recsys.rundir import RunDir, read_json, write_json
from training.baseline import MFSpec
from training.evaluate import all_item_states, all_item_vectors, evaluate, load_content, served_sources
from training.retrieval import known_clicks, rank_catalogue, retrieval_section

N_USERS, N_ITEMS, HISTORY_LEN, TEXT_DIM, IMAGE_DIM = 12, 30, 4, 6, 5  # real ids 1..N, index 0 reserved
ALL_TASKS = ("click", "conversion", "rating")


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC by counting every (positive, negative) pair: 1 when the positive scores higher, 1/2 on a tie."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    difference = positive[:, None].astype(np.float64) - negative[None, :].astype(np.float64)
    return float(((difference > 0) + 0.5 * (difference == 0)).sum() / difference.size)


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

    spec = ModelSpec(
        n_users=N_USERS + 1, n_items=N_ITEMS + 1, history_len=HISTORY_LEN, text_dim=TEXT_DIM, image_dim=IMAGE_DIM, tasks=tasks,
        config=ModelConfig(dim=8, embedding_dim=8, experts=3, expert_dim=8, tower_dim=4),
    )  # fmt: skip
    save_model(RecsysModel(spec), run.model, {"best_epoch": 1})
    if ann_recall is not None:
        write_json(run.index / "index.json", {"type": "flat", "dim": 8, "count": N_ITEMS, "sha256": "x", "params": {}, "ann_recall@100": ann_recall})
    run.train_log.write_text("".join(json.dumps({"epoch": e, "train_loss": {"click": 0.7 - 0.1 * e}, "task_weights": {"click": 1.0}}) + "\n" for e in (1, 2)))
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, dict]:
    run = make_run(tmp_path_factory.mktemp("full") / "run")
    run.record("train", {"retrieval_objective": "full softmax over the catalogue + the set term (weight 1, 20% of each user's train clicks held out)"})
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


def test_headline_metrics_equal_a_pairwise_count_over_the_written_predictions(full_run):
    run, returned = full_run
    written = read_json(run.metrics_path)
    p = pl.read_parquet(run.predictions / "test.parquet")
    test = pl.read_parquet(run.data / "test.parquet")
    click = test["click"].to_numpy().astype(np.int64)
    conversion = test["conversion"].to_numpy().astype(np.int64)
    clicked = click == 1
    assert 0 < clicked.sum() < test.height and 0 < conversion[clicked].sum() < clicked.sum()  # every AUC is defined
    p_click = p["p_click"].to_numpy().astype(np.float64)
    assert written["click"]["auc"] == pytest.approx(pairwise_auc(click, p_click), abs=1e-9)
    assert written["click"]["logloss"] == pytest.approx(-np.mean(click * np.log(p_click) + (1 - click) * np.log(1 - p_click)), rel=1e-6)
    assert written["conversion"]["auc"] == pytest.approx(pairwise_auc(conversion[clicked], p["p_conversion"].to_numpy()[clicked]), abs=1e-9)
    assert written["ctcvr"]["auc"] == pytest.approx(pairwise_auc(click * conversion, p["p_ctcvr"].to_numpy()), abs=1e-9)
    rated = test["rating"].is_not_null().to_numpy()
    error = p["rating_pred"].to_numpy()[rated].astype(np.float64) - test["rating"].to_numpy()[rated]
    assert written["rating"]["rmse"] == pytest.approx(np.sqrt(np.mean(error**2)), rel=1e-5)
    assert written["rating"]["mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-5)
    assert written["click"] == returned["click"] and written["rating"] == returned["rating"]


def test_retrieval_counts_are_the_test_users_with_a_click_not_seen_in_train_or_valid(full_run):
    run, metrics = full_run
    splits = {name: pl.read_parquet(run.data / f"{name}.parquet").filter(pl.col("click") == 1) for name in ("train", "valid", "test")}
    known = {(u, i) for name in ("train", "valid") for u, i in splits[name].select("user_idx", "item_idx").iter_rows()}
    test_clicks = set(splits["test"].select("user_idx", "item_idx").iter_rows())
    evaluated = {u for u, i in test_clicks - known}
    assert metrics["counts"]["retrieval_users"] == len(evaluated) > 0
    assert metrics["counts"]["retrieval_users_without_relevant"] == len({u for u, _ in test_clicks} - evaluated)


def test_a_user_sample_ranks_the_same_lists_for_the_sampled_users_and_says_it_is_a_sample(full_run):
    run, metrics = full_run
    model = load_model(run.model)
    test = pl.read_parquet(run.data / "test.parquet")
    item_vecs, content_vecs = all_item_states(model, load_content(run, model))
    cfg = run.config().eval
    everyone = rank_catalogue(run, model, item_vecs, test, cfg, content_vecs=content_vecs)
    sample = rank_catalogue(run, model, item_vecs, test, cfg.model_copy(update={"max_eval_users": 5}), content_vecs=content_vecs)
    assert everyone.users_eligible == sample.users_eligible == everyone.user_idx.size == metrics["counts"]["retrieval_users_eligible"] > 5
    assert sample.user_idx.size == 5 and set(sample.user_idx) <= set(everyone.user_idx)
    rows = np.searchsorted(everyone.user_idx, sample.user_idx)
    assert np.array_equal(sample.top_items, everyone.top_items[rows])  # a user's list does not depend on who else is ranked
    from training.report import _sampled

    assert "a uniform sample" in _sampled({"retrieval_users": 5, "retrieval_users_eligible": sample.users_eligible})
    assert _sampled(metrics["counts"]) == ""


def test_served_metrics_are_the_same_when_the_other_sources_run_user_by_user(full_run, tmp_path, monkeypatch):
    import shutil

    import recsys.candidates
    import training.evaluate

    run, metrics = full_run
    copy = RunDir(shutil.copytree(run.root, tmp_path / "copy"))
    monkeypatch.setattr(training.evaluate, "DENSE_SCORES", 0)  # the large-catalogue path: no (users, n_items) matrices
    monkeypatch.setattr(recsys.candidates, "DENSE_SCORES", 0)
    sparse = evaluate(copy)
    assert sparse["served"] == pytest.approx(metrics["served"], abs=1e-9) and sparse["served"]["recall@20"] > 0
    assert sparse["retrieval"] == pytest.approx(metrics["retrieval"], abs=1e-12)


def ranked_with_known_clicks(run):
    """The test split, the model's full ranking of the catalogue, and the train + valid clicks it excludes."""
    model = load_model(run.model)
    test = pl.read_parquet(run.data / "test.parquet")
    item_vecs, content_vecs = all_item_states(model, load_content(run, model))
    result = rank_catalogue(run, model, item_vecs, test, run.config().eval, content_vecs=content_vecs)
    known = pl.concat([pl.read_parquet(run.data / f"{s}.parquet") for s in ("train", "valid")]).filter(pl.col("click") == 1)
    return test, result, known


def test_metrics_json_recall_is_the_mean_share_of_each_users_new_test_clicks_in_their_top_k(full_run):
    run, metrics = full_run
    test, result, known = ranked_with_known_clicks(run)
    known_pairs = set(known.select("user_idx", "item_idx").iter_rows())
    relevant: dict[int, set[int]] = {}
    for u, i in test.filter(pl.col("click") == 1).select("user_idx", "item_idx").iter_rows():
        if (u, i) not in known_pairs:
            relevant.setdefault(u, set()).add(i)
    top = {int(u): [int(i) for i in items] for u, items in zip(result.user_idx, result.top_items)}
    assert top.keys() == relevant.keys()
    for k in (10, 20):
        expected = np.mean([len(relevant[u] & set(top[u][:k])) / len(relevant[u]) for u in relevant])
        assert metrics["retrieval"][f"recall@{k}"] == pytest.approx(expected, abs=1e-12)


def test_absent_tasks_and_ann_are_left_out(click_only_run):
    run, metrics = click_only_run
    assert not {"conversion", "ctcvr", "rating", "ann"} & metrics.keys()
    assert pl.read_parquet(run.predictions / "test.parquet").columns == ["user_id", "item_id", "timestamp", "p_click"]


def test_retrieval_lists_never_contain_a_users_train_or_valid_positive(full_run):
    run, _ = full_run
    _, result, positives = ranked_with_known_clicks(run)
    recommended = {(int(u), int(i)) for u, items in zip(result.user_idx, result.top_items) for i in items if i > 0}
    assert len(recommended) > 0
    assert not recommended & set(zip(positives["user_idx"].to_list(), positives["item_idx"].to_list()))


def test_report_md_shows_this_runs_metrics_and_the_summary_its_counts(full_run):
    run, metrics = full_run
    report_md = run.report_md.read_text()
    assert f"| Click AUC | {metrics['click']['auc']:.3f} |" in report_md
    assert f"| Click log loss | {metrics['click']['logloss']:.3f} |" in report_md
    assert f"90 test rows, {metrics['counts']['retrieval_users']} users in the retrieval metrics, {N_ITEMS} catalogue items." in report_md
    assert "<h2>Retrieval</h2>" in run.report_html.read_text()
    # what the towers trained with, from RUN/summary.json, in metrics.json and the report's retrieval section
    assert metrics["retrieval_objective"].endswith("held out)")
    assert "The towers' training objective: full softmax over the catalogue + the set term (weight 1, 20% of each user&#x27;s train clicks held out)." in run.report_html.read_text()
    summary = read_json(run.summary_path)["evaluate"]
    assert summary["test_rows"] == 90 and summary["retrieval_users"] == metrics["counts"]["retrieval_users"]


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


# -- the retrieval protocol on a hand-set catalogue ------------------------------------------
class HandSetUserVectors:
    """Test double of the model for ``rank_catalogue``: user u's vector is row u of a fixed table.

    It records the (unpadded) history each user's vector was asked for.
    """

    def __init__(self, vectors: torch.Tensor, n_items: int, history_len: int):
        self.spec = MFSpec(n_users=vectors.shape[0], n_items=n_items, history_len=history_len)
        self.vectors = vectors
        self.histories: dict[int, list[int]] = {}

    def user_vectors(self, user_idx: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        for user, row in zip(user_idx.tolist(), history.tolist()):
            self.histories[user] = [item for item in row if item != 0]
        return self.vectors[user_idx]


def _rows(rows: list[tuple[int, int, int, int, bool]]) -> pl.DataFrame:
    """(user_idx, item_idx, timestamp, click, sampled) rows as a prepared split."""
    schema = {"user_idx": pl.Int64, "item_idx": pl.Int64, "timestamp": pl.Int64, "click": pl.Int8, "sampled": pl.Boolean}
    return pl.DataFrame(rows, schema=schema, orient="row")


def _hand_set_run(root: Path, train: list, valid: list) -> RunDir:
    run = RunDir(root)
    run.data.mkdir(parents=True)
    _rows(train).write_parquet(run.data / "train.parquet")
    _rows(valid).write_parquet(run.data / "valid.parquet")
    return run


# Items 1..6; user u's score for an item is column u - 1 of its vector (user vectors are one-hot).
# Row 0 is padding: it would top every list if it were ranked.
ITEM_VECTORS = torch.tensor(
    [
        # user 1, user 2, user 3
        [5.0, 5.0, 5.0],  # 0 padding
        [0.9, 0.1, 0.2],  # 1: user 1's train click, their top score
        [0.3, 0.2, 0.95],  # 2: user 3's train click, their top score
        [0.8, 0.9, 0.1],  # 3: user 2's train click
        [0.7, 0.3, 0.4],  # 4: user 1's valid click
        [0.6, 0.4, 0.3],
        [0.1, 0.5, 0.5],
    ]
)
USER_VECTORS = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # row 0 unknown user


def test_full_ranking_on_a_hand_set_catalogue_gives_the_hand_computed_recall_and_ndcg(tmp_path):
    train = [(1, 1, 10, 1, False), (2, 3, 11, 1, False), (3, 2, 12, 1, False), (3, 5, 13, 0, False), (1, 6, 10, 0, True)]
    run = _hand_set_run(tmp_path / "run", train=train, valid=[(1, 4, 20, 1, False)])
    test = _rows([
        (1, 2, 30, 1, False), (1, 5, 31, 1, False), (1, 5, 36, 1, False),  # item 5 clicked twice: one relevant pair
        (1, 1, 32, 1, False),  # a re-click of user 1's train item: excluded, so not relevant
        (2, 3, 33, 1, False), (2, 6, 34, 0, False),  # user 2's only test click is their train item: not evaluated
        (3, 6, 35, 1, False),
    ])  # fmt: skip
    model = HandSetUserVectors(USER_VECTORS, n_items=7, history_len=3)
    result = rank_catalogue(run, model, ITEM_VECTORS, test, EvalConfig(ks=(1, 2, 3, 10)))

    # User 1 without items 1 and 4 (train, valid): 3 (.8), 5 (.6), 2 (.3), 6 (.1); relevant 2 and 5 at ranks 2 and 1.
    # User 3 without item 2 (train): 6 (.5), 4 (.4), 5 (.3), 1 (.2), 3 (.1); relevant 6 at rank 0.
    # K = 10 is cut to the 6 catalogue items; short lists pad with 0.
    assert result.user_idx.tolist() == [1, 3]
    assert result.users_without_relevant == 1
    assert result.top_items.tolist() == [[3, 5, 2, 6, 0, 0], [6, 4, 5, 1, 3, 0]]
    assert model.histories == {1: [1, 4], 3: [2]}  # known clicks, oldest first; the non-click and the sampled row left out
    assert result.item_popularity.tolist() == [0, 1, 1, 1, 0, 0, 0]  # clicked train rows per item (valid not counted)

    # g = 1 / log2(3) = 0.63093 (gain at rank 1); gain at rank 2 = 1 / log2(4) = 0.5.
    # recall@K, user 1 (2 relevant): 0, 1/2, 1, 1 at K = 1, 2, 3, 10; user 3: 1 at every K.
    #   means: (0 + 1) / 2 = 0.5, (0.5 + 1) / 2 = 0.75, 1, 1.
    # ndcg@K, user 1: 0; g / (1 + g) = 0.38685; (g + 0.5) / (1 + g) = 0.69343 (also at K = 10: ideal DCG stops at 2 items).
    #   user 3: 1 at every K. means: 0.5, 0.69343, 0.84671, 0.84671.
    g = 1 / math.log2(3)
    expected = {
        "recall@1": 0.5, "recall@2": 0.75, "recall@3": 1.0, "recall@10": 1.0,
        "ndcg@1": 0.5, "ndcg@2": (g / (1 + g) + 1) / 2, "ndcg@3": ((g + 0.5) / (1 + g) + 1) / 2, "ndcg@10": ((g + 0.5) / (1 + g) + 1) / 2,
    }  # fmt: skip
    assert retrieval_section(result, (1, 2, 3, 10)) == pytest.approx(expected, abs=1e-9)
    assert expected["ndcg@2"] == pytest.approx(0.69343, abs=1e-5) and expected["ndcg@3"] == pytest.approx(0.84671, abs=1e-5)


def test_served_metrics_read_the_reranked_order_of_the_towers_top_candidates(tmp_path):
    """The two-stage protocol: the towers' top N eligible candidates, reordered by the second stage."""
    run = _hand_set_run(tmp_path / "run", train=[(1, 1, 10, 1, False)], valid=[(1, 4, 20, 1, False)])
    test = _rows([(1, 2, 30, 1, False), (1, 6, 31, 1, False)])
    model = HandSetUserVectors(USER_VECTORS, n_items=7, history_len=3)
    seen: list[list[int]] = []

    def lowest_index_first(users, history, candidates):  # a stand-in second stage: orders by item_idx
        seen.append(candidates.tolist())
        return torch.sort(candidates, dim=1).values

    result = rank_catalogue(run, model, ITEM_VECTORS, test, EvalConfig(ks=(1, 2)), rerank=lowest_index_first, candidates=3)
    # towers, items 1 and 4 excluded: 3 (.8), 5 (.6), 2 (.3), 6 (.1); the top 3 reach the second stage, which puts 2 first
    assert seen == [[[3, 5, 2]]]
    assert result.top_items.tolist() == [[2, 3]]
    assert retrieval_section(result, (1, 2)) == pytest.approx({"recall@1": 0.5, "recall@2": 0.5, "ndcg@1": 1.0, "ndcg@2": 1 / (1 + 1 / math.log2(3))})
    # item 6 (relevant) never reaches the second stage: beyond N = 3 it is a miss, whatever the reranker would do
    plain = rank_catalogue(run, model, ITEM_VECTORS, test, EvalConfig(ks=(1, 2)))
    assert retrieval_section(plain, (1, 2))["recall@2"] == 0.0


def test_metrics_json_holds_the_served_two_stage_metrics_beside_the_towers(full_run):
    _, metrics = full_run
    assert set(metrics["served"]) == set(metrics["retrieval"]) == {f"{n}@{k}" for n in ("recall", "ndcg") for k in (10, 20, 50, 100)}
    # K = 100 reaches the whole candidate list of this small catalogue: the reranker only reorders it, so recall@100 agrees
    assert metrics["served"]["recall@100"] == pytest.approx(metrics["retrieval"]["recall@100"])


def test_without_the_exclusion_the_training_positive_would_have_ranked_first(tmp_path):
    # The same user 1 with no known clicks: item 1 (.9) and item 4 (.7) take ranks 0 and 2, pushing 5 and 2 to 3 and 4.
    run = _hand_set_run(tmp_path / "run", train=[(2, 3, 11, 1, False)], valid=[])
    test = _rows([(1, 2, 30, 1, False), (1, 5, 31, 1, False)])
    result = rank_catalogue(run, HandSetUserVectors(USER_VECTORS, n_items=7, history_len=3), ITEM_VECTORS, test, EvalConfig(ks=(3,)))
    assert result.top_items.tolist() == [[1, 3, 4]]
    assert retrieval_section(result, (3,))["recall@3"] == 0.0


def test_retrieval_user_vector_sees_the_last_known_clicks_of_train_and_valid_not_test(tmp_path):
    train = [(1, 5, 30, 1, False), (1, 6, 10, 1, False), (1, 7, 40, 0, False), (1, 8, 50, 0, True), (2, 9, 5, 1, False)]
    run = _hand_set_run(tmp_path / "run", train=train, valid=[(1, 4, 20, 1, False), (1, 3, 60, 1, False)])
    test = _rows([(1, 2, 15, 1, False), (2, 1, 70, 1, False)])  # user 1's test click is earlier than train ones: never history
    model = HandSetUserVectors(torch.randn(3, 4), n_items=10, history_len=3)
    rank_catalogue(run, model, torch.randn(10, 4), test, EvalConfig(ks=(5,)))
    assert model.histories == {1: [4, 5, 3], 2: [9]}  # by time: 6@10, 4@20, 5@30, 3@60 -> last 3; unclicked and sampled rows left out


def test_excluding_train_items_only_keeps_valid_items_rankable_and_relevant(tmp_path):
    # user 1: train click on 1, valid click on 4, test clicks on 4 and 5
    run = _hand_set_run(tmp_path / "run", train=[(1, 1, 10, 1, False)], valid=[(1, 4, 20, 1, False)])
    test = _rows([(1, 4, 30, 1, False), (1, 5, 31, 1, False)])
    model = HandSetUserVectors(USER_VECTORS, n_items=7, history_len=3)
    both = rank_catalogue(run, model, ITEM_VECTORS, test, EvalConfig(ks=(2,)))
    train_only = rank_catalogue(run, model, ITEM_VECTORS, test, EvalConfig(ks=(2,), exclude="train"))
    # train + valid excluded: 3 (.8), 5 (.6), ...; item 4 is a re-click, only 5 is relevant (rank 1)
    assert both.top_items.tolist()[0][:2] == [3, 5] and retrieval_section(both, (2,))["recall@2"] == 1.0
    # train only: 3 (.8), 4 (.7), 5 (.6); items 4 and 5 both relevant, 4 found in the top 2
    assert train_only.top_items.tolist()[0][:2] == [3, 4] and retrieval_section(train_only, (2,))["recall@2"] == 0.5
    assert model.histories[1] == [1, 4]  # the user vector still sees train and valid


def test_other_candidate_sources_bring_a_co_clicked_item_to_the_second_stage(tmp_path):
    """served_sources: item 6 is co-clicked with user 1's train item 1 (by user 2), far down the towers' order."""
    train = [(1, 1, 10, 1, False), (2, 1, 11, 1, False), (2, 6, 12, 1, False)]
    run = _hand_set_run(tmp_path / "run", train=train, valid=[(1, 4, 20, 1, False)])
    test = _rows([(1, 2, 30, 1, False), (1, 6, 31, 1, False)])
    model = HandSetUserVectors(USER_VECTORS, n_items=7, history_len=3)
    serve = ServeConfig(candidates=3, cooccurrence_candidates=2, popular_candidates=1, item_item="cosine")
    source, propose = served_sources(known_clicks(run), 7, serve)
    neighbours = source.neighbours
    # item 1: users {1, 2}; item 4: {1}; item 6: {2} -> cosine(1, 6) = cosine(1, 4) = 1 / sqrt(2); 4 and 6 share nobody
    assert neighbours.ids[1, :2].tolist() in ([4, 6], [6, 4]) and neighbours.weights[1, :2].tolist() == pytest.approx([2**-0.5] * 2)
    assert source.known.of(1).tolist() == [1, 4] and source.known.of(2).tolist() == [1, 6]  # every known click, train then valid
    seen: list[list[int]] = []

    def highest_index_first(users, history, candidates):
        seen.append(candidates.tolist())
        return torch.sort(candidates, dim=1, descending=True).values

    result = rank_catalogue(run, model, ITEM_VECTORS, test, EvalConfig(ks=(1, 2)), rerank=highest_index_first, candidates=3, propose=propose)
    # towers: 3, 5, 2 (items 1, 4 excluded); co-occurrence of the recent items 1 and 4: only 6 is new (quota 2, one found);
    # popular (train + valid clicks: item 1 twice, then 4 and 6 once): nothing unseen and new is left but never-clicked items, which score 0
    assert seen == [[[3, 5, 2, 6]]]
    assert result.top_items.tolist() == [[6, 5]]
    assert retrieval_section(result, (1, 2))["recall@1"] == 0.5
