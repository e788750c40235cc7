"""The recommender: TorchRec tables -> user and item towers -> multi-task ranker.

Public surface (docs/architecture.md): ``user_vectors``, ``item_vectors``, ``rank``; ``forward(batch)``
for training; ``save_model`` / ``load_model`` for ``RUN/model/``.

All tables live in one plain ``EmbeddingBagCollection`` (``embedding_tables``) so the training job
can swap in the fused-optimizer kernels and a later job can shard it with TorchRec DMP. Every
table pools MEAN (for one-id features MEAN == SUM; one pooling mode keeps the fused kernels in a
single group). Index 0 means padding or unknown everywhere and is dropped from the KJT, so it
contributes a zero vector.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from recsys.config import ModelConfig, section_dict
from recsys.errors import ConfigError, RunError
from recsys.mmoe import MultiTaskRanker
from recsys.rundir import atomic_path, write_json
from recsys.towers import ItemTower, UserTower

MODEL_VERSION = 2  # 2: per-id feature buffers live in the towers (user_tower.cat_values, item_tower.trained, ...)
TASK_ORDER = ("click", "conversion", "rating")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the module (written to ``model.json``)."""

    n_users: int  # U + 1 (row 0 = unknown)
    n_items: int  # I + 1 (row 0 = padding / unknown)
    history_len: int
    text_dim: int = 0  # 0: no text modality
    image_dim: int = 0
    tasks: tuple[str, ...] = ("click",)  # heads that are built
    rating_range: tuple[float, float] = (1.0, 5.0)
    user_features: dict[str, int | None] = field(default_factory=dict)  # {"cat_x": cardinality+1, "num_y": None}
    item_features: dict[str, int | None] = field(default_factory=dict)
    config: ModelConfig = field(default_factory=ModelConfig)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tasks": list(self.tasks), "rating_range": list(self.rating_range), "config": _config_json(self.config)}

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> "ModelSpec":
        config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        names = cls.__dataclass_fields__.keys() - {"config", "tasks", "rating_range"}
        return cls(**{k: meta[k] for k in names if k in meta}, tasks=tuple(meta["tasks"]), rating_range=tuple(meta["rating_range"]), config=config)


def _config_json(config: ModelConfig) -> dict[str, Any]:
    return section_dict(config)


def active_tasks(data_tasks: dict[str, bool], wanted: tuple[str, ...]) -> tuple[str, ...]:
    """Heads to build: wanted by the config and with labels in the data (click first)."""
    tasks = tuple(t for t in TASK_ORDER if t in wanted and data_tasks.get(t, False))
    if "click" not in tasks:
        raise ConfigError("the click head is required (model.tasks must include 'click' and the data must have click labels)")
    return tasks


