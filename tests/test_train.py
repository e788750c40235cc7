"""The training job: end to end on a tiny learnable RUN/ built here (architecture.md formats)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from recsys.config import load_config
from recsys.errors import RecsysError, RunError
from recsys.model import load_model
from recsys.rundir import RunDir, write_json

torch.set_num_threads(1)

N_USERS, N_ITEMS, N_GENRES, HISTORY_LEN, TEXT_DIM, IMAGE_DIM = 80, 60, 3, 6, 8, 5


def _split(rng: np.random.Generator, user_genre, item_genre, item_quality, n_rows: int) -> pl.DataFrame:
    """Impressions whose labels depend on the ids: click when the user's genre matches the item's."""
    users = rng.integers(1, N_USERS + 1, n_rows)
    items = rng.integers(1, N_ITEMS + 1, n_rows)
    match = user_genre[users] == item_genre[items]
    click = rng.random(n_rows) < np.where(match, 0.85, 0.1)
    conversion = click & (rng.random(n_rows) < np.where(item_quality[items] > 0, 0.8, 0.15))
    rating = np.where(click, np.clip(3 + 1.5 * item_quality[items] + rng.normal(0, 0.3, n_rows), 1, 5), np.nan)
    same_genre = [np.flatnonzero(item_genre[1:] == g) + 1 for g in range(N_GENRES)]
    history = [rng.choice(same_genre[user_genre[u]], rng.integers(0, HISTORY_LEN + 1)).tolist() for u in users]
    return pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in users],
            "item_id": [f"i{i}" for i in items],
            "user_idx": users,
            "item_idx": items,
            "timestamp": np.arange(n_rows, dtype=np.int64),
            "click": click.astype(np.int8),
            "conversion": conversion.astype(np.int8),
            "rating": pl.Series(rating, dtype=pl.Float32, nan_to_null=True),
            "history": pl.Series(history, dtype=pl.List(pl.Int64)),
            "sampled": np.zeros(n_rows, dtype=bool),
        }
    )


def make_run(root: Path, *, content: bool = True, overrides: list[str] | None = None, seed: int = 0, n_train: int = 1200) -> RunDir:
    """A tiny RUN/ with data/, content/ and config.toml (labels learnable from ids and content)."""
    rng = np.random.default_rng(seed)
    user_genre = np.r_[0, rng.integers(0, N_GENRES, N_USERS)]
    item_genre = np.r_[0, rng.integers(0, N_GENRES, N_ITEMS)]
    item_quality = np.r_[0.0, rng.normal(0, 1, N_ITEMS)]
    cfg = load_config(None, ["train.epochs=3", "train.batch_size=128", "train.lr=0.01", "model.dim=16", "model.embedding_dim=8",
                             "model.expert_dim=16", "model.tower_dim=8", "train.patience=5", *(overrides or [])])
    run = RunDir.create(root, cfg, root)
    run.data.mkdir(parents=True)
    _split(rng, user_genre, item_genre, item_quality, n_train).write_parquet(run.data / "train.parquet")
    _split(rng, user_genre, item_genre, item_quality, 400).write_parquet(run.data / "valid.parquet")
    pl.DataFrame({
        "user_id": [f"u{u}" for u in range(1, N_USERS + 1)],
        "user_idx": np.arange(1, N_USERS + 1),
        "cat_genre": user_genre[1:] + 1,
        "num_activity": rng.normal(0, 1, N_USERS).astype(np.float32),
    }).write_parquet(run.data / "users.parquet")
    pl.DataFrame({
        "item_id": [f"i{i}" for i in range(1, N_ITEMS + 1)],
        "item_idx": np.arange(1, N_ITEMS + 1),
        "text": [None] * N_ITEMS,
        "image": [None] * N_ITEMS,
        "cat_genre": item_genre[1:] + 1,
        "num_quality": item_quality[1:].astype(np.float32),
    }, schema_overrides={"text": pl.String, "image": pl.String}).write_parquet(run.data / "items.parquet")
    write_json(run.data / "meta.json", {
        "n_users": N_USERS + 1, "n_items": N_ITEMS + 1, "history_len": HISTORY_LEN, "impressions": True,
        "tasks": {"click": True, "conversion": True, "rating": True}, "rating_range": [1.0, 5.0],
        "user_features": {"cat_genre": N_GENRES + 1, "num_activity": None},
        "item_features": {"cat_genre": N_GENRES + 1, "num_quality": None},
        "split": "given", "rows": {"train": n_train, "valid": 400, "test": 0},
    })
    if content:
        text = np.zeros((N_ITEMS + 1, TEXT_DIM), np.float32)
        text[np.arange(1, N_ITEMS + 1), item_genre[1:]] = 1.0  # the text shows the genre
        text[1:] += rng.normal(0, 0.1, (N_ITEMS, TEXT_DIM))
        text_mask = np.r_[0, (rng.random(N_ITEMS) < 0.8)].astype(np.uint8)  # some items lack text
        text[text_mask == 0] = 0
        image = np.zeros((N_ITEMS + 1, IMAGE_DIM), np.float32)
        image[1:] = rng.normal(0, 1, (N_ITEMS, IMAGE_DIM))
        run.content.mkdir(parents=True)
        save_file({"text": torch.from_numpy(text), "text_mask": torch.from_numpy(text_mask),
                   "image": torch.from_numpy(image), "image_mask": torch.from_numpy(np.r_[0, np.ones(N_ITEMS)].astype(np.uint8))},
                  str(run.content / "embeddings.safetensors"))
    return run


def read_log(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.train_log.read_text().splitlines()]


def test_training_learns_click_auc_well_above_chance(tmp_path):
    from training.train import train

    run = make_run(tmp_path / "run", overrides=["train.epochs=8"])
    summary = train(run)
    log = read_log(run)
    best = log[summary["best_epoch"] - 1]
    assert best["valid_auc"]["click"] > 0.8
    assert best["train_loss"]["click"] < log[0]["train_loss"]["click"]
    assert json.loads((run.model / "model.json").read_text())["valid"]["auc"]["click"] == best["valid_auc"]["click"]


def test_train_log_has_task_losses_aucs_weights_and_gates_per_epoch(tmp_path):
    from training.train import train

    run = make_run(tmp_path / "run", overrides=["train.epochs=1", "model.experts=3"])
    train(run)
    (line,) = read_log(run)
    assert set(line["train_loss"]) == {"click", "ctcvr", "rating", "retrieval", "total"}
    assert set(line["valid_auc"]) == {"click", "ctcvr", "conversion"}
    assert set(line["task_weights"]) == {"click", "ctcvr", "rating"}
    assert line["lr"] == pytest.approx(0.01) and line["score"] == pytest.approx(-1.0)  # epoch 1: train.lr, the reference losses
    for task in ("click", "conversion", "rating"):
        assert len(line["gates"][task]) == 3 and math.isclose(sum(line["gates"][task]), 1.0, rel_tol=1e-4)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["train"]["epochs_run"] == 1


def test_best_model_loads_without_training_and_scores_the_heads_that_are_on(tmp_path):
    from training.train import train

    run = make_run(tmp_path / "run", overrides=["train.epochs=1", "model.tasks=click,conversion"])
    train(run)
    model = load_model(run.model)
    scores = model.rank(model.user_state(torch.tensor([1, 2]), torch.zeros(2, HISTORY_LEN, dtype=torch.int64)), model.item_state(torch.tensor([3, 4])))
    assert set(scores) == {"p_click", "p_cvr", "p_ctcvr", "retrieval_score"}
    assert json.loads((run.model / "model.json").read_text())["best_epoch"] == 1


def test_resume_after_one_epoch_equals_uninterrupted_training(tmp_path):
    from training.train import train

    straight = make_run(tmp_path / "straight", overrides=["train.epochs=2", "model.modality_dropout=0.3"])
    train(straight)
    resumed = make_run(tmp_path / "resumed", overrides=["train.epochs=1", "model.modality_dropout=0.3"])
    train(resumed)  # the job "stops" after epoch 1 ...
    (resumed.root / "config.toml").write_text((straight.root / "config.toml").read_text())
    summary = train(resumed, resume=True)  # ... and continues to epoch 2
    assert summary["resumed_from_epoch"] == 1

    a = load_file(str(next((straight.model / "checkpoint").glob("epoch-0002.safetensors"))))
    b = load_file(str(next((resumed.model / "checkpoint").glob("epoch-0002.safetensors"))))
    assert a.keys() == b.keys() and any(k.startswith("fused/") for k in a) and any(k.startswith("adam/") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [line["epoch"] for line in read_log(resumed)] == [1, 2]


def test_non_finite_loss_stops_the_job_naming_epoch_step_and_batch(tmp_path):
    from training.train import train

    run = make_run(tmp_path / "run", overrides=["train.epochs=1"])
    users = pl.read_parquet(run.data / "users.parquet")
    users.with_columns(pl.lit(float("nan"), dtype=pl.Float32).alias("num_activity")).write_parquet(run.data / "users.parquet")
    with pytest.raises(RecsysError, match=r"epoch 1, step 1 of 10 .*batch 1 has 128 rows"):
        train(run)


def test_missing_content_turns_the_modalities_off(tmp_path):
    from training.train import train

    run = make_run(tmp_path / "run", content=False, overrides=["train.epochs=1"])
    summary = train(run)
    assert summary["modalities"] == {"text": False, "image": False}
    assert json.loads((run.model / "model.json").read_text())["text_dim"] == 0


def test_train_without_prepared_data_names_the_step_to_run(tmp_path):
    from training.train import train

    run = RunDir.create(tmp_path / "run", load_config(None, []), tmp_path)
    with pytest.raises(RunError, match="recsys prepare"):
        train(run)


@pytest.mark.parametrize("weighting", ["uncertainty", "gradnorm"])
def test_learned_task_weights_move_away_from_their_start(tmp_path, weighting):
    from training.train import train

    run = make_run(tmp_path / "run", overrides=["train.epochs=1", f"train.loss_weights={weighting}"], n_train=600)
    train(run)
    weights = read_log(run)[0]["task_weights"]
    assert any(abs(w - 1.0) > 1e-3 for w in weights.values())
    if weighting == "gradnorm":
        assert math.isclose(sum(weights.values()), 3.0, rel_tol=1e-4)


def test_gated_fusion_logs_mean_modality_gates(tmp_path):
    from training.train import train

    run = make_run(tmp_path / "run", overrides=["train.epochs=1", "model.fusion=gated"], n_train=300)
    train(run)
    gates = read_log(run)[0]["modality_gates"]
    assert len(gates) == 3 and math.isclose(sum(gates), 1.0, rel_tol=1e-4)


def _valid(**losses: float) -> dict:
    return {"loss": {**losses, "total": sum(losses.values())}, "auc": {}, "gates": {}}


def test_selection_counts_each_objective_by_its_relative_improvement():
    from training.epochs import end_of_epoch

    cfg = load_config(None, ["train.patience=2"])
    state = {"epoch": 0, "best_epoch": 0, "best_score": -math.inf, "bad_epochs": 0, "stopped_early": False, "reference_loss": {}, "lr_scale": 1.0}
    end_of_epoch(state, _valid(click=0.50, ctcvr=0.80, rating=1.00, retrieval=5.60), cfg, 1)
    assert state["reference_loss"]["retrieval"] == 5.60 and state["best_epoch"] == 1
    # Every head 3% better, the (10x larger) retrieval loss 1.5% worse: the raw sum got worse, the epoch is still better.
    second = _valid(click=0.485, ctcvr=0.776, rating=0.97, retrieval=5.684)
    assert second["loss"]["total"] > 0.50 + 0.80 + 1.00 + 5.60
    assert end_of_epoch(state, second, cfg, 2) and state["best_epoch"] == 2
    assert second["score"] == pytest.approx(-(0.97 + 0.97 + 0.97 + 1.015) / 4)
    # A small gain on one head does not outweigh a large loss on another.
    assert not end_of_epoch(state, _valid(click=0.48, ctcvr=0.776, rating=1.10, retrieval=5.684), cfg, 3)
    assert state["bad_epochs"] == 1
    assert state["lr_scale"] == cfg.train.plateau_lr_factor  # a plateau lowers the dense learning rate


def test_selection_weighs_objectives_by_their_configured_weights():
    from training.epochs import selection_score

    reference = {"click": 0.5, "rating": 1.0, "retrieval": 5.0}
    valid = _valid(click=0.5, rating=2.0, retrieval=5.0)  # the rating loss doubled
    with_rating = selection_score(valid, reference, load_config(None, []))
    without_rating = selection_score(valid, reference, load_config(None, ["train.rating_weight=0"]))
    assert with_rating == pytest.approx(-(1 + 2 + 1) / 3)
    assert without_rating == pytest.approx(-1.0)


def test_weight_average_is_the_running_mean_of_what_it_was_given():
    from training.epochs import WeightAverage

    average = WeightAverage()
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        model.register_buffer("counts", torch.tensor([seed, seed + 1]))
        models.append(model)
        average.add(model, epoch=seed + 5)
    for name in ("weight", "bias"):
        torch.testing.assert_close(average.mean[name], torch.stack([getattr(m, name).detach() for m in models]).mean(0))
    assert torch.equal(average.mean["counts"], torch.tensor([2, 3]))  # integer buffers: the latest, not a mean
    assert average.epochs == [5, 6, 7]
    again = WeightAverage.from_tensors(average.to_tensors(), average.epochs)
    assert again.epochs == [5, 6, 7] and all(torch.equal(again.mean[k], v) for k, v in average.mean.items())


@pytest.mark.parametrize(
    ("overrides", "limit_mb", "expected"),
    [
        ([], 1024.0, True),  # auto, one process, a small model
        (["train.refit=true"], 1024.0, False),  # auto leaves the selected model to the refit
        ([], 0.001, False),  # auto, a model state over the limit: no second copy
        (["train.average_weights=true"], 0.001, True),  # asked for: averaged whatever its size
        (["train.average_weights=false"], 1024.0, False),
    ],
)
def test_auto_weight_averaging_is_on_for_one_process_unless_refit_or_the_model_is_large(monkeypatch, overrides, limit_mb, expected):
    from tests.test_model import make_model
    from training import epochs

    monkeypatch.setattr(epochs, "AVERAGE_AUTO_MAX_MB", limit_mb)
    assert epochs.averages_weights(load_config(None, overrides), make_model()) is expected


def test_an_explicit_average_with_more_than_one_process_is_refused(tmp_path):
    """(The default, auto, trains sharded: tests/test_train_distributed.py runs it with --nproc 2.)"""
    from training.train_sharded import train_sharded

    run = make_run(tmp_path / "run", overrides=["train.average_weights=true"])
    with pytest.raises(RecsysError, match="train.average_weights works with one process only"):
        train_sharded(run, run.config(), False, 2)


def test_weight_average_starts_at_the_first_plateau_survives_a_resume_and_replaces_the_model_only_when_better(tmp_path):
    from training.train import train

    overrides = ["train.average_weights=true", "train.lr=0.05", "train.patience=10", "model.modality_dropout=0.3"]
    straight = make_run(tmp_path / "straight", overrides=["train.epochs=9", *overrides])
    summary = train(straight)
    log = read_log(straight)
    first_plateau = next(line["epoch"] for line in log if not line["best"])
    averaged = summary["weight_average"]
    assert averaged["epochs"] == list(range(first_plateau, 10)) and len(averaged["epochs"]) >= 2
    meta = json.loads((straight.model / "model.json").read_text())
    saved = load_file(str(straight.model / "model.safetensors"))
    checkpoint = load_file(str(next((straight.model / "checkpoint").glob("epoch-0009.safetensors"))))
    if averaged["kept"]:
        assert averaged["score"] > averaged["selected_epoch_score"] and meta["averaged_epochs"] == averaged["epochs"]
        assert all(torch.equal(saved[k], checkpoint[f"average/{k}"]) for k in saved)
    else:
        assert averaged["score"] <= averaged["selected_epoch_score"] and "averaged_epochs" not in meta

    resumed = make_run(tmp_path / "resumed", overrides=["train.epochs=4", *overrides])
    train(resumed)
    (resumed.root / "config.toml").write_text((straight.root / "config.toml").read_text())
    assert train(resumed, resume=True)["weight_average"] == averaged
    again = load_file(str(next((resumed.model / "checkpoint").glob("epoch-0009.safetensors"))))
    assert again.keys() == checkpoint.keys() and any(k.startswith("average/") for k in again)
    assert all(torch.equal(again[k], checkpoint[k]) for k in checkpoint)


def test_a_job_stopped_mid_epoch_resumes_from_its_last_step_checkpoint_equal_to_an_uninterrupted_run(tmp_path, monkeypatch):
    import training.train_single as TS
    from training.train import train

    overrides = ["train.epochs=2", "train.checkpoint_every_steps=3", "model.modality_dropout=0.3", "train.average_weights=true"]
    straight = make_run(tmp_path / "straight", overrides=overrides)  # 1200 rows / 128: 10 batches an epoch
    train(straight)

    crashed = make_run(tmp_path / "crashed", overrides=overrides)
    real, calls = TS.batch_losses, []

    def crash_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10 + 4 + 8:  # 10 train and 4 valid batches in epoch 1; then epoch 2, batch 8: its last checkpoint was after batch 6
            raise KeyboardInterrupt("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(TS, "batch_losses", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(crashed)
    state = json.loads((crashed.model / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["position"]["step"] == 6 and state["tensors"] == "epoch-0001-step-00000006.safetensors"
    monkeypatch.setattr(TS, "batch_losses", real)
    summary = train(crashed, resume=True)
    assert summary["resumed_from_epoch"] == 1

    a = load_file(str(straight.model / "checkpoint" / "epoch-0002.safetensors"))
    b = load_file(str(crashed.model / "checkpoint" / "epoch-0002.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [line["train_loss"] for line in read_log(crashed)] == [line["train_loss"] for line in read_log(straight)]  # the resumed epoch's mean counts its first 6 batches
    assert list((crashed.model / "checkpoint").glob("*.safetensors")) == [crashed.model / "checkpoint" / "epoch-0002.safetensors"]


def test_refit_trains_on_train_then_valid_rows_for_the_selected_epochs_as_a_run_given_them_as_its_train_split(tmp_path):
    from training.train import train

    same = ["train.plateau_lr_factor=1.0", "train.patience=2", "train.epochs=6"]  # one lr for every epoch: the explicit run below has no plateaus to replay
    refit = make_run(tmp_path / "refit", overrides=[*same, "train.refit=true"])
    summary = train(refit)
    epochs = summary["best_epoch"]
    assert summary["refit"] == {**summary["refit"], "done": True, "epochs": epochs, "rows": 1200 + 400}
    meta = json.loads((refit.model / "model.json").read_text())
    assert meta["refit"]["epochs"] == epochs and meta["valid"]["auc"]["click"] > 0.5  # the selected epoch's validation is kept

    explicit = make_run(tmp_path / "explicit", overrides=[*same[:2], f"train.epochs={epochs}"])
    rows = pl.concat([pl.read_parquet(explicit.data / "train.parquet"), pl.read_parquet(explicit.data / "valid.parquet")], how="vertical_relaxed")
    rows.write_parquet(explicit.data / "train.parquet")
    (explicit.data / "valid.parquet").unlink()
    train(explicit)
    got, expected = load_file(str(refit.model / "model.safetensors")), load_file(str(explicit.model / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    selected = make_run(tmp_path / "selected", overrides=same)
    train(selected)
    plain = load_file(str(selected.model / "model.safetensors"))
    assert any(not torch.equal(plain[k], got[k]) for k in got)  # the refit replaced the selected model


def test_refit_and_weight_averaging_are_refused_together(tmp_path):
    from recsys.errors import ConfigError
    from training.train import train

    with pytest.raises(ConfigError, match="train.refit and train.average_weights"):
        train(make_run(tmp_path / "run", overrides=["train.refit=true", "train.average_weights=true"]))


def test_set_weight_adds_the_held_out_multinomial_to_training_only(tmp_path):
    from training.train import train

    lines = {}
    for weight in (0, 1):
        run = make_run(tmp_path / f"run{weight}", overrides=["train.epochs=1", f"train.set_weight={weight}"])
        summary = train(run)
        (lines[weight],) = read_log(run)
        assert ("set term" in summary["retrieval_objective"]) == bool(weight), summary["retrieval_objective"]
    # training adds minus the mean log-probability of each user's held-out clicks (about log of the catalogue);
    # validation measures the rows' own next-item loss, unchanged by the term apart from what it trained
    assert lines[1]["train_loss"]["retrieval"] > lines[0]["train_loss"]["retrieval"] + 1.0, lines
    assert abs(lines[1]["valid_loss"]["retrieval"] - lines[0]["valid_loss"]["retrieval"]) < 1.0, lines


def test_future_positives_add_the_multinomial_term_of_later_clicks_to_the_retrieval_loss(tmp_path):
    from training.train import train

    losses = {}
    for window in (0, 5):
        run = make_run(tmp_path / f"run{window}", overrides=["train.epochs=1", f"train.future_positives={window}"])
        train(run)
        (line,) = read_log(run)
        losses[window] = line["train_loss"]["retrieval"]
    # the same first batches, plus minus the mean log-probability of each row's later clicks (about log of the catalogue each)
    assert losses[5] > losses[0] + 1.0, losses
