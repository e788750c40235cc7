"""Distributed building blocks (training/distributed/, per-rank reading in training/data.py): 2 CPU processes with gloo on 127.0.0.1.

Starting processes is the expensive part on a small machine, so one 2-process session (a
module-scoped fixture) runs every sharding type and writes what it measured; each test then
asserts one behaviour on those values. The 1-process resume of its checkpoint runs in a fresh
process after both ranks have left the group, and every child's stderr is kept, so a child
that dies (a C++ abort included) fails the test with its own output.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from recsys.errors import RecsysError  # noqa: E402
from training import data as DATA  # noqa: E402
from training.distributed import checkpoint as CK  # noqa: E402
from training.distributed import launch as LA  # noqa: E402
from training.distributed import process_group as PG  # noqa: E402
from training.distributed import sharding as SH  # noqa: E402

SHARDINGS = ("data_parallel", "table_wise", "column_wise", "row_wise")
FEATURES = ("user_id", "item_id", "history")
GLOBAL_BATCH = 8  # split 4 + 4 across the two ranks
EMBEDDING_LR, DENSE_LR, EPS = 0.1, 0.1, 1e-8
STEPS = 2


# -- a small model: user table (dim 8) and an item table (dim 16) shared by two features ------
class TwoTableModel(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tables = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name="user", num_embeddings=10, embedding_dim=8, feature_names=["user_id"], pooling=PoolingType.MEAN),
                EmbeddingBagConfig(name="item", num_embeddings=12, embedding_dim=16, feature_names=["item_id", "history"], pooling=PoolingType.MEAN),
            ]
        )
        self.head = nn.Linear(8 + 16 + 16, 1)

    def pooled(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        kt = self.tables(kjt)
        return {f: kt[f] for f in FEATURES}  # by key: sharding reorders the pooled outputs

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.pooled(kjt)
        return self.head(torch.cat([pooled[f] for f in FEATURES], dim=1)).squeeze(1)


def make_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    users = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    items = torch.randint(0, 12, (GLOBAL_BATCH,), generator=g)
    history = torch.randint(0, 12, (GLOBAL_BATCH, 3), generator=g)
    target = torch.randn(GLOBAL_BATCH, generator=g)
    return users, items, history, target


def to_kjt(users: torch.Tensor, items: torch.Tensor, history: torch.Tensor) -> KeyedJaggedTensor:
    n = users.shape[0]
    lengths = torch.tensor([1] * n + [1] * n + [history.shape[1]] * n)
    return KeyedJaggedTensor(keys=list(FEATURES), values=torch.cat([users, items, history.reshape(-1)]), lengths=lengths)


def reference_training(steps: int, column_shards: int = 1) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One process, unsharded, the combined batch: autograd grads + row-wise Adagrad written out by hand.

    Row-wise Adagrad keeps one accumulator per row and *per column shard* (each shard is its own
    fused table), so column-wise sharding into k shards is compared with k accumulators per row.
    """
    model = TwoTableModel()
    users, items, history, target = make_batch()
    momentum = {name: torch.zeros(p.shape[0], column_shards) for name, p in model.tables.named_parameters()}
    for _ in range(steps):
        model.zero_grad()
        loss = ((model(to_kjt(users, items, history)) - target) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            for name, p in model.tables.named_parameters():
                grad = p.grad.view(p.shape[0], column_shards, -1)  # (rows, shards, columns per shard)
                momentum[name] += grad.pow(2).mean(dim=2)
                p -= EMBEDDING_LR * (grad / (momentum[name].sqrt() + EPS).unsqueeze(2)).view_as(p)
            for p in model.head.parameters():
                p -= DENSE_LR * p.grad
    return model, momentum


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def _shard_diffs(dmp: nn.Module, expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |sharded - expected| per parameter, over this rank's shards."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    diffs = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            shards = value.local_shards()
            diffs[key] = max(
                (_max_diff(s.tensor, expected[key][tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets, s.metadata.shard_sizes))]) for s in shards),
                default=0.0,
            )
        else:
            diffs[key] = _max_diff(value, expected[key])
    return diffs


