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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor, PoolingType

from recsys.config import ModelConfig, section_dict
from recsys.errors import ConfigError, RunError
from recsys.history import mean_content  # noqa: F401  (the model's callers build history_content with it)
from recsys.attention import make_attention
from recsys.mmoe import MultiTaskRanker
from recsys.rundir import atomic_path, write_json
from recsys.towers import ItemTower, UserTower

MODEL_VERSION = 4  # 2: per-id feature buffers in the towers; 3: recent history items as features, a ranker over the features; 4: the history's content in the user tower
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
    # (center, slope): the rating head's prediction r becomes center + slope (r - center), clipped to
    # rating_range; set after training (training.calibration), identity while training
    rating_calibration: tuple[float, float] = (0.0, 1.0)
    user_features: dict[str, int | None] = field(default_factory=dict)  # {"cat_x": cardinality+1, "num_y": None}
    item_features: dict[str, int | None] = field(default_factory=dict)
    config: ModelConfig = field(default_factory=ModelConfig)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self), "tasks": list(self.tasks), "rating_range": list(self.rating_range),
            "rating_calibration": list(self.rating_calibration), "config": _config_json(self.config),
        }  # fmt: skip

    @classmethod
    def from_json(cls, meta: dict[str, Any]) -> "ModelSpec":
        saved = {"item_bias": False, "popularity_prior": "off", "attention": "mlp", "cross_dim": 0, **meta["config"]}  # models saved before the item bias / the prior / the dot attention / the cross columns had none
        config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        names = cls.__dataclass_fields__.keys() - {"config", "tasks", "rating_range", "rating_calibration"}
        return cls(
            **{k: meta[k] for k in names if k in meta}, tasks=tuple(meta["tasks"]), rating_range=tuple(meta["rating_range"]),
            rating_calibration=tuple(meta.get("rating_calibration", (0.0, 1.0))), config=config,  # models saved before it: none
        )  # fmt: skip


def _config_json(config: ModelConfig) -> dict[str, Any]:
    return section_dict(config)


def active_tasks(data_tasks: dict[str, bool], wanted: tuple[str, ...]) -> tuple[str, ...]:
    """Heads to build: wanted by the config and with labels in the data (click first)."""
    tasks = tuple(t for t in TASK_ORDER if t in wanted and data_tasks.get(t, False))
    if "click" not in tasks:
        raise ConfigError("the click head is required (model.tasks must include 'click' and the data must have click labels)")
    return tasks


def ids_to_kjt(keys: list[str], ids: torch.Tensor, bag_key: str | None = None, bag: torch.Tensor | None = None) -> KeyedJaggedTensor:
    """``ids (B, K)`` int64, column k = feature ``keys[k]`` with one id per row, and optionally one bag feature ``bag (B, L)`` -> KJT.

    0 means none everywhere and is left out, so it contributes nothing to a pooled bag.
    """
    by_key = ids.T  # (K, B): a KJT lists key by key, each key's rows in order
    present = by_key != 0
    values, lengths = [by_key[present]], [present.reshape(-1)]
    if bag_key is not None:
        in_bag = bag != 0
        values.append(bag[in_bag])  # row-major: each row's ids together, in order
        lengths.append(in_bag.sum(1))
        keys = [*keys, bag_key]
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths).to(torch.int64))


def fit_history(history: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, W)`` left-aligned, 0-padded -> ``(B, length)``: padded on the right, or each row's last ``length`` items."""
    history = history.to(torch.int64)
    width = history.shape[1]
    if width <= length:
        return torch.nn.functional.pad(history, (0, length - width))
    count = (history != 0).sum(1, keepdim=True)  # (B, 1)
    first = (count - length).clamp(min=0)
    window = first + torch.arange(length)  # (B, length) positions of the kept items
    kept = history.gather(1, window.clamp(max=width - 1))
    return torch.where(window < count, kept, torch.zeros_like(kept))


def _feature_names(features: dict[str, int | None], prefix: str) -> tuple[list[str], list[str]]:
    cats = sorted(k for k, card in features.items() if k.startswith("cat_") and card)
    nums = sorted(k for k in features if k.startswith("num_"))
    return [f"{prefix}_{k}" for k in cats], nums


