"""Warm start of a model from an earlier run's (``train.init_from``, set by ``recsys update``).

The earlier run's vocabularies are a prefix of this one's (``features.update`` grows them
append-only), so every embedding table of the new model holds the old table in its first rows:
those rows, and their row-wise Adagrad state from the earlier run's last checkpoint, are copied
bit-identical; rows of new ids keep the initialisation training gives every row. Dense weights
(towers, MMoE, heads) are copied whole; the dense optimizer (Adam) starts afresh. The buffers of
side-feature values come from this run's data, and an item has a trained id row when it had one
in the earlier run or has training rows in this one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from recsys.errors import RunError
from recsys.rundir import RunDir

log = logging.getLogger("recsys.training")

TABLES = "embedding_tables."  # state-dict prefix of the TorchRec tables (plain and fused EBC alike)
FEATURE_TABLES = (".cat_values", ".num_values")  # buffers: the side features of every user / item, rows by index
TRAINED_MASK = ".trained"  # buffer: which items have a trained id row


def _grown(name: str, old: torch.Tensor, new: torch.Tensor, where: Path) -> torch.Tensor:
    """``new`` with ``old`` in its leading rows (same shape: ``old`` itself)."""
    if old.shape == new.shape:
        return old.to(new.dtype).clone()
    if old.dim() == new.dim() and old.shape[1:] == new.shape[1:] and old.shape[0] <= new.shape[0]:
        grown = new.detach().clone()
        grown[: old.shape[0]] = old.to(new.dtype)
        return grown
    raise RunError(f"{where}: {name} has shape {tuple(old.shape)}, this model's has {tuple(new.shape)}: the model's config differs from the earlier run's (an update keeps it; only tables may grow)")


def warm_start(model: torch.nn.Module, base: RunDir) -> dict[str, Any]:
    """Load ``base``'s weights (and table optimizer state) into ``model`` (fused tables), growing tables; returns a summary."""
    weights_path = base.require(base.model / "model.safetensors", "train")
    old = load_file(str(weights_path))
    current = model.state_dict()
    extra = sorted(set(old) - set(current))
    if extra:
        raise RunError(f"{weights_path}: parameters {extra[:5]} are not in this model: its config differs from the earlier run's")
    state, grown_rows, fresh = {}, {}, []
    for name, value in current.items():
        if name not in old:
            state[name] = value
            fresh.append(name)
            continue
        if name.endswith(FEATURE_TABLES) or name == "item_prior":  # this run's feature values per user / item (BASE's rows carried by features.update); the prior is chosen again after training
            state[name] = value
            continue
        if name.endswith(TRAINED_MASK):  # items with a trained id row: BASE's, and those this run trains
            state[name] = value | _grown(name, old[name], torch.zeros_like(value), weights_path)
            continue
        if not name.startswith(TABLES) and old[name].shape != value.shape:
            raise RunError(f"{weights_path}: {name} has shape {tuple(old[name].shape)}, this model's has {tuple(value.shape)}: only embedding tables may grow in an update")
        state[name] = _grown(name, old[name], value, weights_path)
        if old[name].shape != value.shape:
            grown_rows[name.removeprefix(TABLES)] = [int(old[name].shape[0]), int(value.shape[0])]
    model.load_state_dict(state, strict=True)
    optimizer_rows = _warm_table_optimizer(model, base)
    summary = {"from": str(base.root), "tables_grown": grown_rows, "new_parameters": fresh, "optimizer_state_rows": optimizer_rows}
    log.info("warm start from %s: %d tables grown, %d new parameters, table optimizer state %s", base.root, len(grown_rows), len(fresh), "copied" if optimizer_rows else "fresh (no checkpoint)")
    return summary


def _warm_table_optimizer(model: torch.nn.Module, base: RunDir) -> dict[str, int]:
    """Row-wise Adagrad state of the earlier run's last checkpoint, grown like the tables ({} without one)."""
    ckpt = base.model / "checkpoint"
    state_path = ckpt / "state.json"
    if not state_path.is_file():
        return {}
    tensors_path = ckpt / json.loads(state_path.read_text())["tensors"]
    if not tensors_path.is_file():
        return {}
    saved = {k.removeprefix("fused/"): v for k, v in load_file(str(tensors_path)).items() if k.startswith("fused/")}
    optimizer = model.embedding_tables.fused_optimizer()
    current = optimizer.state_dict()["state"]
    state: dict[str, dict[str, torch.Tensor]] = {}
    rows: dict[str, int] = {}
    for param_key, param_state in current.items():
        state[param_key] = {}
        for name, value in param_state.items():
            old = saved.get(f"{param_key}/{name}")
            state[param_key][name] = _grown(f"{param_key}/{name}", old, value, tensors_path) if old is not None else value
            if old is not None:
                rows[f"{param_key}/{name}"] = int(old.shape[0]) if old.dim() else 1
    optimizer.load_state_dict({"state": state})
    return rows