def _retrieval_batch() -> dict[str, torch.Tensor]:
    """Unit user/item vectors of GLOBAL_BATCH rows, some clicked, one item and two users repeated across the ranks' halves."""
    g = torch.Generator().manual_seed(7)
    return {
        "user_vec": torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, 6, generator=g), dim=-1),
        "item_vec": torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, 6, generator=g), dim=-1),
        "click": torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 1]),
        "item_idx": torch.tensor([3, 5, 7, 2, 3, 9, 1, 2]),
        "user_idx": torch.tensor([1, 2, 3, 4, 1, 2, 3, 1]),  # users 1 and 2 click on both ranks: masked across ranks too
    }


def _retrieval_across_ranks(local: slice) -> dict[str, float]:
    """Each rank's half through ``retrieval_loss_across_ranks``, summed over ranks / world = the one-process loss."""
    import torch.distributed as dist

    from recsys.losses import item_log_q, retrieval_loss
    from training.train_sharded import retrieval_loss_across_ranks

    full = _retrieval_batch()
    diffs = {}
    for all_rows in (False, True):
        log_q = item_log_q(full["item_idx"], None if all_rows else full["click"], 10)
        part = {k: v[local] for k, v in full.items()}
        loss = retrieval_loss_across_ranks({"user_vec": part["user_vec"], "item_vec": part["item_vec"]}, part, log_q, 0.2, all_rows).detach()
        dist.all_reduce(loss)
        single = retrieval_loss({"user_vec": full["user_vec"], "item_vec": full["item_vec"]}, full, log_q, 0.2, all_rows)
        diffs["all_rows" if all_rows else "clicked"] = abs(float(loss) / dist.get_world_size() - float(single))
    return diffs


