"""TorchRec sharding of the model: sharders, planner constraints, DMP wrapping, optimizers.

``shard_model(model, sharding, device, world_size)`` -> ``DistributedModelParallel`` planned by
``EmbeddingShardingPlanner`` (plan in ``dmp.plan``); dense parts are DDP-wrapped by DMP.
``keyed_optimizer`` gathers the fused, replicated-table and dense optimizers into one
``KeyedOptimizer`` (what DCP checkpoints); ``load_unsharded_state`` copies full tensors into shards.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Literal

import torch
import torch.distributed as dist
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

log = logging.getLogger("recsys.distributed")

Sharding = Literal["auto", "data_parallel", "table_wise", "column_wise", "row_wise"]
# The sharding types recsys offers (TrainConfig.sharding); "auto" lets the planner pick among them.
OFFERED_SHARDING = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.ROW_WISE.value,
)


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
        raise RecsysError("shard_model needs a process group: call training.distributed.process_group.init_process_group() first")
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
