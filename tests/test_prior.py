"""The towers' popularity prior (``model.popularity_prior``): where it enters the score, where it stays out, how it is chosen."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from recsys.config import ModelConfig, ServeConfig
from recsys.model import load_model, save_model
from recsys.ranking import score_candidates
from serving.index import ItemIndex, build_index
from serving.recommender import Recommender
from training.evaluate import evaluate
from training.prior import apply_prior, choose_prior, click_counts
from training.retrieval import known_clicks
from tests.test_index import make_tiny_run
from tests.test_model import make_batch, make_model

torch.set_num_threads(1)


def counts(n: int = 21, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 50, size=n))


@pytest.mark.parametrize("item_bias", [False, True])
def test_the_prior_is_beta_log1p_clicks_in_the_last_coordinate(item_bias):
    model, batch = make_model(item_bias=item_bias, popularity_prior="valid"), make_batch()
    d = model.spec.config.dim
    with torch.inference_mode():
        before = model.item_vectors(batch["item_idx"], batch["text"], batch["text_mask"], batch["image"], batch["image_mask"])
        clicks = counts()
        model.set_popularity_prior(0.2, clicks)
        after = model.item_vectors(batch["item_idx"], batch["text"], batch["text_mask"], batch["image"], batch["image_mask"])
        user = model.user_vectors(batch["user_idx"], batch["history"])
    assert model.vector_dim == d + 1 and after.shape == user.shape == (6, d + 1)
    torch.testing.assert_close(user[:, d], torch.ones(6))
    torch.testing.assert_close(after[:, :d], before[:, :d])  # the unit part is untouched
    expected = 0.2 * torch.log1p(clicks[batch["item_idx"]].float())
    torch.testing.assert_close(after[:, d] - before[:, d], expected)  # before: the bias, or 0 without one
    assert model.item_prior[0] == 0  # padding / items added live


@pytest.mark.parametrize("item_bias", [True, False])
def test_the_towers_only_ranker_reads_the_trained_score_too(item_bias):
    model, batch = make_model(item_bias=item_bias, popularity_prior="valid", ranker_input="towers"), make_batch()
    with torch.inference_mode():
        plain = model(batch)
        model.set_popularity_prior(1.5, counts())
        with_prior = model(batch)
    for head in ("p_click", "p_ctcvr", "rating"):
        torch.testing.assert_close(with_prior[head], plain[head])
    assert not torch.allclose(with_prior["item_vec"], plain["item_vec"])


def test_the_ranker_reads_the_trained_score_with_or_without_the_prior():
    """The prior is set after training: every ranking path takes it back out of the u . v column."""
    model, batch = make_model(item_bias=True, popularity_prior="valid"), make_batch()
    with torch.no_grad():
        model.item_tower.bias.weight.normal_()
    content = {k: batch[k] for k in ("text", "text_mask", "image", "image_mask")}
    with torch.inference_mode():
        plain = model(batch)
        user = model.user_state(batch["user_idx"][:1], batch["history"][:1])
        item = model.item_state(batch["item_idx"], **content)
        ranked = model.rank(user, item)
        model.set_popularity_prior(1.5, counts())
        with_prior = model(batch)
        item_with = model.item_state(batch["item_idx"], **content)
        ranked_with = model.rank(user, item_with)
        kept = {"item_vec": item_with["item_vec"], "first_layer": model.item_first_layer(item_with)}  # what the service keeps
        served, _ = score_candidates(model, user, batch["item_idx"].unsqueeze(0), item_with["item_vec"].unsqueeze(0), item_with["content_vec"].unsqueeze(0), ServeConfig(), item_first=kept["first_layer"].unsqueeze(0))
        fresh, _ = score_candidates(model, user, batch["item_idx"].unsqueeze(0), item_with["item_vec"].unsqueeze(0), item_with["content_vec"].unsqueeze(0), ServeConfig())
        blind = model.rank(user, {k: v for k, v in item_with.items() if k != "prior"})  # as a path that forgot to take it out
    assert not torch.allclose(with_prior["item_vec"], plain["item_vec"])  # the retrieval vectors do carry it
    for head in ("p_click", "p_ctcvr", "rating"):
        torch.testing.assert_close(with_prior[head], plain[head])
        torch.testing.assert_close(ranked_with[head], ranked[head])
    torch.testing.assert_close(served, fresh, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(blind["p_click"], ranked["p_click"])  # the test can tell: the u . v column matters


def test_the_prior_survives_save_and_load_and_older_models_have_none(tmp_path):
    model = make_model(popularity_prior="valid")
    model.set_popularity_prior(0.1, counts())
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    torch.testing.assert_close(loaded.item_prior, model.item_prior)
    plain = make_model(popularity_prior="off")
    save_model(plain, tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "model.json").read_text())
    del meta["config"]["popularity_prior"], meta["config"]["popularity_prior_grid"]  # as written before the setting existed
    (tmp_path / "old" / "model.json").write_text(json.dumps(meta))
    old = load_model(tmp_path / "old")
    assert not old.has_prior and old.vector_dim == old.spec.config.dim and old.prior_of(torch.tensor([1])) is None


@pytest.mark.parametrize("value", ["sometimes", "-0.1", "nan", "inf"])
def test_a_bad_prior_setting_is_refused_with_its_name(value):
    with pytest.raises(ValueError, match="model.popularity_prior must be"):
        ModelConfig(popularity_prior=value)


# -- choosing it on valid ----------------------------------------------------------------------
@pytest.fixture()
def prior_run(tmp_path):
    return make_tiny_run(tmp_path / "run", ["model.popularity_prior=valid", "model.popularity_prior_grid=0,0.05,0.5,3"])


def test_valid_chooses_the_grid_beta_with_the_best_valid_recall_and_never_reads_test(prior_run):
    choice = choose_prior(prior_run, prior_run.config())
    scores = choice["valid_recall@20"]
    assert set(scores) == {"0.0", "0.05", "0.5", "3.0"} and choice["chosen_on"] == "valid"
    assert scores[repr(choice["beta"])] == max(scores.values())
    assert len(set(scores.values())) > 1  # the betas rank differently: the choice is not a tie broken by order
    (prior_run.data / "test.parquet").unlink()  # the choice never needed it
    assert choose_prior(prior_run, prior_run.config()) == choice


def test_the_applied_prior_counts_train_and_valid_clicks_and_reaches_the_index_and_the_service(prior_run):
    apply_prior(prior_run, {"beta": 0.5, "chosen_on": "test"})
    model = load_model(prior_run.model)
    clicks = click_counts(known_clicks(prior_run), model.spec.n_items)
    assert int(clicks.sum()) == known_clicks(prior_run).height and known_clicks(prior_run)["split"].n_unique() == 2
    expected = 0.5 * torch.log1p(clicks.float())
    expected[0] = 0
    torch.testing.assert_close(model.item_prior, expected)
    assert json.loads((prior_run.model / "model.json").read_text())["popularity_prior"]["beta"] == 0.5
    build_index(prior_run)
    index = ItemIndex.load(prior_run.index)
    assert index.bias and index.dim == model.vector_dim
    faiss_ids = index.ids["faiss_id"].to_numpy()
    item_idx = torch.from_numpy(index.item_idx(faiss_ids))
    np.testing.assert_allclose(index.vectors(faiss_ids)[:, -1], expected[item_idx].numpy(), rtol=1e-5, atol=1e-6)
    result = Recommender.load(prior_run).recommend(user_id="u3", k=5)
    assert len(result.items) == 5 and all(math.isfinite(r.score) for r in result.items)
    metrics = evaluate(prior_run)
    assert json.loads(prior_run.metrics_path.read_text())["retrieval_prior"] == {"beta": 0.5, "chosen_on": "test"}
    assert "popularity prior, 0.5 &times; log(1 + train and valid clicks" in (prior_run.root / "report.html").read_text()
    assert metrics["retrieval"]["recall@20"] >= 0


def test_without_a_valid_split_there_is_no_prior(prior_run):
    (prior_run.data / "valid.parquet").unlink()
    choice = choose_prior(prior_run, prior_run.config())
    assert choice["beta"] == 0.0 and "no valid split" in choice["chosen_on"]


def test_a_fixed_beta_is_taken_as_given(tmp_path):
    run = make_tiny_run(tmp_path / "run", ["model.popularity_prior=0.3"])
    assert choose_prior(run, run.config()) == {"beta": 0.3, "chosen_on": "config"}
    off = make_tiny_run(tmp_path / "off", ["model.popularity_prior=off"])
    assert choose_prior(off, off.config()) is None


def test_selection_by_the_user_state_measure_reads_the_training_jobs_fused_model_like_the_saved_one(prior_run):
    """``train.selection_recall = "user_state"``: the epoch's model (fused table kernels) measured on a plain copy, the same figure as the saved model's."""
    from training.prior import user_state_recall, valid_recall_by_beta
    from training.train_single import fuse_tables

    cfg = prior_run.config()
    saved = valid_recall_by_beta(prior_run, load_model(prior_run.model), cfg, [0.0])[0]["0.0"]
    fused = load_model(prior_run.model)
    fuse_tables(fused, 0.01)
    assert 0 < saved <= 1
    assert user_state_recall(prior_run, fused.eval(), cfg) == pytest.approx(saved, abs=1e-9)
    (prior_run.data / "valid.parquet").unlink()
    assert user_state_recall(prior_run, fused, cfg) is None
