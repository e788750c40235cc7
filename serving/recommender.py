"""Retrieve -> rank -> top-k, loaded from a run directory.

``Recommender.load(run)`` reads the model (``RUN/model/``), the index (``RUN/index/``) and, from
``RUN/data/``, each known user's latest clicked history and everything they have seen, plus item
popularity. A request then goes:

    user tower (known user: user_idx + stored history; unknown: request history; neither: the
    unknown-user vector over the most popular items) -> FAISS top-N (serve.candidates) -> drop
    seen items -> one batched ``rank()`` -> blended score -> top-k with per-task predictions.

Each stage is timed (``Result.timings_ms``) so the service can export where the time goes.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
import torch

from recsys.candidates import SOURCES, ItemNeighbours, distinct_recent, item_item_wanted, item_neighbours, one_user_scores, one_user_union, top_unseen
from recsys.config import Config
from recsys.errors import RecsysError, RunError
from recsys.events import COLUMNS as EVENT_COLUMNS
from recsys.history import pad_sequences
from recsys.model import RecsysModel, load_model
from recsys.ranking import score_candidates
from recsys.rundir import RunDir, read_json, sha256_file
from serving.index import ItemIndex

log = logging.getLogger("recsys.serving")

SPLITS = ("train", "valid", "test")
ADDED_ITEMS = "added_items.parquet"  # in RUN/index/: texts of items added at serving time before the log (read, never written)
TASK_COLUMNS = ("p_click", "p_conversion", "p_ctcvr", "rating", "retrieval_score")
ITEM_BLOCK = 65_536  # catalogue items per pass when the ranker rows per item are built


class RequestError(RecsysError):
    """A request that cannot be served as asked (the service answers 4xx with this message)."""


class UnknownItem(RequestError):
    """An item id the index does not hold."""


class EventAhead(RequestError):
    """An event timestamped further ahead of the service's clock than serve.events_max_future_s."""


class DuplicateItem(RequestError):
    """An item id that is already indexed (ids are stable: an item cannot be re-added)."""


@dataclass(frozen=True)
class Recommendation:
    item_id: Any
    score: float  # blended, in [0, 1]
    p_click: float
    p_conversion: float | None  # p(convert | click); None when the head is off
    p_ctcvr: float | None
    rating: float | None  # on the data's rating scale
    retrieval_score: float | None = None  # the towers' cosine (the first stage), part of the blend
    candidate_source: str = "towers"  # which source proposed it (recsys.candidates.SOURCES)


@dataclass
class Result:
    items: list[Recommendation]
    warnings: list[str]
    source: str  # "user", "history" or "popular"
    timings_ms: dict[str, float] = field(default_factory=dict)  # prepare, user_tower, retrieve, rank, total
    batch: int = 1  # requests that ran their stages together (serving.batcher)


@dataclass(frozen=True)
class Prepared:
    """One /recommend request, checked and resolved against the run (``Recommender.prepare``)."""

    k: int
    user_idx: int
    model_history: np.ndarray  # item_idx of the clicked history with an id row, oldest first
    item_item_history: np.ndarray  # item_idx the co-occurrence source reads: every click (stored, live, request), distinct, the last serve.cooccurrence_recent
    content_history: np.ndarray  # faiss ids of the last history_len clicked items (added items included)
    seen: np.ndarray  # faiss ids never recommended back
    source: str  # "user", "history" or "popular"
    warnings: list[str]
    prepare_s: float = 0.0


@dataclass
class NewItem:
    item_id: Any
    text: str | None = None
    image: bytes | None = None  # encoded image file (PNG, JPEG, ...)


def decode_image_base64(value: str) -> bytes:
    """Strict base64 -> bytes, or RequestError."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image_base64 is not valid base64") from None


# -- run-directory data --------------------------------------------------------------------
@dataclass(frozen=True)
class Behaviour:
    """Per-user stored behaviour, dense by user_idx (row 0 = unknown user)."""

    seen_ptr: np.ndarray  # (U+2,) CSR offsets into seen_items
    seen_items: np.ndarray  # item_idx of every item the user clicked over all splits, each user's oldest first (not sampled negatives)
    popular: np.ndarray  # item_idx by descending click count
    history_len: int  # L: the model's history is a user's last L clicks
    data_cut: int = 0  # the latest timestamp in the run's data: live events after it are news to this run

    def seen(self, user_idx: int) -> np.ndarray:
        """Every item ``user_idx`` clicked, oldest first (empty for row 0, the unknown user)."""
        return self.seen_items[self.seen_ptr[user_idx] : self.seen_ptr[user_idx + 1]] if user_idx else np.zeros(0, dtype=np.int64)

    def history(self, user_idx: int) -> np.ndarray:
        """The user's last ``history_len`` clicks, oldest first: the history the model reads (a view, no copy)."""
        return self.seen(user_idx)[-self.history_len :]


