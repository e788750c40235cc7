"""Checkpoints of the N-process job with torch.distributed.checkpoint (DCP).

ShardedTensors are saved per rank, so a checkpoint written by N processes loads into M (M = 1
included, also into an unsharded model without a process group). ``RUN/model/checkpoint/latest``
names the last complete one; it is written only after every rank has finished.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import KeyedOptimizer

from recsys.errors import RecsysError
from recsys.rundir import atomic_write_text

log = logging.getLogger("recsys.distributed")


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
