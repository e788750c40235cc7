"""training.data.StreamedSplit: a train split beyond train.memory_budget_mb, read chunk by chunk."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from training.data import StreamedSplit, batches, bytes_per_row, read_split, train_split

TASKS = {"click": True, "conversion": True, "rating": False}
HISTORY_LEN = 4


def _file(path, n: int, context: int = 0, row_group: int = 7):
    rng = np.random.default_rng(0)
    frame = pl.DataFrame({
        "user_idx": np.arange(n) % 13 + 1,
        "item_idx": np.arange(n) + 1,  # a row's identity
        "history": [rng.integers(1, 50, rng.integers(0, HISTORY_LEN + 1)).tolist() for _ in range(n)],
        "click": (np.arange(n) % 3 == 0).astype(np.int8),
        "conversion": np.zeros(n, dtype=np.int8),
        "context": np.arange(n) < context,  # an update's BASE rows: history only
    })  # fmt: skip
    frame.write_parquet(path, row_group_size=row_group)
    return frame


@pytest.mark.parametrize("n, batch, rows_in_memory", [(101, 8, 20), (64, 8, 16), (30, 50, 8), (5, 2, 400)])
def test_an_epoch_yields_every_trained_row_once_in_full_batches_but_the_last(tmp_path, n, batch, rows_in_memory):
    frame = _file(tmp_path / "t.parquet", n, context=3)
    split = StreamedSplit(tmp_path / "t.parquet", HISTORY_LEN, TASKS, rows_in_memory)
    got = list(split.batches(batch, {}, seed=1))
    items = torch.cat([b["item_idx"] for b in got]).tolist()
    assert sorted(items) == list(range(4, n + 1))  # each trained row once; the 3 context rows never
    assert all(len(b["click"]) == batch for b in got[:-1]) and 0 < len(got[-1]["click"]) <= batch
    reference = read_split(tmp_path / "t.parquet", HISTORY_LEN, TASKS, frame.filter(~pl.col("context")).drop("context"))
    position = {item: row for row, item in enumerate(reference["item_idx"].tolist())}
    for b in got:  # every column travels with its row
        rows = torch.tensor([position[i] for i in b["item_idx"].tolist()])
        for name in ("user_idx", "history", "click", "conversion"):
            assert torch.equal(b[name], reference[name][rows]), name
    assert len(split) == n - 3 and torch.equal(split["item_idx"].sort().values, torch.arange(4, n + 1))


def test_the_order_is_set_by_the_seed_and_mixes_chunks(tmp_path):
    _file(tmp_path / "t.parquet", 200)
    split = StreamedSplit(tmp_path / "t.parquet", HISTORY_LEN, TASKS, rows_in_memory=160)  # chunks of 20 rows, windows of 4
    assert split.chunk_rows == 20 and split.n_chunks == 10
    order = lambda seed: torch.cat([b["item_idx"] for b in split.batches(16, {}, seed)]).tolist()  # noqa: E731
    assert order(3) == order(3) and order(3) != order(4)
    first = next(iter(split.batches(16, {}, seed=3)))["item_idx"]
    assert len(set(((first - 1) // 20).tolist())) > 1  # one batch holds rows of several chunks


@pytest.mark.parametrize("skip", [0, 1, 5, 12, 13, 20])
def test_skipping_batches_resumes_the_same_order_streamed_and_in_memory(tmp_path, skip):
    frame = _file(tmp_path / "t.parquet", 200, context=3)
    streamed = StreamedSplit(tmp_path / "t.parquet", HISTORY_LEN, TASKS, rows_in_memory=160)
    whole = read_split(tmp_path / "t.parquet", HISTORY_LEN, TASKS, frame.filter(~pl.col("context")).drop("context"))
    for split in (streamed, whole):  # 197 trained rows in batches of 16: 13 batches, the last of 5
        full = [b["item_idx"].tolist() for b in batches(split, 16, {}, seed=7)]
        assert len(full) == 13
        assert [b["item_idx"].tolist() for b in batches(split, 16, {}, seed=7, skip=skip)] == full[skip:]


def test_a_split_beyond_the_budget_is_streamed_and_one_within_it_is_read_whole(tmp_path):
    _file(tmp_path / "t.parquet", 100)
    whole = train_split(tmp_path / "t.parquet", HISTORY_LEN, TASKS, memory_budget_mb=1)
    assert isinstance(whole, dict) and len(whole["click"]) == 100
    assert isinstance(train_split(tmp_path / "t.parquet", HISTORY_LEN, TASKS, memory_budget_mb=0), dict)  # 0: always whole
    frame = pl.read_parquet(tmp_path / "t.parquet")
    per_row = bytes_per_row(frame["history"].list.len().mean())  # the rule counts the histories' real lengths, not HISTORY_LEN
    assert per_row == int(np.ceil(36 + 4 * frame["history"].list.len().mean()))
    budget = 100 * per_row / 2**20
    assert isinstance(train_split(tmp_path / "t.parquet", HISTORY_LEN, TASKS, memory_budget_mb=budget), dict)  # 100 rows fit exactly
    streamed = train_split(tmp_path / "t.parquet", HISTORY_LEN, TASKS, memory_budget_mb=budget * 0.99)
    assert isinstance(streamed, StreamedSplit)
    with pytest.raises(KeyError, match="streamed split holds only"):
        streamed["history"]
    assert sum(len(b["click"]) for b in batches(streamed, 32, {}, seed=0)) == 100  # batches() reads it chunk by chunk


def test_training_on_a_streamed_split_learns_as_in_memory(tmp_path):
    from tests.test_train import make_run, read_log
    from training.train import train

    aucs, read = {}, {}
    for name, budget in (("memory", 0), ("streamed", 0.25)):
        run = make_run(tmp_path / name, overrides=["train.epochs=4", f"train.memory_budget_mb={budget}"])
        rows = pl.concat([pl.read_parquet(run.data / "train.parquet")] * 15)  # 18k rows of ~40 B (ragged histories): above 0.25 MB
        rows = rows.sample(fraction=1.0, shuffle=True, seed=0)  # not 15 copies one after another: a window would hold one copy's rows many times
        rows.write_parquet(run.data / "train.parquet", row_group_size=2000)
        summary = train(run)
        aucs[name], read[name] = read_log(run)[summary["best_epoch"] - 1]["valid_auc"]["click"], summary["train_read"]
    assert read["memory"] == "in memory" and read["streamed"].startswith("in chunks of"), read
    assert aucs["streamed"] > 0.8 and abs(aucs["streamed"] - aucs["memory"]) < 0.05, aucs


@pytest.mark.parametrize("world, n, context", [(2, 101, 3), (3, 200, 0), (4, 57, 10)])
def test_each_rank_streams_the_rows_the_in_memory_rank_part_holds_and_together_every_kept_row_once(tmp_path, world, n, context):
    from training.data import read_rank_part

    _file(tmp_path / "t.parquet", n, context=context)
    seen = []
    lengths = set()
    for rank in range(world):
        streamed = StreamedSplit(tmp_path / "t.parquet", HISTORY_LEN, TASKS, rows_in_memory=24, rank=rank, world_size=world)  # chunks of 3 rows
        in_memory = read_rank_part(tmp_path / "t.parquet", rank, world, "drop", interleave=True)
        items = sorted(torch.cat([b["item_idx"] for b in streamed.batches(5, {}, seed=rank)]).tolist())
        assert items == sorted(in_memory["item_idx"].to_list()) == sorted(streamed["item_idx"].tolist())
        lengths.add(sum(1 for _ in streamed.batches(5, {}, seed=rank)))
        seen += items
    trained = n - context
    assert sorted(seen) == list(range(context + 1, context + 1 + trained // world * world))  # each kept row on exactly one rank
    assert len(lengths) == 1  # every rank runs as many batches


@pytest.mark.parametrize("read_rows", [1, 7, 30, 1000])
def test_a_split_file_read_in_slices_equals_the_file_read_at_once(tmp_path, read_rows):
    from training.data import read_split_file

    frame = _file(tmp_path / "t.parquet", 100, context=9)
    whole = read_split(tmp_path / "t.parquet", HISTORY_LEN, TASKS, frame.filter(~pl.col("context")).drop("context"))
    sliced = read_split_file(tmp_path / "t.parquet", HISTORY_LEN, TASKS, read_rows=read_rows)
    assert sliced.keys() == whole.keys() and len(sliced["click"]) == 91
    for name in whole:
        assert torch.equal(sliced[name][:], whole[name][:]), name