def padded_to_kjt(features: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    """``{key: (B, L) int64 padded with 0}`` -> KJT of the non-zero ids (0 contributes nothing)."""
    values, lengths = [], []
    for ids in features.values():
        present = ids != 0
        values.append(ids[present])  # row-major, so each row's ids stay together and in order
        lengths.append(present.sum(dim=1))
    return KeyedJaggedTensor(keys=list(features), values=torch.cat(values), lengths=torch.cat(lengths).to(torch.int64))


def _feature_names(features: dict[str, int | None], prefix: str) -> tuple[list[str], list[str]]:
    cats = sorted(k for k, card in features.items() if k.startswith("cat_") and card)
    nums = sorted(k for k in features if k.startswith("num_"))
    return [f"{prefix}_{k}" for k in cats], nums


class RecsysModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        cfg = spec.config
        self.tasks = tuple(spec.tasks)
        emb = cfg.embedding_dim
        self.user_cat_keys, user_nums = _feature_names(spec.user_features, "user")
        self.item_cat_keys, item_nums = _feature_names(spec.item_features, "item")

        tables = [
            EmbeddingBagConfig(name="user", num_embeddings=spec.n_users, embedding_dim=emb, feature_names=["user_id"], pooling=PoolingType.MEAN),
            EmbeddingBagConfig(name="item", num_embeddings=spec.n_items, embedding_dim=emb, feature_names=["item_id", "history"], pooling=PoolingType.MEAN),
        ]
        cardinalities = {f"user_{k}": v for k, v in spec.user_features.items()} | {f"item_{k}": v for k, v in spec.item_features.items()}
        for key in self.user_cat_keys + self.item_cat_keys:  # one table per categorical feature
            tables.append(EmbeddingBagConfig(name=key, num_embeddings=cardinalities[key], embedding_dim=emb, feature_names=[key], pooling=PoolingType.MEAN))
        self.embedding_tables = EmbeddingBagCollection(tables=tables)

        self.use_text = cfg.use_text and spec.text_dim > 0
        self.use_image = cfg.use_image and spec.image_dim > 0
        self.user_tower = UserTower(spec.n_users, self.user_cat_keys, len(user_nums), emb, cfg.dim)
        self.item_tower = ItemTower(
            spec.n_items,
            self.item_cat_keys,
            len(item_nums),
            emb,
            spec.text_dim if self.use_text else 0,
            spec.image_dim if self.use_image else 0,
            cfg.dim,
            fusion=cfg.fusion,
            modality_dropout=cfg.modality_dropout,
            id_dropout=cfg.id_dropout,
        )
        self.user_num_names, self.item_num_names = user_nums, item_nums
        self.ranker = MultiTaskRanker(3 * cfg.dim, list(self.tasks), cfg.ranker, cfg.experts, cfg.expert_dim, cfg.tower_dim)
        lo, hi = spec.rating_range
        self.rating_lo, self.rating_span = float(lo), float(hi - lo)

    # -- embedding lookups -------------------------------------------------------------
    def _pooled(self, user_idx: torch.Tensor | None, history: torch.Tensor | None, item_idx: torch.Tensor | None):
        """One KJT over every feature (absent parts empty) -> one call into the tables."""
        batch = next(x for x in (user_idx, item_idx) if x is not None).shape[0]
        empty = torch.zeros(batch, 1, dtype=torch.int64)
        users = self.user_tower.known(user_idx) if user_idx is not None else None
        items = self.item_tower.known(item_idx) if item_idx is not None else None
        user = self.user_tower.lookup(users) if users is not None else {k: empty for k in ["user_id", *self.user_cat_keys]}
        item = self.item_tower.lookup(items) if items is not None else {k: empty for k in ["item_id", *self.item_cat_keys]}
        history = self.item_tower.trained_ids(history) if history is not None else empty
        features = {"user_id": user.pop("user_id"), "history": history, "item_id": item.pop("item_id"), **user, **item}  # the tables' key order
        return self.embedding_tables(padded_to_kjt(features)), users, items

    def set_trained_items(self, item_idx: torch.Tensor) -> None:
        """Mark which items have training interactions (``ItemTower``: the rest use the unknown id row)."""
        self.item_tower.set_trained(item_idx)

    # Per-id feature values live in the towers; these names are the model's public view of them.
    @property
    def user_cat(self) -> torch.Tensor:
        return self.user_tower.cat_values

    @property
    def user_num(self) -> torch.Tensor:
        return self.user_tower.num_values

    @property
    def item_cat(self) -> torch.Tensor:
        return self.item_tower.cat_values

    @property
    def item_num(self) -> torch.Tensor:
        return self.item_tower.num_values

    # -- public surface ----------------------------------------------------------------
    def user_vectors(self, user_idx: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """``user_idx (B,)``, ``history (B, L)`` int64 padded with 0 -> ``(B, d)``, L2-normalised."""
        pooled, users, _ = self._pooled(user_idx, history, None)
        return self.user_tower(pooled, users)

    def item_vectors(
        self,
        item_idx: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``item_idx (B,)``, content ``(B, d_text)`` / ``(B, d_image)`` with masks ``(B,)`` -> ``(B, d)``, L2-normalised."""
        pooled, _, items = self._pooled(None, None, item_idx)
        return self.item_tower(pooled, items, text, text_mask, image, image_mask)[0]

    def rank(self, user_vec: torch.Tensor, item_vec: torch.Tensor, user_idx: torch.Tensor | None = None, item_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Scores ``(B,)`` for the heads that are on: ``p_click``, ``p_cvr``, ``p_ctcvr``, ``rating``.

        A single user row ``(1, d)`` broadcasts against ``(B, d)`` candidates. ``user_idx`` /
        ``item_idx`` are accepted for callers that have them; the ranker reads only the tower
        vectors (which already carry the id embeddings).
        """
        user_vec, item_vec = torch.broadcast_tensors(user_vec, item_vec)
        return self._rank(user_vec, item_vec)[0]

    def _rank(self, user_vec: torch.Tensor, item_vec: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        # Unit vectors have elements ~ 1/sqrt(d): rescale so the ranker's inputs are O(1).
        scale = user_vec.shape[-1] ** 0.5
        user_vec, item_vec = user_vec * scale, item_vec * scale
        logits, gates = self.ranker(torch.cat([user_vec, item_vec, user_vec * item_vec], dim=-1))
        out: dict[str, torch.Tensor] = {"p_click": torch.sigmoid(logits["click"])}
        if "conversion" in logits:
            out["p_cvr"] = torch.sigmoid(logits["conversion"])
            out["p_ctcvr"] = out["p_click"] * out["p_cvr"]  # ESMM: p(click & convert) = p(click) p(convert | click)
        if "rating" in logits:
            out["rating"] = self.rating_lo + self.rating_span * torch.sigmoid(logits["rating"])
        return out, gates, logits

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training/eval pass over a batch (keys as ``training.data``) -> vectors, logits, scores, gates."""
        pooled, users, items = self._pooled(batch["user_idx"], batch["history"], batch["item_idx"])
        user_vec = self.user_tower(pooled, users)
        item_vec, modality_gates = self.item_tower(
            pooled, items, batch.get("text"), batch.get("text_mask"), batch.get("image"), batch.get("image_mask")
        )
        scores, gates, logits = self._rank(user_vec, item_vec)
        out = {"user_vec": user_vec, "item_vec": item_vec, "gates": gates, **scores}
        out.update({f"logit_{t}": v for t, v in logits.items()})
        if modality_gates is not None:
            out["modality_gates"] = modality_gates
        return out

    def set_feature_values(self, user_cat=None, user_num=None, item_cat=None, item_num=None) -> None:
        """Fill the per-user / per-item feature buffers (rows = user_idx / item_idx)."""
        for name, value in (("user_cat", user_cat), ("user_num", user_num), ("item_cat", item_cat), ("item_num", item_num)):
            if value is not None:
                buffer = getattr(self, name)  # the tower's buffer, filled in place
                if tuple(value.shape) != tuple(buffer.shape):
                    raise ValueError(f"{name}: expected shape {tuple(buffer.shape)}, got {tuple(value.shape)}")
                buffer.copy_(value)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Everything except the TorchRec tables (those get the fused row-wise optimizer)."""
        tables = {id(p) for p in self.embedding_tables.parameters()}
        return [p for p in self.parameters() if id(p) not in tables]


# -- RUN/model/ -------------------------------------------------------------------------
def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain, contiguous tensors (also when the tables are the fused training kernels)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: RecsysModel, model_dir: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` + ``model.json`` atomically; ``meta`` adds e.g. ``best_epoch``."""
    model_dir = Path(model_dir)
    with atomic_path(model_dir / "model.safetensors") as tmp:
        save_file(model_state_dict(model), str(tmp))
    write_json(model_dir / "model.json", {**model.spec.to_json(), "version": MODEL_VERSION, **(meta or {})})


def load_model(model_dir: str | Path) -> RecsysModel:
    """Rebuild the trained module from ``model.json`` + ``model.safetensors`` (eval mode)."""
    model_dir = Path(model_dir)
    for name in ("model.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise RunError(f"{model_dir / name} is missing: run `recsys train --run {model_dir.parent}` first")
    meta = json.loads((model_dir / "model.json").read_text())
    if meta.get("version") != MODEL_VERSION:
        raise RunError(
            f"{model_dir / 'model.json'} is model version {meta.get('version')}, this recsys reads version {MODEL_VERSION}: "
            f"train it again with `recsys train --run {model_dir.parent}`"
        )
    model = RecsysModel(ModelSpec.from_json(meta))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model.eval()
