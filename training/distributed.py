"""Distributed training building blocks: torchrun launch, process group, TorchRec sharding, data per rank,
gathers and torch.distributed.checkpoint (DCP) checkpoints.

The training loop (``training/train.py``) composes these; nothing here knows about the loop.

- ``launch(run_dir, nproc, extra_args)`` starts N workers through torchrun on this machine
  (``python -m torch.distributed.run --standalone ... -m training.distributed --run-dir RUN``);
  a failed worker becomes a ``RecsysError`` naming its rank.
- ``init_process_group()`` -> ``DistContext`` (gloo on CPU, nccl on CUDA; a 1-process group
  outside torchrun so the same code path runs with N = 1).
- ``shard_model(model, sharding, device, world_size)`` -> TorchRec ``DistributedModelParallel``
  planned by ``EmbeddingShardingPlanner`` (plan in ``dmp.plan``); dense parts are DDP-wrapped by DMP.
- ``rank_rows`` / ``read_rank_part`` / ``gather_to_rank0``: each rank's part of a parquet file
  with an equal number of rows per rank (training drops the tail, evaluation pads it).
- ``save_checkpoint`` / ``load_checkpoint``: DCP with ShardedTensors, so a checkpoint written by
  N processes loads into M (M = 1 included, also into an unsharded model without a process group).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fused_embeddingbag import FusedEmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys.errors import RecsysError
from recsys.rundir import atomic_write_text

log = logging.getLogger("recsys.distributed")

Sharding = Literal["auto", "data_parallel", "table_wise", "column_wise", "row_wise"]
# The sharding types recsys offers (TrainConfig.sharding); "auto" lets the planner pick among them.
OFFERED_SHARDING = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
)
DEFAULT_WORKER_TARGET = "training.train:train"


# -- launch (parent process) ---------------------------------------------------------------
def in_torchrun() -> bool:
    """True inside a worker started by torchrun (it sets these variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def launch(
    run_dir: Path,
    nproc: int,
    extra_args: list[str],
    *,
    target: str = DEFAULT_WORKER_TARGET,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``target(RunDir(run_dir), **flags)`` in ``nproc`` processes through torchrun on this machine.

    Output is streamed as it comes. On a non-zero exit raises ``RecsysError`` naming the failed
    rank (from ``RUN/model/rank<k>.error``, or torchrun's "Root Cause" summary when the worker
    died without writing one) and the last good checkpoint, which is left untouched.
    """
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in model_dir.glob("rank*.error"):
        stale.unlink()
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
        "-m", "training.distributed", "--run-dir", str(run_dir), "--target", target, *extra_args,
    ]  # fmt: skip
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    repo_root = str(Path(__file__).resolve().parents[1])  # workers import training.* from this checkout
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, child_env.get("PYTHONPATH", "")) if p)
    log.info("launching %d workers: %s", nproc, " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=400)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=child_env) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stderr.write(line)
                tail.append(line)
        except KeyboardInterrupt:
            proc.terminate()  # torchrun forwards it to its workers
            proc.wait()
            raise
        returncode = proc.wait()
    if returncode != 0:
        raise RecsysError(_failure_message(run_dir, nproc, returncode, "".join(tail)))


def _failure_message(run_dir: Path, nproc: int, returncode: int, output_tail: str) -> str:
    model_dir = run_dir / "model"
    errors = sorted(model_dir.glob("rank*.error"), key=lambda p: p.stat().st_mtime)
    if errors:  # the first to fail is the cause; the others usually died of its broken collectives
        first = errors[0]
        rank = int(re.fullmatch(r"rank(\d+)\.error", first.name).group(1))  # type: ignore[union-attr]
        record = json.loads(first.read_text())
        cause = f"{record['type']}: {record['message']}"
        detail = f"traceback in {first}"
    else:
        match = re.search(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", output_tail, re.S)
        if match:
            rank, exitcode = int(match.group(1)), int(match.group(2))
            cause = f"exit code {exitcode}" + (f" (killed by signal {-exitcode}, e.g. out of memory)" if exitcode < 0 else "")
        else:
            rank, cause = -1, f"torchrun exited with code {returncode}"
        detail = "see the output above"
    where = f"rank {rank} of {nproc}" if rank >= 0 else f"one of {nproc} ranks (unknown which)"
    checkpoint = latest_checkpoint(model_dir / "checkpoint")
    kept = f"the last good checkpoint {checkpoint} is kept; resume with `recsys train --run {run_dir} --nproc {nproc} --resume`" if checkpoint else "no checkpoint had been written yet"
    return f"distributed training failed on {where}: {cause} ({detail}); {kept}"


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry of each torchrun worker: call the target, record a failure in ``RUN/model/rank<k>.error``."""
    parser = argparse.ArgumentParser(prog="python -m training.distributed")
    parser.add_argument("--run-dir", required=True, help="the run directory (not --run: torchrun would take it for its --run-path)")
    parser.add_argument("--target", default=DEFAULT_WORKER_TARGET, help="module:function called as f(RunDir, **flags)")
    parser.add_argument("--resume", action="store_true")
    args, rest = parser.parse_known_args(argv)
    from recsys.rundir import RunDir

    rank = int(os.environ.get("RANK", "0"))
    # force: torchrec's import-time warnings may already have given the root logger a handler.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("recsys").setLevel(logging.INFO)
    # The planner warns about its own defaults (topology construction, storage heuristics) on every run.
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")  # rank 0's plain export
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    module_name, func_name = args.target.split(":")
    kwargs: dict[str, Any] = {"resume": True} if args.resume else {}
    for flag in rest:  # further flags as --key=value
        key, _, value = flag.lstrip("-").partition("=")
        kwargs[key.replace("-", "_")] = value
    try:
        getattr(importlib.import_module(module_name), func_name)(RunDir(args.run_dir), **kwargs)
    except BaseException as exc:
        record = {"rank": rank, "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(), "time_unix_s": time.time()}
        atomic_write_text(Path(args.run_dir) / "model" / f"rank{rank}.error", json.dumps(record, indent=2) + "\n")
        raise
    return 0


# -- process group --------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(device: str | torch.device | None = None) -> DistContext:
    """Join (or create) the default process group: nccl on CUDA, gloo on CPU.

    Inside torchrun the rank/world come from its environment; outside it a 1-process gloo group on
    an in-memory store is created, so sharding and DCP run the same code with N = 1.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    world_size = dist.get_world_size()
    return DistContext(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
        device=device,
        backend=dist.get_backend(),
    )


def destroy_process_group() -> None:
    """Leave the group at the end of a job: a barrier first, so no rank closes its connections while
    another still receives (gloo aborts the process when a peer vanishes mid-transfer)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


# -- sharding -------------------------------------------------------------------------------
def _offered(types: Iterable[str], compute_device_type: str) -> list[str]:
    """Keep recsys' four sharding types; add row_wise on CPU, where TorchRec's sharders leave it out."""
    offered = [t for t in types if t in OFFERED_SHARDING]
    if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in offered:
        offered.append(ShardingType.ROW_WISE.value)  # block_bucketize + gloo all-to-all work on CPU (tested)
    return offered


class RecsysEBCSharder(EmbeddingBagCollectionSharder):
    """EmbeddingBagCollection sharder offering data_parallel, table_wise, column_wise and row_wise, also on CPU."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return _offered(super().sharding_types(compute_device_type), compute_device_type)


class RecsysFusedEBCSharder(FusedEmbeddingBagCollectionSharder):
    """The same offer for ``FusedEmbeddingBagCollection``, less data_parallel.

    TorchRec 1.8 wraps a data-parallel fused EBC in a DDP with ``device_ids=[cpu]``, which DDP
    rejects on CPU, and never checkpoints that DDP's optimizer state (a TODO in its source).
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = _offered(super().sharding_types(compute_device_type), compute_device_type)
        return [t for t in types if t != ShardingType.DATA_PARALLEL.value]


def sharders() -> list[ModuleSharder[nn.Module]]:
    return [RecsysEBCSharder(), RecsysFusedEBCSharder()]  # type: ignore[list-item]


def _embedding_tables(model: nn.Module) -> list[tuple[str, int, int]]:
    """(table name, rows, dim) of every TorchRec table in the model."""
    tables = []
    for module in model.modules():
        configs = getattr(module, "embedding_bag_configs", None)
        if callable(configs):
            tables += [(c.name, c.num_embeddings, c.embedding_dim) for c in configs()]
    return tables


def _column_block(dim: int, world_size: int) -> int:
    """Smallest column-shard width (a multiple of 4 dividing ``dim``) giving at most ``world_size`` shards."""
    for width in range(4, dim + 1, 4):
        if dim % width == 0 and dim // width <= world_size:
            return width
    return dim


def sharding_constraints(model: nn.Module, sharding: Sharding, world_size: int) -> dict[str, ParameterConstraints]:
    """Planner constraints per table: the configured sharding type (or any offered one for "auto")."""
    if sharding == "data_parallel" and any(isinstance(m, FusedEmbeddingBagCollection) for m in model.modules()):
        raise RecsysError(
            "train.sharding = 'data_parallel' does not work with FusedEmbeddingBagCollection in TorchRec 1.8; keep the "
            "plain EmbeddingBagCollection and apply_optimizer_in_backward(RowWiseAdagrad, ...) instead, or pick another sharding"
        )
    constraints = {}
    for name, _rows, dim in _embedding_tables(model):
        if sharding == "auto":
            constraints[name] = ParameterConstraints(sharding_types=list(OFFERED_SHARDING), min_partition=_column_block(dim, world_size))
            continue
        if sharding not in OFFERED_SHARDING:
            raise RecsysError(f"train.sharding = {sharding!r}: expected auto or one of {', '.join(OFFERED_SHARDING)}")
        kernel = EmbeddingComputeKernel.DENSE.value if sharding == "data_parallel" else EmbeddingComputeKernel.FUSED.value
        constraints[name] = ParameterConstraints(
            sharding_types=[sharding],
            compute_kernels=[kernel],
            # the planner's default minimum column shard is 128 wide: small tables would never split
            min_partition=_column_block(dim, world_size) if sharding == "column_wise" else None,
        )
    return constraints


def machine_topology(world_size: int, device: torch.device, local_world_size: int | None = None) -> Topology:
    """The planner's view of this machine: per-rank memory of the compute device."""
    local_world_size = local_world_size or world_size
    if device.type == "cuda":
        hbm = torch.cuda.get_device_properties(device).total_memory
        return Topology(world_size=world_size, compute_device="cuda", hbm_cap=hbm, local_world_size=local_world_size)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Topology(world_size=world_size, compute_device="cpu", ddr_cap=ram // local_world_size, local_world_size=local_world_size)


def shard_model(
    model: nn.Module,
    sharding: Sharding,
    device: torch.device,
    world_size: int,
    *,
    batch_size: int | None = None,
    local_world_size: int | None = None,
    find_unused_parameters: bool = False,
) -> DistributedModelParallel:
    """Plan with TorchRec's ``EmbeddingShardingPlanner`` and wrap in ``DistributedModelParallel``.

    Every TorchRec table gets ``sharding`` ("auto": the planner's choice among the four offered);
    the dense rest is wrapped in DDP by DMP. Apply ``apply_optimizer_in_backward`` to the tables
    *before* calling this: the sharder builds the fused kernels from it. The plan is logged on
    rank 0 and kept in ``dmp.plan`` (``str(dmp.plan)`` for ``RUN/model/sharding_plan.txt``).
    Pooled outputs of a sharded EBC must be read by key (``kt["feature"]``): sharding reorders them.
    """
    device = torch.device(device)
    if not dist.is_initialized():
        raise RecsysError("shard_model needs a process group: call training.distributed.init_process_group() first")
    if dist.get_world_size() != world_size:
        raise RecsysError(f"shard_model: world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    if not _embedding_tables(model):
        raise RecsysError(f"shard_model: {type(model).__name__} has no TorchRec EmbeddingBagCollection to shard")
    planner = EmbeddingShardingPlanner(
        topology=machine_topology(world_size, device, local_world_size),
        batch_size=batch_size,
        constraints=sharding_constraints(model, sharding, world_size),
        debug=False,
    )
    offered = sharders()
    plan: ShardingPlan = planner.collective_plan(model, offered, dist.GroupMember.WORLD)
    if dist.get_rank() == 0:
        log.info("sharding plan (train.sharding = %s, %d ranks):\n%s", sharding, world_size, plan)
    return DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=device,
        plan=plan,
        sharders=offered,
        data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=not find_unused_parameters, find_unused_parameters=find_unused_parameters),
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DMP/DDP (its sharded tables stay sharded): for calling other methods than forward."""
    return get_unwrapped_module(model)


def data_parallel_table_parameters(model: nn.Module) -> list[str]:
    """Names of the table weights the plan replicates (data_parallel): they get dense gradients, no fused optimizer."""
    plan: ShardingPlan | None = getattr(model, "plan", None)
    if plan is None:
        return []
    return [
        f"{module_path}.embedding_bags.{table}.weight" if module_path else f"embedding_bags.{table}.weight"
        for module_path, module_plan in plan.plan.items()
        for table, parameter_sharding in module_plan.items()  # type: ignore[attr-defined]
        if parameter_sharding.sharding_type == ShardingType.DATA_PARALLEL.value
    ]


def keyed_optimizer(
    model: nn.Module,
    dense_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    table_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
) -> CombinedOptimizer:
    """All optimizers of a (sharded) model as one ``KeyedOptimizer``, keyed by parameter name (what DCP saves).

    - tables sharded table/column/row-wise: DMP's fused optimizer (from ``apply_optimizer_in_backward``);
    - tables the plan made data_parallel: DMP drops their in-backward optimizer and gives them dense,
      all-reduced gradients, so they need ``table_optimizer``, e.g.
      ``lambda ps: torchrec.optim.RowWiseAdagrad(ps, lr=0.05)`` (the same rule, unfused);
    - everything else: ``dense_optimizer``, e.g. ``lambda ps: torch.optim.Adam(ps, lr=1e-3)``.
    """
    named = dict(in_backward_optimizer_filter(model.named_parameters()))
    replicated_tables = {name: named.pop(name) for name in data_parallel_table_parameters(model) if name in named}
    optims: list[KeyedOptimizer] = []
    if isinstance(model, DistributedModelParallel):
        optims.append(model.fused_optimizer)
    if replicated_tables:
        if table_optimizer is None:
            raise RecsysError(
                f"tables {', '.join(replicated_tables)} are data_parallel in the sharding plan: pass table_optimizer "
                "(e.g. lambda ps: torchrec.optim.RowWiseAdagrad(ps, lr=cfg.train.embedding_lr)) to keyed_optimizer"
            )
        optims.append(KeyedOptimizerWrapper(replicated_tables, table_optimizer))
    if named:
        optims.append(KeyedOptimizerWrapper(named, dense_optimizer))
    return CombinedOptimizer(optims)


def load_unsharded_state(model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors, e.g. from ``model.safetensors``, into a DMP's shards in place."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        for key, target in model.state_dict().items():
            if key not in full_state:
                raise RecsysError(f"load_unsharded_state: {key!r} is missing from the given state dict")
            source = full_state[key]
            if isinstance(target, ShardedTensor):
                for shard in target.local_shards():
                    region = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                    shard.tensor.copy_(source[region])
            else:
                target.copy_(source)


# -- data per rank --------------------------------------------------------------------------
TailPolicy = Literal["drop", "pad"]


@dataclass(frozen=True)
class RankRows:
    """Rows ``[start, stop)`` of a file read by one rank, plus ``pad`` copies of row ``n_rows - 1``."""

    start: int
    stop: int
    pad: int
    n_rows: int  # rows in the file

    @property
    def length(self) -> int:
        return self.stop - self.start + self.pad


def rank_rows(n_rows: int, rank: int, world_size: int, tail: TailPolicy = "drop") -> RankRows:
    """Contiguous, equal-sized row range of ``rank`` so every rank runs the same number of batches.

    ``drop`` (training): each rank gets ``n_rows // world_size`` rows; the last ``n_rows % world_size``
    rows of the file are skipped (at most world_size - 1). ``pad`` (evaluation): each rank gets
    ``ceil(n_rows / world_size)`` rows; the last rank(s) repeat the file's last row, and
    ``gather_to_rank0`` cuts the repeats off again, so every row is predicted exactly once.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    if tail == "drop":
        per_rank = n_rows // world_size
        return RankRows(rank * per_rank, (rank + 1) * per_rank, 0, n_rows)
    if tail == "pad":
        per_rank = -(-n_rows // world_size)
        start, stop = min(rank * per_rank, n_rows), min((rank + 1) * per_rank, n_rows)
        return RankRows(start, stop, per_rank - (stop - start), n_rows)
    raise ValueError(f"tail must be 'drop' or 'pad', got {tail!r}")


def read_rank_part(
    path: str | Path,
    rank: int,
    world_size: int,
    tail: TailPolicy = "drop",
    columns: list[str] | None = None,
    *,
    interleave: bool = False,
):
    """This rank's part of a parquet file (a polars DataFrame; only its row range is read).

    With ``tail="pad"`` a boolean column ``is_padding`` marks the repeated rows. With
    ``interleave=True`` (``tail="drop"`` only) rank r takes rows r, r + N, r + 2N, ... instead of a
    contiguous range, so every rank sees the whole span of a file ordered by time (the file is
    scanned, not sliced: fine on one machine; past it, write the file in N shuffled parts).
    """
    import polars as pl

    lazy = pl.scan_parquet(path)
    if columns is not None:
        lazy = lazy.select(columns)
    n_rows = pl.scan_parquet(path).select(pl.len()).collect().item()
    part = rank_rows(n_rows, rank, world_size, tail)
    if interleave:
        if tail != "drop":
            raise ValueError("interleave=True needs tail='drop' (gather_to_rank0 restores file order only for contiguous parts)")
        return lazy.gather_every(world_size, offset=rank).head(part.stop - part.start).collect()
    frame = lazy.slice(part.start, part.stop - part.start).collect()
    if tail == "pad":
        frame = frame.with_columns(is_padding=pl.lit(False))
        if part.pad:
            last = lazy.slice(n_rows - 1, 1).collect().with_columns(is_padding=pl.lit(True))
            frame = pl.concat([frame, *([last] * part.pad)])
    return frame


def gather_to_rank0(arrays: dict[str, np.ndarray], n_rows: int | None = None) -> dict[str, np.ndarray] | None:
    """Concatenate every rank's arrays in rank order on rank 0 (``None`` elsewhere).

    With ``n_rows`` (the file's row count under ``tail="pad"``) the padding repeats at the end
    are cut off, so row i of the result is row i of the file.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: np.asarray(v)[:n_rows] for k, v in arrays.items()}
    rank = dist.get_rank()
    received: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object({k: np.asarray(v) for k, v in arrays.items()}, received, dst=0)
    if received is None:
        return None
    return {k: np.concatenate([part[k] for part in received])[:n_rows] for k in arrays}


# -- checkpoints (torch.distributed.checkpoint) -----------------------------------------------
def latest_checkpoint(checkpoint_root: str | Path) -> Path | None:
    """The last complete checkpoint under ``RUN/model/checkpoint`` (named by its ``latest`` file)."""
    pointer = Path(checkpoint_root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(checkpoint_root) / pointer.read_text().strip()
    return path if (path / ".metadata").is_file() else None


def save_checkpoint(
    checkpoint_root: str | Path,
    tag: str,
    model: nn.Module,
    optimizer: KeyedOptimizer | None = None,
    train_state: dict[str, Any] | None = None,
    keep: int = 2,
    extra: dict[str, nn.Module] | None = None,
) -> Path:
    """Collective: every rank writes its shards to ``checkpoint_root/tag`` with ``dcp.save``.

    Once all ranks are done, rank 0 writes ``train_state.json`` (epoch, step, ...) into it and only
    then points ``checkpoint_root/latest`` at it, so a crash mid-save leaves the previous one in use;
    older checkpoints beyond ``keep`` are removed. ``extra`` modules (replicated, e.g. learned loss
    weights) are saved under their names next to the model.
    """
    root = Path(checkpoint_root)
    path = root / tag
    state: dict[str, Any] = {"model": model.state_dict()}
    state.update({name: module.state_dict() for name, module in (extra or {}).items()})
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    dcp.save(state, checkpoint_id=path)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        atomic_write_text(path / "train_state.json", json.dumps(train_state or {}, indent=2) + "\n")
        atomic_write_text(root / "latest", tag + "\n")
        finished = sorted((p for p in root.iterdir() if p.is_dir() and (p / ".metadata").is_file()), key=lambda p: p.stat().st_mtime)
        for old in finished[:-keep] if keep > 0 else []:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def _missing_from_checkpoint(path: Path, state: dict[str, Any]) -> list[str]:
    """Flattened keys of ``state`` (as DCP names them) that the checkpoint at ``path`` does not hold."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    flat, _ = flatten_state_dict(state)
    return sorted(key for key in flat if key not in saved)


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: KeyedOptimizer | None = None,
    extra: dict[str, nn.Module] | None = None,
    *,
    collective: bool = True,
) -> dict[str, Any]:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``, ``extra``) in place; returns its ``train_state``.

    ``path`` is one checkpoint directory or ``RUN/model/checkpoint`` (then its ``latest``). Works
    for any sharding and number of processes, and for an unsharded model with no process group
    (weights only; resuming with the optimizer needs the DMP path, also with 1 process).
    ``collective=False`` lets one rank of a group read the checkpoint alone into an unsharded
    model (rank 0 exporting ``model.safetensors``).
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise RecsysError(f"{path}: no complete checkpoint (no .metadata, no 'latest'); train without --resume")
        path = latest
    state: dict[str, Any] = {"model": model.state_dict()}
    state.update({name: module.state_dict() for name, module in (extra or {}).items()})
    if optimizer is not None:
        optimizer.init_state()  # state tensors must exist before DCP can fill them
        state["optimizer"] = optimizer.state_dict()
    missing = _missing_from_checkpoint(path, state)
    if any(not key.startswith("optimizer.") for key in missing):
        raise RecsysError(f"{path}: the checkpoint lacks {', '.join(k for k in missing if not k.startswith('optimizer.'))}; it was written for another model")
    if missing:  # e.g. a table data_parallel when saved (unfused Adagrad "sum") and sharded now (fused "momentum1")
        log.warning("%s: no saved optimizer state for %s (the sharding type of its table changed); it starts afresh", path, ", ".join(missing))
    dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True), no_dist=not collective)
    model.load_state_dict(state["model"])
    for name, module in (extra or {}).items():
        module.load_state_dict(state[name])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    train_state = path / "train_state.json"
    return json.loads(train_state.read_text()) if train_state.is_file() else {}


if __name__ == "__main__":
    raise SystemExit(worker_main())