def _session(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank of the 2-process session; writes ``out/rank<k>.pt`` with what it measured."""
    _capture_stderr(out, f"rank{rank}")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.optim import RowWiseAdagrad

    ctx = PG.init_process_group("cpu")
    users, items, history, target = make_batch()
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    local_kjt = to_kjt(users[local], items[local], history[local])
    initial = TwoTableModel().state_dict()
    results: dict[str, dict] = {"retrieval": _retrieval_across_ranks(local)}

    for sharding in SHARDINGS:
        model = TwoTableModel(seed=123)  # different init: the weights must come from load_unsharded_state
        _apply_optimizer_in_backward(RowWiseAdagrad, model.tables.parameters(), {"lr": EMBEDDING_LR, "eps": EPS})
        dmp = SH.shard_model(model, sharding, ctx.device, ctx.world_size, batch_size=GLOBAL_BATCH)
        SH.load_unsharded_state(dmp, initial)
        inner = SH.unwrap(dmp)

        reference = TwoTableModel()
        ref_pooled = reference.pooled(local_kjt)
        pooled = inner.pooled(local_kjt)
        forward = {f: _max_diff(pooled[f], ref_pooled[f]) for f in FEATURES}

        optimizer = SH.keyed_optimizer(
            dmp,
            dense_optimizer=lambda params: torch.optim.SGD(params, lr=DENSE_LR),
            table_optimizer=lambda params: RowWiseAdagrad(params, lr=EMBEDDING_LR, eps=EPS),  # data_parallel tables
        )
        for _ in range(STEPS):
            optimizer.zero_grad()
            loss = ((dmp(local_kjt) - target[local]) ** 2).mean()
            loss.backward()  # table rows are updated here (fused row-wise Adagrad)
            optimizer.step()  # the dense head (DDP-averaged gradient)
        trained_ref, _ = reference_training(STEPS, column_shards=2 if sharding == "column_wise" else 1)
        step = _shard_diffs(dmp, trained_ref.state_dict())

        ckpt_root = Path(out) / "ckpt" / sharding
        CK.save_checkpoint(ckpt_root, f"step-{STEPS}", dmp, optimizer, {"step": STEPS, "sharding": sharding})
        results[sharding] = {
            "forward": forward,
            "step": step,
            "plan": str(dmp.plan),
            "optimizer_keys": sorted(optimizer.state_dict()["state"].keys()),
        }

    # "auto": the planner picks among the offered types; the forward is still the unsharded one.
    dmp = SH.shard_model(TwoTableModel(seed=123), "auto", ctx.device, ctx.world_size, batch_size=GLOBAL_BATCH)
    SH.load_unsharded_state(dmp, initial)
    pooled, ref_pooled = SH.unwrap(dmp).pooled(local_kjt), TwoTableModel().pooled(local_kjt)
    results["auto"] = {"forward": {f: _max_diff(pooled[f], ref_pooled[f]) for f in FEATURES}, "plan": str(dmp.plan)}

    # The same with FusedEmbeddingBagCollection (optimizer inside the module), row_wise.
    model = TwoTableModel(seed=123)
    model.tables = FusedEmbeddingBagCollection(
        tables=model.tables.embedding_bag_configs(), optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": EMBEDDING_LR, "eps": EPS}
    )
    dmp = SH.shard_model(model, "row_wise", ctx.device, ctx.world_size)
    SH.load_unsharded_state(dmp, initial)
    optimizer = SH.keyed_optimizer(dmp, dense_optimizer=lambda params: torch.optim.SGD(params, lr=DENSE_LR))
    for _ in range(STEPS):
        optimizer.zero_grad()
        ((dmp(local_kjt) - target[local]) ** 2).mean().backward()
        optimizer.step()
    results["fused_row_wise"] = {"step": _shard_diffs(dmp, reference_training(STEPS)[0].state_dict())}

    # RecsysModel itself, table_wise: the same outputs as the unsharded model.
    from recsys.config import ModelConfig
    from recsys.model import ModelSpec, RecsysModel

    spec = ModelSpec(
        n_users=10, n_items=12, history_len=3, tasks=("click", "conversion", "rating"),
        config=ModelConfig(dim=8, embedding_dim=8, experts=2, expert_dim=8, tower_dim=4, use_text=False, use_image=False),
    )  # fmt: skip
    torch.manual_seed(0)
    recsys_ref = RecsysModel(spec).eval()
    recsys_batch = {"user_idx": users[local] + 0, "item_idx": items[local], "history": history[local]}
    expected = recsys_ref(recsys_batch)
    torch.manual_seed(99)
    recsys_dmp = SH.shard_model(RecsysModel(spec), "table_wise", ctx.device, ctx.world_size)
    SH.load_unsharded_state(recsys_dmp, recsys_ref.state_dict())
    recsys_dmp.eval()
    with torch.no_grad():
        got = recsys_dmp(recsys_batch)
    results["recsys_model"] = {k: _max_diff(got[k], expected[k]) for k in ("user_vec", "item_vec", "p_click", "p_ctcvr", "rating")}
    results["recsys_model"]["plan"] = str(recsys_dmp.plan)

    # Data per rank: a 10-row parquet, padded for evaluation and gathered back in file order.
    import polars as pl

    if rank == 0:
        pl.DataFrame({"row": np.arange(10, dtype=np.int64)}).write_parquet(Path(out) / "rows.parquet")
    torch.distributed.barrier()
    padded = DATA.read_rank_part(Path(out) / "rows.parquet", rank, world_size, tail="pad")
    gathered = PG.gather_to_rank0({"row": padded["row"].to_numpy() * 10}, n_rows=10)
    results["gather"] = {"local_rows": padded["row"].to_list(), "padding": padded["is_padding"].to_list(), "gathered": None if gathered is None else gathered["row"].tolist()}
    torch.save(results, Path(out) / f"rank{rank}.pt")  # before the teardown: what was measured is kept whatever happens there
    PG.destroy_process_group()


def _resume_alone(_index: int, out: str) -> None:
    """Resume with M = 1, in a fresh process after the 2-process session has ended: the 2-process
    row_wise checkpoint loads into a 1-process, table_wise DMP (tables and their Adagrad state
    resharded by DCP), which takes one more step. Writes ``out/resume.pt``."""
    _capture_stderr(out, "resume")
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.optim import RowWiseAdagrad

    users, items, history, target = make_batch()
    ctx = PG.init_process_group("cpu")  # no RANK/WORLD_SIZE in this process: the in-process 1-process group
    model = TwoTableModel(seed=5)
    _apply_optimizer_in_backward(RowWiseAdagrad, model.tables.parameters(), {"lr": EMBEDDING_LR, "eps": EPS})
    dmp = SH.shard_model(model, "table_wise", ctx.device, ctx.world_size)
    optimizer = SH.keyed_optimizer(dmp, dense_optimizer=lambda params: torch.optim.SGD(params, lr=DENSE_LR))
    state = CK.load_checkpoint(Path(out) / "ckpt" / "row_wise", dmp, optimizer)
    loaded = _shard_diffs(dmp, reference_training(STEPS)[0].state_dict())
    optimizer.zero_grad()
    ((dmp(to_kjt(users, items, history)) - target) ** 2).mean().backward()
    optimizer.step()
    resumed = {
        "world_size": ctx.world_size,
        "train_state": state,
        "loaded": loaded,
        "next_step": _shard_diffs(dmp, reference_training(STEPS + 1)[0].state_dict()),
    }
    torch.save(resumed, Path(out) / "resume.pt")
    PG.destroy_process_group()


def _capture_stderr(out: str, name: str) -> None:
    """Send this child's stderr (C++ aborts included) and faulthandler's stack dumps to ``out/<name>.stderr``,
    so a child that dies shows why in the fixture's failure instead of only its exit signal."""
    import faulthandler

    log = open(Path(out) / f"{name}.stderr", "w", buffering=1)  # kept open until the process exits
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    faulthandler.enable(file=log, all_threads=True)


def _spawn(fn, nprocs: int, args: tuple, out: Path) -> None:
    """Start ``nprocs`` spawned children and wait; a child that fails fails the test with every child's stderr."""
    try:
        mp.start_processes(fn, args=args, nprocs=nprocs, start_method="spawn", join=True)
        return
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        failure = str(exc)
    logs = "\n".join(f"--- {log.name} (last 4000 characters) ---\n{log.read_text(errors='replace')[-4000:]}" for log in sorted(out.glob("*.stderr")))
    pytest.fail(f"{failure}\n{logs}", pytrace=False)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("distributed")
    _spawn(_session, 2, (2, _free_port(), str(out)), out)
    return out, [torch.load(out / f"rank{k}.pt", weights_only=False) for k in range(2)]


@pytest.fixture(scope="module")
def resumed(session) -> dict:
    out = session[0]
    _spawn(_resume_alone, 1, (str(out),), out)
    return torch.load(out / "resume.pt", weights_only=False)


# -- sharded forward == unsharded forward -------------------------------------------------------
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_sharded_pooled_output_equals_unsharded(session, sharding: str) -> None:
    for rank_results in session[1]:
        diffs = rank_results[sharding]["forward"]
        assert set(diffs) == set(FEATURES)
        assert max(diffs.values()) < 1e-6, diffs


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_plan_uses_the_configured_sharding_type(session, sharding: str) -> None:
    plan = session[1][0][sharding]["plan"]
    assert f"| {sharding}" in plan or f" {sharding} " in plan, plan
    others = [s for s in SHARDINGS if s != sharding]
    assert not any(f" {s} " in plan for s in others), plan


def test_auto_sharding_picks_offered_types_and_keeps_the_forward(session) -> None:
    auto = session[1][0]["auto"]
    assert max(auto["forward"].values()) < 1e-6, auto["forward"]
    rows = [[cell.strip() for cell in line.split("|")] for line in auto["plan"].splitlines() if line.startswith(("user ", "item "))]
    chosen = {row[0]: row[1] for row in rows if row[2] in ("fused", "dense")}  # the param table, not the shard table
    assert set(chosen) == {"user", "item"} and set(chosen.values()) <= set(SHARDINGS), auto["plan"]


def test_column_wise_splits_each_table_across_both_ranks(session) -> None:
    plan = session[1][0]["column_wise"]["plan"]
    assert "[0, 1]" in plan, plan  # each table's column shards live on ranks 0 and 1


# -- 2 processes on half batches == 1 process on the combined batch ------------------------------
def test_retrieval_loss_across_ranks_equals_one_process_loss(session) -> None:
    for rank_results in session[1]:
        assert set(rank_results["retrieval"]) == {"clicked", "all_rows"}
        assert max(rank_results["retrieval"].values()) < 1e-6, rank_results["retrieval"]


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_two_process_step_matches_one_process_on_combined_batch(session, sharding: str) -> None:
    for rank_results in session[1]:
        diffs = rank_results[sharding]["step"]
        assert {"tables.embedding_bags.user.weight", "tables.embedding_bags.item.weight", "head.weight", "head.bias"} <= set(diffs)
        assert max(diffs.values()) < 1e-5, diffs


def test_fused_embedding_bag_collection_row_wise_step_matches_one_process(session) -> None:
    for rank_results in session[1]:
        diffs = rank_results["fused_row_wise"]["step"]
        assert max(diffs.values()) < 1e-5, diffs


def test_fused_embedding_bag_collection_refuses_data_parallel() -> None:
    model = TwoTableModel()
    model.tables = FusedEmbeddingBagCollection(tables=model.tables.embedding_bag_configs(), optimizer_type=torch.optim.SGD, optimizer_kwargs={"lr": 0.1})
    with pytest.raises(RecsysError, match="data_parallel"):
        SH.sharding_constraints(model, "data_parallel", 2)


def test_reference_training_lowers_the_loss_and_updates_only_the_rows_it_looked_up() -> None:
    """The reference every sharded step is compared with is itself a real row-wise Adagrad step."""
    before, (after, momentum) = TwoTableModel(), reference_training(STEPS)
    users, items, history, target = make_batch()
    kjt = to_kjt(users, items, history)
    with torch.no_grad():
        loss_before = float(((before(kjt) - target) ** 2).mean())
        loss_after = float(((after(kjt) - target) ** 2).mean())
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
    item_rows = torch.zeros(12, dtype=torch.bool)
    item_rows[torch.cat([items, history.reshape(-1)])] = True
    old, new = before.state_dict()["tables.embedding_bags.item.weight"], after.state_dict()["tables.embedding_bags.item.weight"]
    assert not item_rows.all(), "the batch must leave some rows untouched for this test to mean anything"
    assert torch.equal(new[~item_rows], old[~item_rows])  # rows outside the batch: not a bit changed
    assert bool(((new[item_rows] - old[item_rows]).abs().amax(dim=1) > 1e-3).all())  # every looked-up row moved
    accumulated = momentum["embedding_bags.item.weight"].squeeze(1)
    assert bool((accumulated[item_rows] > 0).all()) and bool((accumulated[~item_rows] == 0).all())


def test_reference_training_equals_fbgemm_fused_row_wise_adagrad_in_one_process() -> None:
    """The hand-written rule is what fbgemm's fused kernel computes (lr, eps, mean of squared grads per row)."""
    from torchrec.optim import RowWiseAdagrad

    expected, _ = reference_training(STEPS)
    model = TwoTableModel()
    fused = FusedEmbeddingBagCollection(
        tables=model.tables.embedding_bag_configs(), optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": EMBEDDING_LR, "eps": EPS}
    )
    fused.load_state_dict(model.tables.state_dict())
    model.tables = fused
    users, items, history, target = make_batch()
    for _ in range(STEPS):
        model.zero_grad()
        ((model(to_kjt(users, items, history)) - target) ** 2).mean().backward()  # the tables update inside backward
        with torch.no_grad():
            for p in model.head.parameters():
                p -= DENSE_LR * p.grad
    got, want = model.state_dict(), expected.state_dict()
    for key in ("tables.embedding_bags.user.weight", "tables.embedding_bags.item.weight", "head.weight"):
        assert _max_diff(got[key], want[key]) < 1e-5, key


# -- DCP: saved by 2 processes, loaded by 1 -------------------------------------------------------
@pytest.mark.parametrize("sharding", SHARDINGS)
def test_checkpoint_from_two_processes_loads_into_unsharded_model(session, sharding: str) -> None:
    out = session[0]
    expected, _ = reference_training(STEPS, column_shards=2 if sharding == "column_wise" else 1)
    model = TwoTableModel(seed=7)
    state = CK.load_checkpoint(out / "ckpt" / sharding, model)  # no process group in this process
    assert state == {"step": STEPS, "sharding": sharding}
    for key, value in expected.state_dict().items():
        assert _max_diff(model.state_dict()[key], value) < 1e-5, key


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_checkpoint_holds_row_wise_adagrad_state_of_every_table(session, sharding: str) -> None:
    keys = set().union(*(r[sharding]["optimizer_keys"] for r in session[1]))  # table_wise: each rank has its own tables
    assert keys == {"tables.embedding_bags.user.weight", "tables.embedding_bags.item.weight"}, keys  # SGD on the head keeps no state


def test_latest_checkpoint_names_the_complete_one(session) -> None:
    root = session[0] / "ckpt" / "row_wise"
    assert CK.latest_checkpoint(root) == root / f"step-{STEPS}"
    assert CK.latest_checkpoint(session[0] / "nowhere") is None
    with pytest.raises(RecsysError, match="no complete checkpoint"):
        CK.load_checkpoint(session[0] / "nowhere", TwoTableModel())


def test_checkpoint_of_two_processes_resumes_in_one_process_with_optimizer_state(resumed) -> None:
    assert resumed["world_size"] == 1
    assert resumed["train_state"] == {"step": STEPS, "sharding": "row_wise"}
    assert max(resumed["loaded"].values()) < 1e-5, resumed["loaded"]
    # the third step equals three steps in one process only if the Adagrad accumulators were restored
    assert max(resumed["next_step"].values()) < 1e-5, resumed["next_step"]


# -- RecsysModel ----------------------------------------------------------------------------------
def test_recsys_model_table_wise_outputs_equal_unsharded(session) -> None:
    for rank_results in session[1]:
        diffs = {k: v for k, v in rank_results["recsys_model"].items() if k != "plan"}
        assert max(diffs.values()) < 1e-5, diffs
    assert "table_wise" in session[1][0]["recsys_model"]["plan"]


# -- data per rank ------------------------------------------------------------------------------
def test_ranks_get_equal_rows_drop_tail() -> None:
    parts = [DATA.rank_rows(10, r, 4, "drop") for r in range(4)]
    assert [(p.start, p.stop, p.pad) for p in parts] == [(0, 2, 0), (2, 4, 0), (4, 6, 0), (6, 8, 0)]  # rows 8, 9 dropped


def test_ranks_get_equal_rows_pad_tail() -> None:
    parts = [DATA.rank_rows(10, r, 4, "pad") for r in range(4)]
    assert [(p.start, p.stop, p.pad) for p in parts] == [(0, 3, 0), (3, 6, 0), (6, 9, 0), (9, 10, 2)]
    assert {p.length for p in parts} == {3}


def test_padded_parts_gather_back_in_file_order(session) -> None:
    rank0, rank1 = (r["gather"] for r in session[1])
    assert rank0["local_rows"] == [0, 1, 2, 3, 4] and rank0["padding"] == [False] * 5
    assert rank1["local_rows"] == [5, 6, 7, 8, 9] and rank1["padding"] == [False] * 5
    assert rank0["gathered"] == [10 * i for i in range(10)]
    assert rank1["gathered"] is None


def test_read_rank_part_pads_with_the_last_row(tmp_path: Path) -> None:
    import polars as pl

    pl.DataFrame({"row": list(range(5))}).write_parquet(tmp_path / "rows.parquet")
    parts = [DATA.read_rank_part(tmp_path / "rows.parquet", r, 3, tail="pad") for r in range(3)]
    assert [p["row"].to_list() for p in parts] == [[0, 1], [2, 3], [4, 4]]
    assert parts[2]["is_padding"].to_list() == [False, True]
    assert [len(DATA.read_rank_part(tmp_path / "rows.parquet", r, 3, tail="drop")) for r in range(3)] == [1, 1, 1]


# -- launch: a failing rank is named ---------------------------------------------------------------
FAILING_WORKER = '''
import os, time
def work(run, **flags):
    if os.environ["RANK"] == "1":
        raise ValueError("bad batch in shard 1")
    time.sleep(30)  # rank 0 would wait in a collective; torchrun stops it
'''


def test_launch_names_the_failed_rank_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "failing_worker.py").write_text(FAILING_WORKER)
    run = tmp_path / "run"
    (run / "model" / "checkpoint" / "epoch-1").mkdir(parents=True)
    (run / "model" / "checkpoint" / "epoch-1" / ".metadata").write_bytes(b"")
    (run / "model" / "checkpoint" / "latest").write_text("epoch-1\n")
    with pytest.raises(RecsysError) as excinfo:
        LA.launch(run, 2, [], target="failing_worker:work", env={"PYTHONPATH": str(tmp_path / "pkg")})
    message = str(excinfo.value)
    assert "rank 1 of 2" in message and "ValueError: bad batch in shard 1" in message
    assert "epoch-1" in message and "is kept" in message
    assert json.loads((run / "model" / "rank1.error").read_text())["rank"] == 1
    assert (run / "model" / "checkpoint" / "epoch-1" / ".metadata").is_file()