def _interaction_frames(run: RunDir) -> list[Path]:
    paths = [run.data / f"{split}.parquet" for split in SPLITS if (run.data / f"{split}.parquet").is_file()]
    if not paths:
        raise RunError(f"{run.data}/train.parquet is missing: run `recsys prepare --run {run.root}` first")
    return paths


def load_behaviour(run: RunDir, n_users: int, history_len: int) -> Behaviour:
    """Histories, seen sets and popularity from RUN/data/*.parquet (columnar; no row loops)."""
    frames = []
    for path in _interaction_frames(run):
        frame = pl.scan_parquet(path)
        names = frame.collect_schema().names()
        keep = pl.col("click") == 1 if "click" in names else pl.lit(True)
        if "sampled" in names:
            keep = keep & ~pl.col("sampled")
        frames.append(frame.filter(keep).select("user_idx", "item_idx", "timestamp"))
    data_cut = max((pl.scan_parquet(path).select(pl.col("timestamp").max()).collect().item() or 0) for path in _interaction_frames(run))
    positives = (
        pl.concat(frames)
        .filter((pl.col("user_idx") > 0) & (pl.col("user_idx") < n_users))
        .sort(["user_idx", "timestamp"], maintain_order=True)  # equal timestamps in split and file order, as the evaluation reads them
        .collect()
    )
    user_idx = positives["user_idx"].to_numpy()
    item_idx = positives["item_idx"].to_numpy()
    seen_ptr = np.zeros(n_users + 1, dtype=np.int64)
    np.add.at(seen_ptr, user_idx + 1, 1)
    seen_ptr = np.cumsum(seen_ptr)

    counts = positives.group_by("item_idx").len().sort(["len", "item_idx"], descending=[True, False])
    return Behaviour(seen_ptr, item_idx, counts["item_idx"].to_numpy(), history_len, int(data_cut))


def id_lookup(ids: pl.Series) -> tuple[dict[Any, int], bool]:
    """Original id -> row, and whether ids are integers (request ids are then parsed as int)."""
    return dict(zip(ids.to_list(), range(len(ids)))), ids.dtype.is_integer()


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _digits_at_most(limit: str) -> str:
    """Regex of the ``len(limit)``-digit strings whose value is at most ``limit``."""
    alternatives = [f"{limit[:i]}[0-{int(d) - 1}][0-9]{{{len(limit) - i - 1}}}" for i, d in enumerate(limit) if d != "0"]
    return "|".join([*alternatives, limit])


# An integer id as text: 1-19 ASCII digits with an optional sign, within int64. The schema publishes
# this pattern and parse_id uses it, so the contract is the behaviour (str.isdigit would take "²").
INT64_PATTERN = (
    rf"^(?:\+?(?:[0-9]{{1,18}}|{_digits_at_most(str(INT64_MAX))})"
    rf"|-(?:[0-9]{{1,18}}|{_digits_at_most(str(-INT64_MIN))}))$"
)
_INT64_TEXT = re.compile(INT64_PATTERN)
ID_RULE = "its ids are integers within int64 (1-19 ASCII digits, optional sign)"


def parse_id(raw: Any, integer: bool) -> Any:
    """A request id in the catalogue's id type (int or str), or None when it cannot be one.

    Integer catalogues take an int within int64 or its text (``INT64_PATTERN``); nothing else.
    """
    if integer:
        if isinstance(raw, str) and _INT64_TEXT.fullmatch(raw):  # fullmatch: "$" alone would allow a trailing newline
            return int(raw)
        if isinstance(raw, int) and not isinstance(raw, bool) and INT64_MIN <= raw <= INT64_MAX:
            return raw
        return None
    return str(raw)