class RecsysModel(nn.Module):
    """Tables -> user and item towers (retrieval) -> the multi-task ranker over the features.

    One KJT per call holds every id feature: ``user_id``, ``item_id``, the history as one bag
    (the user tower reads its mean), its last ``model.attention_len`` items one by one
    (``recent_0`` .. , on the item table too, for the ranker's target attention) and the
    categorical side features.
    The ranker (``model.ranker_input = "features"``) reads the tower vectors, their product and
    dot product, the user's and the candidate's id and side-feature embeddings, the candidate's
    projected text and image (``content_vec``) and a target attention of the candidate over
    the history; ``"towers"`` reads ``[u, v, u * v]`` only.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        cfg = spec.config
        self.tasks = tuple(spec.tasks)
        emb, dim = cfg.embedding_dim, cfg.dim
        self.user_cat_keys, user_nums = _feature_names(spec.user_features, "user")
        self.item_cat_keys, item_nums = _feature_names(spec.item_features, "item")
        # The user tower pools the whole history (one bag); the target attention reads its last items one by one.
        self.recent_keys = [f"recent_{j}" for j in range(min(cfg.attention_len, spec.history_len))] if cfg.ranker_input == "features" else []

        tables = [
            EmbeddingBagConfig(name="user", num_embeddings=spec.n_users, embedding_dim=emb, feature_names=["user_id"], pooling=PoolingType.MEAN),
            EmbeddingBagConfig(name="item", num_embeddings=spec.n_items, embedding_dim=emb, feature_names=["item_id", "history", *self.recent_keys], pooling=PoolingType.MEAN),
        ]
        cardinalities = {f"user_{k}": v for k, v in spec.user_features.items()} | {f"item_{k}": v for k, v in spec.item_features.items()}
        for key in self.user_cat_keys + self.item_cat_keys:  # one table per categorical feature
            tables.append(EmbeddingBagConfig(name=key, num_embeddings=cardinalities[key], embedding_dim=emb, feature_names=[key], pooling=PoolingType.MEAN))
        self.embedding_tables = EmbeddingBagCollection(tables=tables)
        self._table_of = {feature: config.name for config in tables for feature in config.feature_names}  # for _pooled_direct

        self.use_text = cfg.use_text and spec.text_dim > 0
        self.use_image = cfg.use_image and spec.image_dim > 0
        self.sees_features = cfg.ranker_input == "features"
        self.cross_dim = cfg.cross_dim if self.sees_features else 0  # the towers-only input has no feature columns to cross
        n_modalities = int(self.use_text) + int(self.use_image)
        self.content_dim = cfg.ranker_content_dim if self.sees_features and n_modalities else 0
        # The user tower reads the history's mean content vector: needs the content vector (a features ranker with a modality).
        self.content_history = bool(cfg.content_history and self.content_dim)
        # The retrieval score's last coordinate ([v, b] against [u, 1]): the item's bias and/or its popularity prior.
        self.has_prior = cfg.popularity_prior != "off"
        self.retrieval_coordinate = cfg.item_bias or self.has_prior
        if self.has_prior:  # beta * log(1 + train clicks) per item_idx, set after training (``set_popularity_prior``); 0 until then
            self.register_buffer("item_prior", torch.zeros(spec.n_items))
        self.user_tower = UserTower(spec.n_users, self.user_cat_keys, len(user_nums), emb, dim, self.content_dim if self.content_history else 0, bias=self.retrieval_coordinate)
        self.item_tower = ItemTower(
            spec.n_items,
            self.item_cat_keys,
            len(item_nums),
            emb,
            spec.text_dim if self.use_text else 0,
            spec.image_dim if self.use_image else 0,
            dim,
            fusion=cfg.fusion,
            modality_dropout=cfg.modality_dropout,
            id_dropout=cfg.id_dropout,
            bias=cfg.item_bias,
        )
        self.user_num_names, self.item_num_names = user_nums, item_nums
        ranker_in = 3 * (dim + int(cfg.item_bias)) if cfg.ranker_input == "towers" else 3 * dim  # towers-only: the vectors without a prior-only coordinate
        if self.sees_features:
            self.content_proj = nn.Linear(n_modalities * dim, self.content_dim) if self.content_dim else None
            self.attention_query = nn.Linear(dim, emb)  # from the candidate's item vector, so cold candidates have a query too
            self.attention = make_attention(cfg.attention, emb)
            user_part = emb * (1 + len(self.user_cat_keys)) + len(user_nums)
            item_part = emb * (1 + len(self.item_cat_keys)) + len(item_nums) + self.content_dim
            ranker_in += 1 + user_part + item_part + emb
            if self.cross_dim:  # the user's and the candidate's sides projected to k columns each, multiplied (``_cross``)
                self.user_cross = nn.Linear(dim + user_part, self.cross_dim)
                self.item_cross = nn.Linear(dim + item_part, self.cross_dim)
                ranker_in += self.cross_dim
            self._part_widths = (user_part, item_part)  # the ranker input's user and candidate feature columns (``_grouped_weights``)
            self.ranker_norm = nn.LayerNorm(ranker_in)  # ids, unit vectors and content live on different scales
        self.ranker = MultiTaskRanker(ranker_in, list(self.tasks), cfg.ranker, cfg.experts, cfg.expert_dim, cfg.tower_dim)
        lo, hi = spec.rating_range
        self.rating_lo, self.rating_span = float(lo), float(hi - lo)
        self.rating_center, self.rating_slope = (float(x) for x in spec.rating_calibration)

    # -- embedding lookups -------------------------------------------------------------
    def _pooled(self, user_idx: torch.Tensor | None, history: torch.Tensor | None, item_idx: torch.Tensor | None):
        """One KJT over every feature (absent parts empty) -> one call into the tables.

        Returns the pooled embeddings by feature, the known user and item indices, and the
        history as looked up ``(B, L)`` (untrained items and padding 0).
        """
        batch = next(x for x in (user_idx, item_idx) if x is not None).shape[0]
        empty = torch.zeros(batch, 1, dtype=torch.int64)
        users = self.user_tower.known(user_idx) if user_idx is not None else None
        items = self.item_tower.known(item_idx) if item_idx is not None else None
        user = self.user_tower.lookup(users) if users is not None else {k: empty for k in ["user_id", *self.user_cat_keys]}
        item = self.item_tower.lookup(items) if items is not None else {k: empty for k in ["item_id", *self.item_cat_keys]}
        looked_up = self.item_tower.trained_ids(history) if history is not None else torch.zeros(batch, 1, dtype=torch.int64)
        recent = fit_history(looked_up, len(self.recent_keys))  # (B, A): the last A items, oldest first
        bag = looked_up
        dropout = self.spec.config.history_id_dropout
        if self.training and dropout > 0:  # the bag does not see some history ids: their content must carry them
            bag = torch.where(torch.rand(bag.shape) < dropout, torch.zeros_like(bag), bag)
        if self._direct_lookup():  # inference on the plain tables: row reads instead of one KJT pass over every feature
            return self._pooled_direct(user if users is not None else {}, item if items is not None else {}, recent if users is not None else None, bag), users, items, recent
        keys = [*user, *item, *self.recent_keys]
        ids = torch.cat([*user.values(), *item.values(), recent], dim=1)
        pooled = self.embedding_tables(ids_to_kjt(keys, ids, "history", bag))  # KeyedTensor: read by key (sharding reorders the columns)
        return self._by_key(pooled), users, items, recent

    def _by_key(self, pooled: KeyedTensor) -> dict[str, torch.Tensor]:
        """The KeyedTensor's columns by feature, in one split: each slice's backward would zero-fill the whole ``(B, K * E)`` gradient.

        When the ``recent_j`` columns stand side by side in order (the plain and fused tables; a
        sharding may reorder them), they come out as one ``(B, A, E)`` view, ``"recent"``, instead
        of A pieces that ``_user_state`` would stack (a copy forward, A pieces backward).
        """
        keys, sizes, values = pooled.keys(), list(pooled.length_per_key()), pooled.values()
        recent = len(self.recent_keys)
        start = keys.index(self.recent_keys[0]) if recent and self.recent_keys[0] in keys else -1
        if start < 0 or keys[start : start + recent] != self.recent_keys:
            return dict(zip(keys, values.split(sizes, dim=1)))
        merged = sizes[:start] + [sum(sizes[start : start + recent])] + sizes[start + recent :]
        pieces = values.split(merged, dim=1)
        by_key = dict(zip(keys[:start] + ["recent"] + keys[start + recent :], pieces))
        by_key["recent"] = by_key["recent"].view(values.shape[0], recent, -1)
        return by_key

    def _direct_lookup(self) -> bool:
        """Eval mode without autograd on the plain ``EmbeddingBagCollection`` (not the training job's fused or sharded tables)."""
        return not self.training and not torch.is_grad_enabled() and type(self.embedding_tables) is EmbeddingBagCollection

    def _pooled_direct(self, user: dict[str, torch.Tensor], item: dict[str, torch.Tensor], recent: torch.Tensor | None, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the KJT pass pools, read from the table weights: a one-id feature is its row (0: zeros), the history bag the mean of its rows.

        The service's per-request cost: every feature of a KJT is one ``embedding_bag`` call, also
        when empty (the candidate side carries the user's, the 20 attention positions ...); equal to
        the KJT pass (tested).
        """
        bags = self.embedding_tables.embedding_bags

        def rows(feature: str, ids: torch.Tensor) -> torch.Tensor:  # ids (B, ...) -> (B, ..., E); 0 reads zeros
            return bags[self._table_of[feature]].weight[ids] * (ids != 0).unsqueeze(-1)

        pooled = {feature: rows(feature, ids[:, 0]) for feature, ids in {**user, **item}.items()}
        if recent is not None:
            if self.recent_keys:  # every recent_j reads the item table: one (B, A) gather, already stacked as ``_user_state`` wants it
                pooled["recent"] = rows(self.recent_keys[0], recent)
            present = (bag != 0).sum(1, keepdim=True).clamp(min=1)
            pooled["history"] = rows("history", bag).sum(1) / present
        return pooled

    def set_trained_items(self, item_idx: torch.Tensor) -> None:
        """Mark which items have training interactions (``ItemTower``: the rest use the unknown id row)."""
        self.item_tower.set_trained(item_idx)

    # Per-id feature values live in the towers; these names are the model's public view of them (rows = user_idx / item_idx).
    user_cat = property(lambda self: self.user_tower.cat_values)
    user_num = property(lambda self: self.user_tower.num_values)
    item_cat = property(lambda self: self.item_tower.cat_values)
    item_num = property(lambda self: self.item_tower.num_values)

    # -- the two sides -----------------------------------------------------------------------
    def _user_state(self, pooled, users: torch.Tensor, recent: torch.Tensor, history_content: torch.Tensor | None) -> dict[str, torch.Tensor]:
        state = {"user_vec": self.user_tower(pooled, users, history_content)}
        if self.sees_features:
            state["user_part"] = torch.cat([pooled["user_id"], *(pooled[k] for k in self.user_cat_keys), self.user_num[users]], dim=-1)
            stacked = pooled.get("recent")  # (B, A, E): a view of the pooled columns, or the direct reads; else (a sharding reordered them) one pooled feature per position
            state["history_keys"] = stacked if stacked is not None else torch.stack([pooled[k] for k in self.recent_keys], dim=1)  # 0 rows at padding / untrained
            state["history_mask"] = recent != 0
        return state

    def _item_state(self, pooled, items, text=None, text_mask=None, image=None, image_mask=None, item_vec=None, content_vec=None) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        if item_vec is None or (self.content_dim and content_vec is None):
            item_vec, gates, modalities = self.item_tower(pooled, items, text, text_mask, image, image_mask)
            item_vec = self._with_prior(item_vec, items)
            if gates is not None:
                state["modality_gates"] = gates
            if self.content_dim:
                content_vec = self.content_proj(torch.cat(modalities, dim=-1))
        state["item_vec"] = item_vec
        if self.has_prior:
            state["prior"] = self.item_prior[items]  # what ``_rank`` takes back out of the towers' score
        if self.sees_features:
            parts = [pooled["item_id"], *(pooled[k] for k in self.item_cat_keys), self.item_num[items]]
            if self.content_dim:
                state["content_vec"] = content_vec
                parts.append(content_vec)
            state["item_part"] = torch.cat(parts, dim=-1)
        return state

    def _history_content_from_sums(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training path of ``mean_content``: the mean content vector of each row's history, from summed raw content.

        An item's content vector is affine in its raw content (each modality: its projection, or
        the stand-in where the mask is 0; then ``content_proj``), so the mean over the history is
        the same map applied to the mean raw content: ``(B, dim)`` sums from ``training.data``
        (``history_{m}_sum`` and ``history_{m}_present``) instead of ``(B, L, dim)`` gathers.
        Equal to ``mean_content`` of ``catalogue_states`` in eval mode (tested).
        """
        history = batch["history"]
        n = (history != 0).sum(1, keepdim=True).to(torch.float32)  # (B, 1)
        parts = []
        for modality, proj, standin in (("text", self.item_tower.text_proj, self.item_tower.text_standin), ("image", self.item_tower.image_proj, self.item_tower.image_standin)):
            if proj is None:
                continue
            total = batch.get(f"history_{modality}_sum")
            if total is None:  # no content given: every history item takes the stand-in (as a candidate does in ``item_state``)
                total, present = torch.zeros(history.shape[0], proj.in_features), torch.zeros(history.shape[0], 1)
            else:
                present = batch[f"history_{modality}_present"].unsqueeze(1)
            parts.append((total @ proj.weight.T + present * proj.bias + (n - present) * standin) / n.clamp(min=1))
        return torch.where(n > 0, self.content_proj(torch.cat(parts, dim=-1)), torch.zeros(()))

    # -- public surface ----------------------------------------------------------------
    def user_state(
        self, user_idx: torch.Tensor, history: torch.Tensor, history_content: torch.Tensor | None = None, history_sums: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """``user_idx (B,)``, ``history (B, L)`` int64 padded with 0 -> what ``rank`` needs of the user (``user_vec`` (B, d) among it).

        ``history_content (B, C)``: the mean content vector of the history items, ``mean_content``
        of the catalogue's content vectors (the service adds those of items added live), for a
        model that reads it (``content_history``). Without it every history item counts as an
        item without content (the stand-ins), as ``item_state`` treats candidates given no content.
        ``history_sums``: instead of it, the history's raw content sums (``training.data.history_content_sums``), as in training.
        """
        if self.content_history and history_content is None:
            history_content = self._history_content_from_sums({"history": history, **(history_sums or {})})
        pooled, users, _, looked_up = self._pooled(user_idx, history, None)
        return self._user_state(pooled, users, looked_up, history_content if self.content_history else None)

    def item_state(
        self,
        item_idx: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        item_vec: torch.Tensor | None = None,
        content_vec: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """What ``rank`` needs of the candidates: ``item_vec`` (B, d), ``content_vec`` (B, C) and the id part.

        Given ``item_vec`` and ``content_vec`` (kept by the service for its catalogue and for
        items added live), the towers are not run again: only the id and side features are looked up.
        """
        pooled, _, items, _ = self._pooled(None, None, item_idx)
        return self._item_state(pooled, items, text, text_mask, image, image_mask, item_vec, content_vec)

    def user_vectors(
        self, user_idx: torch.Tensor, history: torch.Tensor, history_content: torch.Tensor | None = None, history_sums: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``user_idx (B,)``, ``history (B, L)`` int64 padded with 0 (``history_content``, ``history_sums`` as in ``user_state``) -> ``(B, d)``, L2-normalised.

        With ``model.item_bias``: ``(B, d + 1)``, a constant 1 last, so that ``user_vec @ item_vec`` is cosine + the item's bias.
        """
        return self.user_state(user_idx, history, history_content, history_sums)["user_vec"]

    def item_vectors(
        self,
        item_idx: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``item_idx (B,)``, content ``(B, d_text)`` / ``(B, d_image)`` with masks ``(B,)`` -> ``(B, d)``, L2-normalised (with ``model.item_bias``: ``(B, d + 1)``, the retrieval bias last)."""
        pooled, _, items, _ = self._pooled(None, None, item_idx)
        return self._with_prior(self.item_tower(pooled, items, text, text_mask, image, image_mask)[0], items)

    def _with_prior(self, vec: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The item tower's vectors with the popularity prior added to the last coordinate (appended as one without ``model.item_bias``)."""
        if not self.has_prior:
            return vec
        prior = self.item_prior[items].unsqueeze(1).to(vec.dtype)
        return torch.cat([vec[:, :-1], vec[:, -1:] + prior], dim=1) if self.spec.config.item_bias else torch.cat([vec, prior], dim=1)

    def prior_of(self, item_idx: torch.Tensor) -> torch.Tensor | None:
        """The popularity prior of ``item_idx`` (any shape; 0 for items without train clicks and items added live), None without one."""
        return self.item_prior[item_idx] if self.has_prior else None

    @torch.no_grad()
    def set_popularity_prior(self, beta: float, train_clicks: torch.Tensor) -> None:
        """``item_prior = beta * log(1 + train_clicks)``, ``train_clicks (n_items,)`` clicked train rows per item_idx (row 0: padding, kept 0)."""
        if not self.has_prior:
            raise ValueError("this model has no popularity prior (model.popularity_prior = \"off\")")
        prior = beta * torch.log1p(train_clicks.to(torch.float32))
        prior[0] = 0.0
        self.item_prior.copy_(prior)

    def set_rating_calibration(self, center: float, slope: float) -> None:
        """Rating predictions ``center + slope (r - center)``, clipped to the rating range, from now on (kept in ``spec``, so in model.json)."""
        self.rating_center, self.rating_slope = float(center), float(slope)
        self.spec = replace(self.spec, rating_calibration=(self.rating_center, self.rating_slope))

    def rank(self, user: dict[str, torch.Tensor], item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scores ``(B,)`` for the heads that are on: ``p_click``, ``p_cvr``, ``p_ctcvr``, ``rating``; and ``retrieval_score``, the towers' cosine.

        ``user`` from ``user_state``, ``item`` from ``item_state``; a single user row broadcasts
        against B candidates, and U user rows against B = U n candidates grouped by user (user 0's
        n first): each user's history is then attended without a copy per candidate.
        """
        return self._rank(user, item)[0]

    def _rank(self, user: dict[str, torch.Tensor], item: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        # The retrieval vectors: unit vectors, with ``model.item_bias`` a last coordinate (1 for the user, b for the item).
        full_user, full_item = user["user_vec"], item["item_vec"]
        if "prior" in item:  # the ranker reads the trained score: the popularity prior (added after training) comes back out
            full_item = torch.cat([full_item[:, :-1], full_item[:, -1:] - item["prior"].unsqueeze(1).to(full_item.dtype)], dim=1)
        if self.spec.config.ranker_stop_gradient:
            full_user, full_item = full_user.detach(), full_item.detach()
        users, batch = full_user.shape[0], max(full_user.shape[0], full_item.shape[0])
        if full_item.shape[0] not in (1, batch) or batch % users:
            raise ValueError(f"rank: {users} user rows against {full_item.shape[0]} candidates (either may be 1; else the candidates grouped by user, a multiple)")
        per_pair = lambda t: t if t.shape[0] == batch else t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t.repeat_interleave(batch // t.shape[0], dim=0)  # noqa: E731
        full_user, full_item = per_pair(full_user), per_pair(full_item)
        d = self.spec.config.dim
        user_vec, item_vec = full_user[:, :d], full_item[:, :d]
        # Unit vectors have elements ~ 1/sqrt(d): rescale so the ranker's inputs are O(1).
        scale = d ** 0.5
        if self.sees_features:
            parts = [user_vec * scale, item_vec * scale, user_vec * item_vec * scale]
            attended, _ = self.attention(self.attention_query(item_vec), user["history_keys"], user["history_mask"])
            dot = (full_user * full_item).sum(-1, keepdim=True)  # the towers' score: cosine + the item's bias
            precomputed = item.get("first_layer")  # the candidates' own columns through the first layer (``item_first_layer``), e.g. kept by the service
            if not torch.is_grad_enabled() and (users < batch or precomputed is not None):  # the user's columns through the first layer once per user
                shared = torch.cat([user["user_vec"][:, :d] * scale, user["user_part"]], dim=-1)  # (U, .)
                if precomputed is not None:
                    if precomputed.shape[-1] != self.item_first_width:  # rows kept for another model would score silently wrong
                        raise ValueError(f"item first-layer rows have {precomputed.shape[-1]} columns, this model's are {self.item_first_width} wide (item_first_layer)")
                    own = per_pair(precomputed)
                    paired = [parts[2], dot, attended]
                    item_cross = own[:, -self.cross_dim :] if self.cross_dim else None  # kept beside the first-layer columns
                else:
                    own, item_part = None, per_pair(item["item_part"])
                    paired = [parts[1], parts[2], dot, item_part, attended]
                    item_cross = self.item_cross(torch.cat([parts[1], item_part], dim=-1)) if self.cross_dim else None
                if self.cross_dim:
                    paired.append(per_pair(self.user_cross(shared)) * item_cross)
                logits, gates = self.ranker.from_first_layer(self._grouped_first_layer(shared, torch.cat(paired, dim=-1), batch // users, own))
            else:
                item_part, user_part = per_pair(item["item_part"]), per_pair(user["user_part"])
                dropout = self.spec.config.ranker_id_dropout
                if self.training and dropout > 0:  # rows whose candidate id the ranker does not see: it must rank by content, as for cold items
                    emb = self.spec.config.embedding_dim
                    hidden = (torch.rand(batch, 1) < dropout).to(item_part.dtype)
                    item_part = torch.cat([item_part[:, :emb] * (1 - hidden), item_part[:, emb:]], dim=1)
                parts += [dot, user_part, item_part, attended]
                if self.cross_dim:
                    parts.append(self.user_cross(torch.cat([parts[0], user_part], dim=-1)) * self.item_cross(torch.cat([parts[1], item_part], dim=-1)))
                logits, gates = self.ranker(self.ranker_norm(torch.cat(parts, dim=-1)))
        else:  # the towers-only input: [u, v, u * v] of the whole retrieval vectors, the bias coordinate included
            if self.has_prior and not self.spec.config.item_bias:  # the coordinate is the prior's alone, 0 once it is taken out
                full_user, full_item = full_user[:, :d], full_item[:, :d]
            logits, gates = self.ranker(torch.cat([full_user * scale, full_item * scale, full_user * full_item * scale], dim=-1))
        out: dict[str, torch.Tensor] = {"p_click": torch.sigmoid(logits["click"]), "retrieval_score": (user_vec * item_vec).sum(-1)}  # the towers' cosine
        if "conversion" in logits:
            out["p_cvr"] = torch.sigmoid(logits["conversion"])
            out["p_ctcvr"] = out["p_click"] * out["p_cvr"]  # ESMM: p(click & convert) = p(click) p(convert | click)
        if "rating" in logits:
            out["rating"] = self.rating_lo + self.rating_span * torch.sigmoid(logits["rating"])
            if self.rating_slope != 1.0:
                calibrated = self.rating_center + self.rating_slope * (out["rating"] - self.rating_center)
                out["rating"] = calibrated.clamp(self.rating_lo, self.rating_lo + self.rating_span)
        return out, gates, logits

    def _grouped_first_layer(self, shared: torch.Tensor, paired: torch.Tensor, per: int, own: torch.Tensor | None = None) -> torch.Tensor:
        """The ranker's first layer over ``LayerNorm([u, v, u * v, u . v, user_part, item_part, attended(, cross)])``
        with the user's columns (``shared (U, S)``: u and user_part) multiplied once per user, not once per candidate.

        ``paired (B, P)``: the other columns in order, B = U per rows grouped by user; or, given
        ``own`` (``item_first_layer`` of the B candidates), only the pair's ``[u * v, u . v, attended]``.
        With ``W' = W diag(gamma)``: ``W LN(x) + b = (W' x - mean(x) W' 1) / std(x) + W beta + b``, and
        the sum, the sum of squares and ``W' x`` each split into the user's, the candidate's and the
        pair's columns. The same function as the plain path (tested); at 250 candidates a user it
        skips about a third of the first layer's multiply-adds, and with ``own`` kept per item, two thirds.
        """
        w = self._grouped_weights()
        per_user = lambda t: t if t.shape[0] == 1 else t.repeat_interleave(per, dim=0)  # noqa: E731  (one user broadcasts)
        total = per_user(shared.sum(1, keepdim=True)) + paired.sum(1, keepdim=True)
        square = per_user(shared.square().sum(1, keepdim=True)) + paired.square().sum(1, keepdim=True)
        product = per_user(shared @ w["user"])
        if own is None:
            product = product + paired @ w["pair"]
        else:
            width = w["item"].shape[1]
            product = product + paired @ w["interaction"] + own[:, :width]
            total, square = total + own[:, width : width + 1], square + own[:, width + 1 : width + 2]
        mean, square = total / self.ranker_norm.normalized_shape[0], square / self.ranker_norm.normalized_shape[0]
        inv_std = torch.rsqrt((square - mean.square()).clamp(min=0) + self.ranker_norm.eps)
        return (product - mean * w["sums"]) * inv_std + w["offset"]

    def item_first_layer(self, item: dict[str, torch.Tensor]) -> torch.Tensor:
        """A candidate's own ranker-input columns (``[v, item_part]``) through ``_grouped_first_layer``'s
        weights, with their sum and sum of squares (and with ``model.cross_dim`` k, the candidate's cross
        projection): ``(B, H + 2 + k)``, a function of the item alone.

        The service keeps these rows for its catalogue (``serve.rank_cache_mb``) and hands them to
        ``rank`` as ``item["first_layer"]``: per candidate only the pair's columns remain. Inference only.
        """
        d = self.spec.config.dim
        x = torch.cat([item["item_vec"][:, :d] * d ** 0.5, item["item_part"]], dim=-1)
        cross = [self.item_cross(x)] if self.cross_dim else []  # the candidate's side of the cross products (``model.cross_dim``)
        return torch.cat([x @ self._grouped_weights()["item"], x.sum(1, keepdim=True), x.square().sum(1, keepdim=True), *cross], dim=1)

    @property
    def vector_dim(self) -> int:
        """Width of ``user_vectors`` / ``item_vectors``: ``model.dim``, plus the last coordinate with ``model.item_bias`` or a popularity prior."""
        return self.spec.config.dim + int(self.retrieval_coordinate)

    @property
    def item_first_width(self) -> int:
        """Columns of an ``item_first_layer`` row: the first layer's width (every expert's and gate's), then the sum and the sum of squares, then the ``model.cross_dim`` candidate projections."""
        return self.ranker.first_layer()[0].shape[0] + 2 + self.cross_dim

    def _grouped_weights(self) -> dict[str, torch.Tensor]:
        """``_grouped_first_layer``'s weights: ``W diag(gamma)`` split by column (the user's, the pair's; the
        pair's again as the candidate's and the interaction's) and transposed, its row sums, ``W beta + b``;
        kept while no parameter they come from changes (``Tensor._version``)."""
        params = [self.ranker_norm.weight, self.ranker_norm.bias, *(p for layer in self.ranker.first_layers() for p in (layer.weight, layer.bias))]
        key = tuple((id(p), p._version) for p in params)
        if getattr(self, "_grouped_cache", (None,))[0] != key:
            weight, bias = self.ranker.first_layer()
            d, (n_user, n_item) = self.spec.config.dim, self._part_widths
            scaled = weight * self.ranker_norm.weight  # W diag(gamma)
            user_at, item_at = 3 * d + 1, 3 * d + 1 + n_user  # where user_part and item_part start
            cols = lambda *spans: torch.cat([scaled[:, a:b] for a, b in spans], dim=1).T.contiguous()  # noqa: E731
            end = scaled.shape[1]
            self._grouped_cache = (key, {
                "user": cols((0, d), (user_at, item_at)),
                "pair": cols((d, user_at), (item_at, end)),
                "item": cols((d, 2 * d), (item_at, item_at + n_item)),
                "interaction": cols((2 * d, user_at), (item_at + n_item, end)),
                "sums": scaled.sum(1), "offset": weight @ self.ranker_norm.bias + bias,
            })  # fmt: skip
        return self._grouped_cache[1]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training/eval pass over a batch (keys as ``training.data``) -> vectors, logits, scores, gates."""
        pooled, users, items, looked_up = self._pooled(batch["user_idx"], batch["history"], batch["item_idx"])
        user = self._user_state(pooled, users, looked_up, self._history_content_from_sums(batch) if self.content_history else None)
        item = self._item_state(pooled, items, batch.get("text"), batch.get("text_mask"), batch.get("image"), batch.get("image_mask"))
        scores, gates, logits = self._rank(user, item)
        out = {"user_vec": user["user_vec"], "item_vec": item["item_vec"], "gates": gates, **scores}
        out.update({f"logit_{t}": v for t, v in logits.items()})
        if "modality_gates" in item:
            out["modality_gates"] = item["modality_gates"]
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


@torch.no_grad()
def catalogue_states(
    model: RecsysModel, item_idx: torch.Tensor, content: dict[str, torch.Tensor], batch_size: int = 8192, progress: Any = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Item-tower vectors ``(n, d)`` and the ranker's content vectors ``(n, C)`` (None without content) of ``item_idx (n,)``, in batches.

    ``content``: ``{"text", "text_mask", "image", "image_mask"}`` matrices with row = item_idx (the
    modalities present). The one catalogue pass of the index build, the evaluation and the
    validation recall. ``progress``: a callable wrapping the batch range (e.g. tqdm).
    """
    item_vecs, content_vecs = [], []
    starts = range(0, len(item_idx), batch_size)
    for start in progress(starts) if progress else starts:
        rows = item_idx[start : start + batch_size]
        state = model.item_state(rows, **{name: matrix[rows] for name, matrix in content.items()})
        item_vecs.append(state["item_vec"])
        if "content_vec" in state:
            content_vecs.append(state["content_vec"])
    return torch.cat(item_vecs), torch.cat(content_vecs) if content_vecs else None


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


def resave_model(model: RecsysModel, model_dir: str | Path, meta: dict[str, Any]) -> None:
    """``save_model`` over a saved model after a post-training change: the old ``model.json``'s own
    entries (``best_epoch``, ``valid``, ...) are kept, ``meta`` is added, the spec is the model's."""
    saved = json.loads((Path(model_dir) / "model.json").read_text())
    spec_keys = set(model.spec.to_json()) | {"version"}
    save_model(model, model_dir, {**{k: v for k, v in saved.items() if k not in spec_keys}, **meta})


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