# -- the recommender -----------------------------------------------------------------------
class Recommender:
    """Model + index + stored behaviour of one run; ``recommend`` and ``similar`` are thread-safe."""

    def __init__(self, run: RunDir, cfg: Config, model: RecsysModel, index: ItemIndex, users: pl.Series, behaviour: Behaviour, texts: pl.DataFrame):
        self.run = run
        self.cfg = cfg
        self.model = model
        self.index = index
        self.behaviour = behaviour
        self.user_row, self.user_ids_are_int = id_lookup(users)  # user_id -> user_idx
        self.item_ids_are_int = index.ids["item_id"].dtype.is_integer()
        self._texts = dict(zip(texts["item_id"].to_list(), texts["text"].to_list()))
        self.history_len = model.spec.history_len
        self.rating_range = model.spec.rating_range
        meta = read_json(run.model / "model.json")
        weights = sha256_file(run.model / "model.safetensors")[:12]
        self.model_version = f"v{meta.get('version', 0)}-{weights}"  # format version + which weights
        self._encoders: tuple[Any, Any] | None = None
        self._add_lock = threading.Lock()
        self._encoders_lock = threading.Lock()
        self.neighbours: ItemNeighbours | None = None  # the co-occurrence source, from every click the run knows
        serve = cfg.serve
        self.item_first = self._item_first_rows(serve.rank_cache_mb)  # (n_items, model.item_first_width) by item_idx, or None
        if item_item_wanted(model.spec.n_items, serve):
            started = time.perf_counter()
            users = np.repeat(np.arange(len(behaviour.seen_ptr) - 1), np.diff(behaviour.seen_ptr))  # seen_items: by user, oldest first
            self.neighbours = item_neighbours(users, behaviour.seen_items, model.spec.n_items, serve)
            log.info(
                "co-occurrence source (%s): %d items x %d neighbours in %.2f s",
                self.neighbours.kind, model.spec.n_items, self.neighbours.ids.shape[1], time.perf_counter() - started,
            )  # fmt: skip

    @classmethod
    def load(cls, run: RunDir | str | Path) -> "Recommender":
        run = run if isinstance(run, RunDir) else RunDir(run)
        cfg = run.config()
        model = _load_model(run)
        index = ItemIndex.load(run.index)
        users_path = run.require(run.data / "users.parquet", "prepare")
        users = pl.read_parquet(users_path, columns=["user_id", "user_idx"]).sort("user_idx")
        if len(users) and users["user_idx"].to_list() != list(range(1, len(users) + 1)):
            raise RunError(f"{users_path}: user_idx must run 1..{len(users)}; re-run `recsys prepare --run {run.root}`")
        users = pl.concat([pl.DataFrame({"user_id": [None], "user_idx": [0]}, schema=users.schema), users])["user_id"]
        behaviour = load_behaviour(run, model.spec.n_users, model.spec.history_len)
        texts = pl.read_parquet(run.require(run.data / "items.parquet", "prepare"), columns=["item_id", "text"])
        if (run.index / ADDED_ITEMS).is_file():  # items added through POST /items before the log (serving.journal)
            texts = pl.concat([texts, pl.read_parquet(run.index / ADDED_ITEMS).cast(texts.schema)])
        if index.added_texts:
            added = pl.DataFrame({"item_id": list(index.added_texts), "text": list(index.added_texts.values())}, schema={"item_id": texts.schema["item_id"], "text": pl.String})
            texts = pl.concat([texts, added])
        if (index.dim, index.bias) != (model.vector_dim, model.retrieval_coordinate):
            raise RunError(
                f"{run.index} holds {index.dim}-d vectors{' with a bias' if index.bias else ''}, this run's model gives {model.vector_dim}-d"
                f"{' with a bias' if model.retrieval_coordinate else ''} (another model's index): rebuild it with `recsys index --run {run.root}`"
            )
        if model.content_dim and index.content_vecs is None:
            raise RunError(f"{run.index} keeps no content vectors for this model's ranker: rebuild it with `recsys index --run {run.root}`")
        recommender = cls(run, cfg, model, index, users, behaviour, texts)
        recommender.warm_up()
        return recommender

    def warm_up(self) -> None:
        """One pass through every stage: the first torch/FAISS call is slow (lazy initialisation)."""
        self.recommend(k=1)
        known = next((user for user, idx in self.user_row.items() if idx > 0), None)
        if known is not None:  # the towers' path (the unknown user above takes the popular one)
            self.recommend(user_id=known, k=1)

    def _item_first_rows(self, budget_mb: float) -> torch.Tensor | None:
        """Each catalogue item's ``model.item_first_layer`` row (by item_idx), from its stored vectors, when they fit in ``budget_mb``.

        A function of the item alone and of this model: fixed for the recommender's life (a reload
        builds a new one). Items added live (no id row) are not kept: ``_rank_many`` computes theirs.
        """
        model = self.model
        if not model.sees_features or budget_mb <= 0:
            return None
        width = model.item_first_width
        if model.spec.n_items * width * 4 > budget_mb * 2**20:
            log.info("ranker rows per item not kept: %d items x %d floats exceed serve.rank_cache_mb = %g", model.spec.n_items, width, budget_mb)
            return None
        ids = self.index.ids.filter(pl.col("item_idx") > 0)
        faiss_ids, item_idx = ids["faiss_id"].to_numpy(), ids["item_idx"].to_numpy(writable=True)  # torch.from_numpy wants writable memory
        rows = torch.zeros(model.spec.n_items, width)
        with torch.inference_mode():
            for start in range(0, len(faiss_ids), ITEM_BLOCK):
                block = slice(start, start + ITEM_BLOCK)
                content = self.index.content(faiss_ids[block])
                state = model.item_state(
                    torch.from_numpy(item_idx[block]), item_vec=torch.from_numpy(self.index.vectors(faiss_ids[block])),
                    content_vec=torch.from_numpy(content) if content is not None else None,
                )  # fmt: skip
                rows[torch.from_numpy(item_idx[block])] = model.item_first_layer(state)
        return rows

    # -- ids -----------------------------------------------------------------------------
    def item_key(self, raw: Any) -> Any:
        return parse_id(raw, self.item_ids_are_int)

    def _require_item_key(self, raw: Any, what: str) -> Any:
        key = self.item_key(raw)
        if key is None:
            raise RequestError(f"{what} {raw!r} is not an item id of this catalogue: {ID_RULE}")
        return key

    def text_of(self, item_id: Any) -> str | None:
        return self._texts.get(item_id)

    # -- recommend -----------------------------------------------------------------------
    def user_key(self, raw: Any) -> Any:
        """A request user id in the run's id type, or None when it cannot be one."""
        return parse_id(raw, self.user_ids_are_int)

    def recommend(self, user_id: Any = None, history: Sequence[Any] | None = None, k: int = 10, live: Sequence[Any] = ()) -> Result:
        """Top-k for a known user, a history of item ids, or neither (popular items).

        ``live`` holds the user's clicks since the run's data (item ids, oldest first; POST /events):
        they follow the stored history and precede the request's, and count as seen.
        """
        return self.recommend_many([self.prepare(user_id, history, k, live)])[0]

    def prepare(self, user_id: Any = None, history: Sequence[Any] | None = None, k: int = 10, live: Sequence[Any] = ()) -> Prepared:
        """One request's inputs to the batched stages (``recommend_many``); a bad request raises RequestError here, alone."""
        started = time.perf_counter()
        serve = self.cfg.serve
        if not 1 <= k <= serve.max_k:
            raise RequestError(f"k must lie in 1..{serve.max_k} (serve.max_k), got {k}")
        warnings: list[str] = []
        user_idx = 0
        if user_id is not None:
            key = parse_id(user_id, self.user_ids_are_int)
            if key is None:
                raise RequestError(f"user_id {user_id!r} is not a user id of this run: {ID_RULE}")
            user_idx = self.user_row.get(key, 0)
            if user_idx == 0 and live:
                warnings.append(f"user_id {user_id!r} is not in the trained run: recommending from its {len(live)} live click(s)")
            elif user_idx == 0:
                warnings.append(f"unknown user_id {user_id!r}: recommending from the request history or popular items")
        stored = self.behaviour.history(user_idx)
        stored = stored[stored > 0]  # item_idx == faiss id for catalogue items
        live_ids = self.index.faiss_ids_of(live)  # items this index does not hold (a reload to another catalogue) are skipped
        request_ids, unknown = self._history_ids(history or [])
        if unknown:
            warnings.append(f"ignored {len(unknown)} unknown history item id(s): {', '.join(map(repr, unknown[:10]))}")
        clicked = np.concatenate([stored, live_ids, request_ids])  # faiss ids, oldest first
        clicked_idx = self.index.item_idx(clicked)  # 0 for items added at serving time: no id row
        model_history = clicked_idx[clicked_idx > 0]
        fresh = np.concatenate([live_ids, request_ids])
        item_item_history = np.zeros(0, dtype=np.int64)
        if self.neighbours is not None:  # all the user's clicks, as the evaluation reads train + valid (not the towers' last history_len)
            fresh_idx = clicked_idx[len(stored) :]
            item_item_history = distinct_recent(np.concatenate([self.behaviour.seen(user_idx), fresh_idx[fresh_idx > 0]]), serve.cooccurrence_recent)
        return Prepared(
            k=k, user_idx=user_idx, model_history=model_history, item_item_history=item_item_history,
            content_history=clicked[-self.history_len :],  # added items count through their content
            seen=np.union1d(self.behaviour.seen(user_idx), fresh), source="user" if user_idx else ("history" if len(fresh) else "popular"),
            warnings=warnings, prepare_s=time.perf_counter() - started,
        )  # fmt: skip

    def recommend_many(self, requests: Sequence[Prepared]) -> list[Result]:
        """The batched stages for prepared requests: one user-tower pass, one FAISS search, one ranker pass over every candidate.

        Each request's result is the one it would get alone (the batch only shares the calls); its
        timings are the batch's stages plus its own ``prepare``; ``batch`` says how many ran together.
        """
        serve = self.cfg.serve
        t0 = time.perf_counter()
        with torch.inference_mode():
            user = self.model.user_state(
                torch.tensor([r.user_idx for r in requests]),
                torch.from_numpy(pad_sequences([r.model_history for r in requests], self.history_len)),  # (B, L): the last L
                self._history_contents([r.content_history for r in requests]),
            )  # the tower vectors and the ranker's user inputs
        t1 = time.perf_counter()
        n = serve.candidates
        searched = [i for i, r in enumerate(requests) if r.source != "popular"]
        found = None
        if searched:
            depth = min(self.index.count, n + max(len(requests[i].seen) for i in searched))
            found, _ = self.index.search(user["user_vec"][searched].numpy(), depth)
        rows = {i: row for row, i in enumerate(searched)}
        candidates, origins, cooccurrences = [], [], []
        for i, r in enumerate(requests):
            if r.source == "popular":
                towers = self._popular(n, r.seen)
            else:
                ids = found[rows[i]]  # type: ignore[index]
                towers = ids[(ids >= 0) & ~np.isin(ids, r.seen)][:n]
            cooccurrence = one_user_scores(self.neighbours, r.item_item_history) if self.neighbours is not None else None
            merged, codes = self._other_sources(towers, r.seen, cooccurrence)
            candidates.append(merged)
            origins.append(codes)
            cooccurrences.append(cooccurrence)
        t2 = time.perf_counter()
        items = self._rank_many(user, requests, candidates, origins, cooccurrences)
        t3 = time.perf_counter()
        shared = {"user_tower": t1 - t0, "retrieve": t2 - t1, "rank": t3 - t2}
        results = []
        for r, ranked in zip(requests, items):
            timings = {"prepare": r.prepare_s, **shared, "total": r.prepare_s + t3 - t0}
            results.append(Result(ranked, r.warnings, r.source, {stage: round(1000 * v, 3) for stage, v in timings.items()}, len(requests)))
        return results

    # -- live events ---------------------------------------------------------------------
    def check_events(self, events: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
        """Events (``user_id, item_id, timestamp`` and optional ``click, conversion, rating``) as
        event-log columns (``recsys.events.COLUMNS``); the first bad one raises RequestError naming
        its row and field, so a batch is taken whole or not at all.

        ``click`` defaults to 1 (an interaction). Items must be in the index (catalogue or added
        through POST /items); users may be new.
        """
        serve = self.cfg.serve
        now = time.time()
        ratings = "rating" in self.model.spec.tasks
        lo, hi = self.rating_range
        columns: dict[str, list[Any]] = {name: [] for name in EVENT_COLUMNS}
        for row, event in enumerate(events):
            where = f"events[{row}]"
            user = parse_id(event["user_id"], self.user_ids_are_int)
            if user is None:
                raise RequestError(f"{where}.user_id {event['user_id']!r} is not a user id of this run: {ID_RULE}")
            item = self._require_item_key(event["item_id"], f"{where}.item_id")
            if self.index.faiss_id(item) is None:
                raise UnknownItem(f"{where}.item_id {event['item_id']!r} is not in the index: add it with POST /items first")
            timestamp = event["timestamp"]
            if timestamp > now + serve.events_max_future_s:
                raise EventAhead(f"{where}.timestamp {timestamp} lies {timestamp - now:.0f} s in the future (serve.events_max_future_s = {serve.events_max_future_s})")
            click = 1 if event.get("click") is None else event["click"]
            conversion, rating = event.get("conversion"), event.get("rating")
            if conversion == 1 and click == 0:
                raise RequestError(f"{where}.conversion is 1 but click is 0: a conversion follows a click")
            if rating is not None and ratings and not lo <= rating <= hi:
                raise RequestError(f"{where}.rating {rating} lies outside the run's rating range [{lo}, {hi}]")
            for name, value in zip(EVENT_COLUMNS, (user, item, timestamp, click, conversion, rating, int(now * 1000))):
                columns[name].append(value)
        return columns

    def _history_ids(self, history: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        """Request item ids -> faiss ids (unknown ones listed apart), in request order."""
        found, unknown = [], []
        for raw in history:
            key = self._require_item_key(raw, "history item id")
            faiss_id = self.index.faiss_id(key)
            (found.append(faiss_id) if faiss_id is not None else unknown.append(raw))
        return np.asarray(found, dtype=np.int64), unknown

    def _history_contents(self, histories: Sequence[np.ndarray]) -> torch.Tensor | None:
        """The mean stored content vector of each history's items ``(B, C)`` (``recsys.history.mean_content``; 0 when empty), None without content."""
        if self.index.content_vecs is None:
            return None
        out = np.zeros((len(histories), self.index.content_vecs.shape[1]), dtype=np.float32)
        for row, faiss_ids in enumerate(histories):
            if len(faiss_ids):
                out[row] = self.index.content(faiss_ids).mean(0)
        return torch.from_numpy(out)

    def _other_sources(self, candidates: np.ndarray, seen: np.ndarray, cooccurrence: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        """The towers' candidates plus the co-occurrence and popular quotas (``recsys.candidates.one_user_union``) -> faiss ids and source codes."""
        serve = self.cfg.serve
        return one_user_union(candidates, seen, cooccurrence, serve.cooccurrence_candidates, self.behaviour.popular, serve.popular_candidates)

    def _popular(self, n: int, seen: np.ndarray) -> np.ndarray:
        return top_unseen(self.behaviour.popular, seen, n)

    def _rank_many(
        self,
        user: dict[str, torch.Tensor],
        requests: Sequence[Prepared],
        candidates: Sequence[np.ndarray],
        origins: Sequence[np.ndarray],
        cooccurrences: Sequence[tuple[np.ndarray, np.ndarray] | None],
    ) -> list[list[Recommendation]]:
        """Every request's candidates through rank() in one batch (padded to the longest), from their stored vectors, blended, top-k each."""
        width = max((len(c) for c in candidates), default=0)
        if width == 0:
            return [[] for _ in requests]
        serve = self.cfg.serve
        padded = np.stack([np.pad(c, (0, width - len(c)), mode="edge") if len(c) else np.zeros(width, dtype=np.int64) for c in candidates])  # (B, W) faiss ids
        valid = torch.from_numpy(np.stack([np.arange(width) < len(c) for c in candidates]))
        flat = padded.reshape(-1)
        feature = None
        kind = "cosine" if self.neighbours is None else self.neighbours.kind
        if serve.item_item_blend(kind) > 0 and any(c is not None for c in cooccurrences):  # cooccurrence_feature; items added live (and never co-clicked) have 0
            feature = torch.zeros(padded.shape)
            for row, (pair, r) in enumerate(zip(cooccurrences, requests)):
                if pair is None or len(pair[0]) == 0:
                    continue
                items, scores = pair
                at = np.searchsorted(items, padded[row]).clip(max=len(items) - 1)
                hit = items[at] == padded[row]
                feature[row] = torch.from_numpy(np.where(hit, scores[at], 0.0) / max(len(r.item_item_history), 1)).float()
        with torch.inference_mode():
            content_vec = self.index.content(flat)
            item_idx = torch.from_numpy(self.index.item_idx(flat))
            item_vec = torch.from_numpy(self.index.vectors(flat))
            item_first = None
            if self.item_first is not None:  # the kept rows; items added live (item_idx 0) get theirs from their stored vectors
                item_first = self.item_first[item_idx]
                live = torch.nonzero(item_idx == 0).squeeze(1)
                if len(live):
                    state = self.model.item_state(item_idx[live], item_vec=item_vec[live], content_vec=torch.from_numpy(content_vec[live.numpy()]) if content_vec is not None else None)
                    item_first[live] = self.model.item_first_layer(state)
                item_first = item_first.reshape(*padded.shape, -1)
            scores, predictions = score_candidates(
                self.model,
                user,
                item_idx.reshape(padded.shape),
                item_vec.reshape(*padded.shape, -1),
                torch.from_numpy(content_vec).reshape(*padded.shape, -1) if content_vec is not None else None,
                serve,
                feature,
                kind,
                item_first,
            )
            scores = scores.masked_fill(~valid, float("-inf"))
            top = torch.topk(scores, min(max(r.k for r in requests), width), dim=1).indices
        out = []
        for row, r in enumerate(requests):
            keep = top[row][: min(r.k, len(candidates[row]))]
            columns = {
                "score": scores[row, keep],
                "p_click": predictions["p_click"][row, keep],
                "p_conversion": predictions["p_cvr"][row, keep] if "p_cvr" in predictions else None,
                "p_ctcvr": predictions["p_ctcvr"][row, keep] if "p_ctcvr" in predictions else None,
                "rating": predictions["rating"][row, keep] if "rating" in predictions else None,
                "retrieval_score": predictions["retrieval_score"][row, keep],
            }
            values = {name: (col.tolist() if col is not None else [None] * len(keep)) for name, col in columns.items()}
            chosen = keep.numpy()
            item_ids = self.index.item_ids(padded[row][chosen])
            sources = [SOURCES[code] for code in origins[row][chosen]]
            out.append([Recommendation(item_id, *(values[c][i] for c in ("score", *TASK_COLUMNS)), candidate_source=sources[i]) for i, item_id in enumerate(item_ids)])
        return out

    # -- similar items -------------------------------------------------------------------
    def similar(self, item_id: Any, k: int) -> list[tuple[Any, float]]:
        """Nearest items to ``item_id`` in the item-tower space (itself excluded): (item_id, cosine)."""
        if not 1 <= k <= self.cfg.serve.max_k:
            raise RequestError(f"k must lie in 1..{self.cfg.serve.max_k} (serve.max_k), got {k}")
        faiss_id = self.index.faiss_id(self._require_item_key(item_id, "item_id"))
        if faiss_id is None:
            raise UnknownItem(f"unknown item_id {item_id!r}")
        query = self.index.vectors(np.array([faiss_id]))
        if self.index.bias:
            query[:, -1] = 0.0  # the unit vectors alone: the item's cosine to each item, their retrieval biases left out
        found, scores = self.index.search(query, min(self.index.count, k + 1))
        keep = (found[0] >= 0) & (found[0] != faiss_id)
        ids, kept_scores = found[0][keep][:k], scores[0][keep][:k]
        return list(zip(self.index.item_ids(ids), kept_scores.tolist()))

    # -- cold start ----------------------------------------------------------------------
    def add_items(self, items: Sequence[NewItem]) -> tuple[list[int], list[str]]:
        """Embed new items with the configured encoders, log them durably (RUN/index/added_items.log) and add them to the live index.

        Returns their faiss ids and warnings. Known or repeated ids raise RequestError.
        """
        warnings: list[str] = []
        keys = [self._require_item_key(item.item_id, "new item_id") for item in items]
        with self._add_lock:
            known = [key for key in keys if self.index.faiss_id(key) is not None]
            if known or len(set(keys)) != len(keys):
                raise DuplicateItem(f"item ids already indexed or repeated in the request: {(known or keys)[:5]}")
            content, content_warnings = self._embed_content(items)
            warnings += content_warnings
            with torch.inference_mode():
                state = self.model.item_state(torch.zeros(len(items), dtype=torch.int64), **content)  # no id row: content only
            content_vecs = state["content_vec"].numpy() if "content_vec" in state else None
            encoded = {name: tensor.numpy() for name, tensor in content.items()}  # what a rebuild re-embeds them from
            faiss_ids = self.index.add_logged(self.run.index, state["item_vec"].numpy(), keys, [item.text for item in items], content_vecs, encoded)
            self._texts.update({key: item.text for key, item in zip(keys, items)})
        return faiss_ids.tolist(), warnings

    def load_encoders(self) -> None:
        """Load the encoders POST /items embeds with, once (the service does it in the background at start
        when adds are enabled: the MiniLM load made the first add of the ML-100K model take 1.0-1.7 s)."""
        from features.encoders import build_image_encoder, build_text_encoder

        with self._encoders_lock:
            if self._encoders is not None:
                return
            # torch's thread count is process-wide: encoders built with the serving count never change it under running requests
            embed = self.cfg.embed.model_copy(update={"threads": torch.get_num_threads()})
            text = build_text_encoder(embed) if self.model.use_text else None
            catalogue = [t for t in self._texts.values() if t]
            if text is not None and catalogue:  # its precision is chosen (timed) on the first texts it encodes: catalogue texts, now, not the first add's
                text.encode_texts(catalogue[:: max(1, len(catalogue) // 64)][:64])
            self._encoders = (text, build_image_encoder(embed) if self.model.use_image else None)

    def adopt_encoders(self, other: "Recommender") -> None:
        """Take ``other``'s loaded encoders when this run embeds with the same ones (a reload of a run with the same ``[embed]`` section)."""
        same = other.cfg.embed == self.cfg.embed and (other.model.use_text, other.model.use_image) == (self.model.use_text, self.model.use_image)
        if same and other._encoders is not None:
            with self._encoders_lock:
                if self._encoders is None:
                    self._encoders = other._encoders

    def _embed_content(self, items: Sequence[NewItem]) -> tuple[dict[str, torch.Tensor], list[str]]:
        self.load_encoders()  # a no-op once loaded; waits for a load in progress
        text_encoder, image_encoder = self._encoders  # type: ignore[misc]
        content: dict[str, torch.Tensor] = {}
        warnings: list[str] = []
        n = len(items)
        if text_encoder is not None:
            _check_dim(text_encoder.dim, self.model.spec.text_dim, "text")
            rows = [i for i, item in enumerate(items) if item.text]
            text, mask = np.zeros((n, text_encoder.dim), np.float32), np.zeros(n, np.float32)
            if rows:
                text[rows] = text_encoder.encode_texts([items[i].text for i in rows])
                mask[rows] = 1
            content |= {"text": torch.from_numpy(text), "text_mask": torch.from_numpy(mask)}
        elif any(item.text for item in items):
            warnings.append("text ignored: this model uses no text")
        if image_encoder is not None:
            _check_dim(image_encoder.dim, self.model.spec.image_dim, "image")
            vectors, mask = image_encoder.encode_images([item.image for item in items])
            undecodable = [items[i].item_id for i in range(n) if items[i].image is not None and not mask[i]]
            if undecodable:
                warnings.append(f"images that could not be decoded (indexed without image): {undecodable[:10]}")
            content |= {"image": torch.from_numpy(vectors), "image_mask": torch.from_numpy(mask.astype(np.float32))}
        elif any(item.image for item in items):
            warnings.append("image ignored: this model uses no images")
        return content, warnings


def _load_model(run: RunDir) -> RecsysModel:
    """``load_model``, with a damaged file (truncated, not JSON, not safetensors, other shapes) a RunError naming it."""
    try:
        return load_model(run.model)
    except RecsysError:
        raise
    except Exception as exc:  # safetensors, json and torch each raise their own types for a damaged file
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        damaged = run.model / ("model.json" if isinstance(exc, (ValueError, KeyError, TypeError)) and not isinstance(exc, RuntimeError) else "model.safetensors")
        raise RunError(f"{damaged} cannot be read ({type(exc).__name__}: {first_line}): train again with `recsys train --run {run.root}` or restore the file") from None


def _check_dim(encoder_dim: int, model_dim: int, modality: str) -> None:
    if encoder_dim != model_dim:
        raise RunError(f"the configured {modality} encoder gives {encoder_dim}-d vectors but the model expects {model_dim}: check [embed] in config.toml")
