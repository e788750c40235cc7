"""FAISS index of the item tower (``RUN/index/``) and the ``recsys index`` step.

``ItemIndex`` holds L2-normalised item vectors under stable FAISS ids (``IndexIDMap2``), so
results never depend on insertion positions; with ``bias`` (a model with ``model.item_bias`` or a popularity prior) the
last coordinate is the item's retrieval bias + prior, kept as it is, and the user's query ends in 1. Small catalogues are searched exactly
(``IndexFlatIP``); larger ones with an inverted file (IVF, exact inner products inside the
scanned lists) or HNSW, whose search knob (nprobe / efSearch) is raised at build time until
recall@100 against exact search reaches ``index.target_recall`` on a sample of queries.

Catalogue items get ``faiss_id = item_idx``; items added at serving time get fresh ids above
every existing one and ``item_idx = 0`` (unknown to the model's id table). Beside each vector the
index keeps the item's ``content_vec`` (the ranker's view of its text and image), so the service
ranks catalogue items and items added live from what it stores, as the evaluation does.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import faiss
import numpy as np
import polars as pl

from recsys.config import IndexConfig
from recsys.errors import RunError
from recsys.history import padded_history
from recsys.rundir import RunDir, atomic_path, read_json, sha256_file, write_json, write_parquet
from serving.journal import LOG_FILE, AddedBatch, append_log, read_log

log = logging.getLogger("recsys")

INDEX_FILE = "items.faiss"
IDS_FILE = "ids.parquet"
CONTENT_FILE = "content_vecs.npy"  # the ranker's per-item content vector (row = row of ids.parquet)
META_FILE = "index.json"
RECALL_AT = 100


def normalise(vectors: np.ndarray, bias: bool = False) -> np.ndarray:
    """Float32, C-contiguous, unit L2 rows (zero rows stay zero); with ``bias`` all columns but the last. (n, d) -> (n, d)"""
    out = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    unit = out[:, :-1] if bias else out
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    np.divide(unit, norms, out=unit, where=norms > 0)
    return out


def exact_top(vectors: np.ndarray, queries: np.ndarray, n: int) -> np.ndarray:
    """Row positions of the exact inner-product top-n of each query. (q, d) -> (q, n)"""
    _, positions = faiss.knn(queries, vectors, n, metric=faiss.METRIC_INNER_PRODUCT)
    return positions


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` found in the same row of ``found`` (both (q, n))."""
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, int((t >= 0).sum())) for f, t in zip(found, truth)]
    return float(np.mean(hits))


def _nlist_for(count: int, configured: int) -> int:
    if configured > 0:
        return configured
    return int(2 ** round(math.log2(max(16.0, 4 * math.sqrt(count)))))


def _make_base(kind: str, dim: int, count: int, cfg: IndexConfig) -> tuple[faiss.Index, dict[str, Any]]:
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = cfg.hnsw_ef_construction
        return base, {"m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction}
    nlist = min(_nlist_for(count, cfg.ivf_nlist), max(1, count // 39))  # faiss wants >= 39 points per centroid
    quantizer = faiss.IndexFlatIP(dim)
    base = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a reference to quantizer
    return base, {"nlist": nlist}


def _knob_name(kind: str) -> str | None:
    return {"ivf": "nprobe", "hnsw": "ef_search"}.get(kind)


def _set_knob(index: faiss.IndexIDMap2, kind: str, value: int) -> None:
    base = faiss.downcast_index(index.index)
    if kind == "ivf":
        base.nprobe = value
    elif kind == "hnsw":
        base.hnsw.efSearch = value


class ReadersWriterLock:
    """Many readers at once, or one writer; a waiting writer holds new readers back (it cannot starve)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._changed:
            while self._writing or self._writers_waiting:
                self._changed.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                if self._readers == 0:
                    self._changed.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._changed:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._changed.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()


ADD_ROOM = 1 / 8  # at load, the id maps and content vectors get room for this share more items (at least MIN_ADD_ROOM),
MIN_ADD_ROOM = 1024  # so the first adds append in place: doubling on the first add copied every row, 378 ms at 1M items


def _reserved(array: np.ndarray, extra: int) -> np.ndarray:
    """A copy of ``array`` in a buffer with ``extra`` spare rows (left uninitialised: the views stop before them)."""
    buffer = np.empty((len(array) + extra, *array.shape[1:]), dtype=array.dtype)
    buffer[: len(array)] = array
    return buffer


def _with_room(buffer: np.ndarray, used: int, extra: int) -> np.ndarray:
    """``buffer`` when its rows can take ``extra`` more after ``used``, else a copy of its first ``used`` rows with twice the room."""
    if used + extra <= len(buffer):
        return buffer
    grown = np.empty((max(used + extra, 2 * len(buffer)), *buffer.shape[1:]), dtype=buffer.dtype)
    grown[:used] = buffer[:used]
    return grown


class ItemIndex:
    """Item vectors under stable FAISS ids, with their ``item_idx`` / ``item_id``; thread-safe."""

    def __init__(self, index: faiss.IndexIDMap2, kind: str, ids: pl.DataFrame, params: dict[str, Any], recall: float, content_vecs: np.ndarray | None = None, bias: bool = False):
        self.index = index
        self.bias = bias  # the last coordinate is the item's retrieval bias (not normalised; a query's is 1, a similar-items query's 0)
        self.content_vecs = content_vecs  # (count, C) float32 in the row order of ids, or None (a model without content)
        self.kind = kind
        self.params = params
        self.recall = recall  # ann recall@100 measured at build time (1.0 for exact search)
        self._lock = ReadersWriterLock()  # FAISS searches run concurrently; an add must overlap none of them
        self._save_lock = threading.Lock()  # one writer (adds, the log, the files) at a time
        self.log_end = 0  # bytes of the log of added items (journal.LOG_FILE) this index holds
        self.added_texts: dict[Any, str | None] = {}  # texts of the items added at serving time
        self._set_ids(ids)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        faiss_ids: np.ndarray,
        item_idx: np.ndarray,
        item_ids: Sequence[Any] | pl.Series,
        cfg: IndexConfig,
        queries: np.ndarray | None = None,
        seed: int = 0,
        content_vecs: np.ndarray | None = None,
        bias: bool = False,
    ) -> "ItemIndex":
        """Index ``vectors`` (n, d) under ``faiss_ids`` (n,); tune the ANN knob on ``queries`` (q, d).

        Without ``queries`` the calibration uses perturbed catalogue vectors. ``content_vecs`` (n, C)
        are kept beside the vectors. ``bias``: the last column is a bias, not normalised.
        """
        vectors = normalise(vectors, bias)
        count, dim = vectors.shape
        faiss_ids = np.asarray(faiss_ids, dtype=np.int64)
        if count == 0:
            raise ValueError("cannot build an index over zero items")
        if len(np.unique(faiss_ids)) != count or faiss_ids.min() < 0:
            raise ValueError("faiss ids must be unique and non-negative")
        kind = cfg.kind if cfg.kind != "auto" else ("flat" if count < cfg.exact_below else "ivf")
        base, params = _make_base(kind, dim, count, cfg)
        rng = np.random.default_rng(seed)
        if not base.is_trained:
            train = vectors[rng.choice(count, size=min(count, params["nlist"] * 64), replace=False)]
            base.train(train)
        index = faiss.IndexIDMap2(base)
        if kind == "ivf":
            base.make_direct_map()  # lets reconstruct() fetch vectors of candidates for the ranker
        index.add_with_ids(vectors, faiss_ids)
        ids = pl.DataFrame(
            {"faiss_id": faiss_ids, "item_idx": np.asarray(item_idx, dtype=np.int64), "item_id": item_ids}
        )
        item_index = cls(index, kind, ids, params, recall=1.0, content_vecs=None if content_vecs is None else np.ascontiguousarray(content_vecs, dtype=np.float32), bias=bias)
        if kind != "flat":
            if queries is None:
                sample = vectors[rng.choice(count, size=min(count, cfg.recall_queries), replace=False)]
                queries = sample + rng.normal(scale=0.5 / math.sqrt(dim), size=sample.shape).astype(np.float32)
                if bias:
                    queries[:, -1] = 1.0  # a user's query
            item_index._calibrate(vectors, faiss_ids, normalise(queries[: cfg.recall_queries], bias), cfg)
        return item_index

    def _calibrate(self, vectors: np.ndarray, faiss_ids: np.ndarray, queries: np.ndarray, cfg: IndexConfig) -> None:
        """Smallest nprobe / efSearch whose recall@100 against exact search meets the target."""
        n = min(RECALL_AT, len(faiss_ids))
        truth = faiss_ids[exact_top(vectors, queries, n)]
        knob = _knob_name(self.kind)
        assert knob is not None
        if self.kind == "ivf":
            nlist = self.params["nlist"]
            fixed = cfg.ivf_nprobe
            candidates = [fixed] if fixed > 0 else [p for p in (2 ** i for i in range(13)) if p < nlist] + [nlist]
        else:
            start = max(cfg.hnsw_ef_search, n)
            candidates = [start * 2 ** i for i in range(6)]
        for value in candidates:
            _set_knob(self.index, self.kind, value)
            found, _ = self.search(queries, n)
            self.recall = recall_at(found, truth)
            self.params[knob] = value
            if self.recall >= cfg.target_recall:
                break
        if self.recall < cfg.target_recall:
            log.warning("index: recall@%d %.3f below target %.2f at %s=%d", n, self.recall, cfg.target_recall, knob, value)

    # -- ids ---------------------------------------------------------------------------
    def _set_ids(self, ids: pl.DataFrame) -> None:
        """Build the id maps from ``ids`` (at load). Adds extend them in place (``_extend_ids``), O(new items)."""
        self.ids = ids
        faiss_ids = ids["faiss_id"].to_numpy()
        room = max(MIN_ADD_ROOM, int(len(ids) * ADD_ROOM))
        top = int(faiss_ids.max(initial=-1)) + 1
        self._row_of_buf = np.full(top + room, -1, dtype=np.int64)  # faiss_id -> row of ids (spare room past the view)
        self._row_of_buf[faiss_ids] = np.arange(len(faiss_ids))
        self._row_of = self._row_of_buf[:top]
        self._item_idx_buf = _reserved(ids["item_idx"].to_numpy(), room)
        self._item_idx = self._item_idx_buf[: len(ids)]
        self._item_ids = ids["item_id"].to_list()
        self._faiss_id_of = dict(zip(self._item_ids, faiss_ids.tolist()))
        self._content_buf = None if self.content_vecs is None else _reserved(self.content_vecs, room)  # a read-only memory map at load: read once, here
        self.content_vecs = None if self._content_buf is None else self._content_buf[: len(ids)]

    def _extend_ids(self, added: pl.DataFrame, new_ids: np.ndarray, item_ids: Sequence[Any], item_idx: np.ndarray, content_vecs: np.ndarray | None) -> None:
        """Append items to the id maps and content vectors without copying what is there (buffers grow by doubling).

        Readers take no lock: each array is filled before the view that exposes it is swapped in,
        and the content vectors before the row map that points into them.
        """
        start, count = len(self._item_ids), len(new_ids)
        if content_vecs is not None:
            self._content_buf = _with_room(self._content_buf, start, count)
            self._content_buf[start : start + count] = content_vecs
            self.content_vecs = self._content_buf[: start + count]
        self._item_idx_buf = _with_room(self._item_idx_buf, start, count)
        self._item_idx_buf[start : start + count] = item_idx
        self._item_ids.extend(item_ids)  # readers index it by rows they were given: never past the old end until the row map says so
        self._item_idx = self._item_idx_buf[: start + count]
        top = max(len(self._row_of), int(new_ids.max()) + 1)
        if top > len(self._row_of_buf):
            grown = np.full(max(top, 2 * len(self._row_of_buf)), -1, dtype=np.int64)
            grown[: len(self._row_of)] = self._row_of
            self._row_of_buf = grown
        self._row_of_buf[new_ids] = np.arange(start, start + count)
        self._row_of = self._row_of_buf[:top]
        self._faiss_id_of.update(zip(item_ids, new_ids.tolist()))
        self.ids = pl.concat([self.ids, added], rechunk=False)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def faiss_id(self, item_id: Any) -> int | None:
        """The FAISS id of ``item_id``, or None when the index does not hold it."""
        return self._faiss_id_of.get(item_id)

    def faiss_ids_of(self, item_ids: Sequence[Any]) -> np.ndarray:
        """FAISS ids of the ``item_ids`` the index holds, in order (the others left out)."""
        found = [self._faiss_id_of.get(item_id) for item_id in item_ids]
        return np.asarray([f for f in found if f is not None], dtype=np.int64)

    def item_ids(self, faiss_ids: np.ndarray) -> list[Any]:
        rows = self._row_of[faiss_ids]
        return [self._item_ids[r] for r in rows.tolist()]

    def item_idx(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Model vocabulary index of each id (0 for items added at serving time). (n,) -> (n,)"""
        return self._item_idx[self._row_of[faiss_ids]]

    # -- queries -----------------------------------------------------------------------
    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-n by inner product: (q, d) -> faiss ids (q, n), -1 where fewer exist; scores (q, n)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock.reading():
            scores, ids = self.index.search(queries, n)
        return ids, scores

    def vectors(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Stored (normalised) vectors of ``faiss_ids``. (n,) -> (n, d)"""
        with self._lock.reading():
            return self.index.reconstruct_batch(np.ascontiguousarray(faiss_ids, dtype=np.int64))

    def content(self, faiss_ids: np.ndarray) -> np.ndarray | None:
        """Stored ``content_vec`` of ``faiss_ids`` (n,) -> (n, C), or None without content."""
        return None if self.content_vecs is None else self.content_vecs[self._row_of[faiss_ids]]

    # -- updates -----------------------------------------------------------------------
    def add(
        self, vectors: np.ndarray, item_ids: Sequence[Any], item_idx: np.ndarray | None = None,
        content_vecs: np.ndarray | None = None, faiss_ids: np.ndarray | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Add items in memory (fresh FAISS ids above all existing ones, or ``faiss_ids``) with their ``content_vecs``; returns their faiss ids.

        Items whose ``item_id`` is already indexed are refused (ValueError): FAISS ids are stable.
        """
        vectors = normalise(vectors, self.bias)
        if vectors.shape[1] != self.dim or len(vectors) != len(item_ids):
            raise ValueError(f"expected ({len(item_ids)}, {self.dim}) vectors, got {vectors.shape}")
        if (self.content_vecs is None) != (content_vecs is None):
            raise ValueError("content_vecs must be given exactly when the index keeps them")
        with self._save_lock:
            self._check_new(item_ids)
            new_ids = self._next_ids(len(item_ids)) if faiss_ids is None else np.asarray(faiss_ids, dtype=np.int64)
            self._add(vectors, new_ids, item_ids, item_idx, content_vecs)
        return new_ids

    def add_logged(self, directory: Path, vectors: np.ndarray, item_ids: Sequence[Any], texts: Sequence[str | None],
                   content_vecs: np.ndarray | None, encoded: dict[str, np.ndarray]) -> np.ndarray:  # fmt: skip
        """Add items durably: one record in ``directory``'s log (fsynced), then into the live index. O(new items).

        ``encoded``: the encoders' outputs (text, image and their masks) a rebuild re-embeds them from.
        """
        vectors = normalise(vectors, self.bias)
        if vectors.shape != (len(item_ids), self.dim) or (self.content_vecs is None) != (content_vecs is None):
            raise ValueError(f"expected ({len(item_ids)}, {self.dim}) vectors and content_vecs exactly when the index keeps them")
        with self._save_lock:
            self._check_new(item_ids)
            new_ids = self._next_ids(len(item_ids))
            arrays = {"item_vec": vectors, **({"content_vec": content_vecs} if content_vecs is not None else {}), **encoded}
            self.log_end = append_log(directory / LOG_FILE, AddedBatch(new_ids, list(item_ids), list(texts), arrays), self.log_end)
            self._add(vectors, new_ids, item_ids, None, content_vecs)  # acknowledged only after the log holds it
            self.added_texts.update(zip(item_ids, texts))
        return new_ids

    def _check_new(self, item_ids: Sequence[Any]) -> None:
        repeated = [item for item, times in Counter(item_ids).items() if times > 1]
        duplicates = [item for item in item_ids if item in self._faiss_id_of] + repeated
        if duplicates:
            raise ValueError(f"items already indexed or repeated: {sorted(map(str, set(duplicates)))[:5]}")

    def _next_ids(self, count: int) -> np.ndarray:
        start = len(self._row_of)  # the largest faiss id + 1
        return np.arange(start, start + count, dtype=np.int64)

    def _add(self, vectors: np.ndarray, new_ids: np.ndarray, item_ids: Sequence[Any], item_idx: np.ndarray | None, content_vecs: np.ndarray | None) -> None:
        """The in-memory add: FAISS, the id map and the content vectors change together, under the write lock."""
        idx = np.zeros(len(item_ids), dtype=np.int64) if item_idx is None else np.asarray(item_idx, dtype=np.int64)
        added = pl.DataFrame({"faiss_id": new_ids, "item_idx": idx, "item_id": list(item_ids)}).cast(self.ids.schema)
        with self._lock.writing():
            self.index.add_with_ids(vectors, new_ids)
            self._extend_ids(added, new_ids, item_ids, idx, None if content_vecs is None else np.asarray(content_vecs, dtype=np.float32))

    def replay(self, batches: Sequence[AddedBatch], source: Path) -> int:
        """Add logged batches that the index files do not hold yet; returns how many items came in.

        An item id the index already holds (it joined the catalogue) is skipped; a faiss id taken
        by another item gets a fresh one.
        """
        replayed = 0
        for batch in batches:
            keep = [i for i, item_id in enumerate(batch.item_ids) if item_id not in self._faiss_id_of]
            if len(keep) < len(batch.item_ids):
                log.warning("%s: %d logged item(s) already indexed, skipped", source, len(batch.item_ids) - len(keep))
            if not keep:
                continue
            faiss_ids = batch.faiss_ids[keep]
            if np.isin(faiss_ids, self.ids["faiss_id"].to_numpy()).any():
                faiss_ids = self._next_ids(len(keep))
            content = batch.arrays.get("content_vec")
            self.add(batch.arrays["item_vec"][keep], [batch.item_ids[i] for i in keep], content_vecs=None if content is None else content[keep], faiss_ids=faiss_ids)
            replayed += len(keep)
        return replayed

    # -- files -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> dict[str, Any]:
        """Write a new generation of the files, then index.json naming them (the atomic switch); returns index.json.

        A crash at any point leaves index.json naming a whole set, old or new; files of other
        generations are removed once the switch is made. ``log_offset``: the log bytes the files hold.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._save_lock:
            previous = read_json(directory / META_FILE) if (directory / META_FILE).is_file() else {}
            generation = int(previous.get("generation", -1)) + 1
            files = {"index": f"items.{generation}.faiss", "ids": f"ids.{generation}.parquet"}
            with atomic_path(directory / files["index"]) as tmp:
                faiss.write_index(self.index, str(tmp))
            write_parquet(self.ids, directory / files["ids"])
            if self.content_vecs is not None:
                files["content"] = f"content_vecs.{generation}.npy"
                with atomic_path(directory / files["content"]) as tmp:
                    with open(tmp, "wb") as handle:
                        np.save(handle, self.content_vecs)
            meta = {
                "type": self.kind,
                "dim": self.dim,
                "bias": self.bias,
                "count": self.count,
                "sha256": {role: sha256_file(directory / name) for role, name in files.items()},
                "params": self.params,
                f"ann_recall@{RECALL_AT}": round(self.recall, 4),
                "content_dim": None if self.content_vecs is None else int(self.content_vecs.shape[1]),
                "generation": generation,
                "files": files,
                "log_offset": self.log_end,
            }
            write_json(directory / META_FILE, meta)  # written last: the switch to this generation
            for stale in {*directory.glob("items.*faiss"), *directory.glob("ids*.parquet"), *directory.glob("content_vecs*.npy")}:
                if stale.name not in files.values():
                    stale.unlink(missing_ok=True)
        return meta

    @classmethod
    def load(cls, directory: str | Path, replay: bool = True) -> "ItemIndex":
        """Read the generation index.json names, check it, and replay the log of items added since (``replay``)."""
        directory = Path(directory)
        rebuild = f"rebuild it with `recsys index --run {directory.parent}`"
        if not (directory / META_FILE).is_file():
            raise RunError(f"{directory / META_FILE} is missing: run `recsys index --run {directory.parent}` first")
        try:
            meta = read_json(directory / META_FILE)
            files = meta.get("files", {"index": INDEX_FILE, "ids": IDS_FILE, "content": CONTENT_FILE})  # before generations
            sha256 = meta["sha256"] if isinstance(meta["sha256"], dict) else {"index": meta["sha256"]}
            count, kind, params = int(meta["count"]), meta["type"], dict(meta["params"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{directory / META_FILE} is not a valid index description ({type(exc).__name__}: {exc}): {rebuild}") from None
        needed = ["index", "ids"] + (["content"] if meta.get("content_dim") else [])
        for role in needed:
            path = directory / files[role]
            if not path.is_file():
                raise RunError(f"{path} is missing: {rebuild}")
            if role in sha256 and sha256_file(path) != sha256[role]:
                raise RunError(f"{path} does not match the checksum in {directory / META_FILE} (truncated or changed): {rebuild}")
        index_path, ids_path = directory / files["index"], directory / files["ids"]
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise RunError(f"{index_path} is not a readable FAISS index ({str(exc).strip().splitlines()[-1][:200]}): {rebuild}") from None
        if not isinstance(index, faiss.IndexIDMap2):
            raise RunError(f"{index_path} is not an id-mapped index: {rebuild}")
        try:
            ids = pl.read_parquet(ids_path)
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise RunError(f"{ids_path} is not a readable parquet file ({type(exc).__name__}): {rebuild}") from None
        if not (index.ntotal == len(ids) == count):
            raise RunError(f"{directory}: {index_path.name} holds {index.ntotal} vectors, {ids_path.name} {len(ids)} rows, {META_FILE} says {count}; {rebuild}")
        content_vecs = None
        if meta.get("content_dim"):
            path = directory / files["content"]
            try:
                content_vecs = np.load(path, mmap_mode="r")  # copied into a buffer with room for adds (_set_ids): one copy in memory, not two
            except (OSError, ValueError) as exc:
                raise RunError(f"{path} is not a readable .npy file ({exc}): {rebuild}") from None
            if content_vecs.shape != (len(ids), meta["content_dim"]):
                raise RunError(f"{path} holds {content_vecs.shape}, expected ({len(ids)}, {meta['content_dim']}); {rebuild}")
        knob = _knob_name(kind)
        if knob and knob in params:
            _set_knob(index, kind, int(params[knob]))
        item_index = cls(index, kind, ids, params, recall=float(meta.get(f"ann_recall@{RECALL_AT}", 1.0)), content_vecs=content_vecs, bias=bool(meta.get("bias", False)))
        item_index.log_end = int(meta.get("log_offset", 0))
        if replay:
            log_path = directory / LOG_FILE
            batches, log_end = read_log(log_path)
            item_index.added_texts = {item_id: text for batch in batches for item_id, text in zip(batch.item_ids, batch.texts)}
            item_index.replay([b for b in batches if b.offset >= item_index.log_end], log_path)
            item_index.log_end = max(item_index.log_end, log_end)
        return item_index


def compact_index(run: RunDir) -> dict[str, Any]:
    """``recsys index --compact``: fold the log of items added at serving time into the index files (no re-embedding)."""
    index = ItemIndex.load(run.index)
    before = read_json(run.index / META_FILE)
    meta = index.save(run.index)
    summary = {"count": meta["count"], "folded_items": meta["count"] - int(before["count"]), "log_offset": meta["log_offset"], "generation": meta["generation"]}
    log.info("index: compacted %s: %d items added at serving time folded in (%d items now)", run.index, summary["folded_items"], meta["count"])
    return summary


# -- the `recsys index` step ---------------------------------------------------------------
def build_index(run: RunDir) -> dict[str, Any]:
    """Item-tower vectors of the whole catalogue -> FAISS index in RUN/index/; returns the summary."""
    import torch
    from recsys.model import load_model

    started = time.perf_counter()
    cfg = run.config()
    model = load_model(run.model)
    items = pl.read_parquet(run.require(run.data / "items.parquet", "prepare"), columns=["item_id", "item_idx"])
    content = load_content(run, model)
    item_idx = items["item_idx"].to_numpy()
    vectors, content_vecs = catalogue_vectors(model, item_idx, content)
    queries = sample_queries(run, model, cfg.index.recall_queries, seed=cfg.data.seed, content_vecs=content_vecs, item_idx=item_idx)
    embedded_s = time.perf_counter() - started
    torch_threads = torch.get_num_threads()
    log.info("index: %d item vectors in %.1f s (%d threads); building %s", len(item_idx), embedded_s, torch_threads, cfg.index.kind)
    index = ItemIndex.build(vectors, item_idx, item_idx, items["item_id"], cfg.index, queries=queries, seed=cfg.data.seed, content_vecs=content_vecs, bias=model.retrieval_coordinate)
    kept, dropped = reembed_logged(model, index, run.index / LOG_FILE)
    meta = index.save(run.index)
    stale = run.index / "added_items.parquet"  # texts of items added at serving time before the log existed
    if stale.is_file():
        log.warning("index rebuilt from the catalogue: items added at serving time before the log (%s) are not in it; add them again or to items.parquet", stale)
        stale.unlink()
    summary = {
        **{k: v for k, v in meta.items() if k not in ("sha256", "files")},
        "added_items_kept": kept,
        "added_items_dropped": dropped,
        "calibration_queries": "user vectors of sampled training events" if queries is not None else "perturbed item vectors",
        "embed_s": round(embedded_s, 2),
        "build_s": round(time.perf_counter() - started - embedded_s, 2),
    }
    run.record("index", summary)
    log.info("index: %d items, %s %s, recall@100 %.3f", meta["count"], meta["type"], meta["params"], index.recall)
    return summary


def reembed_logged(model: Any, index: ItemIndex, log_path: Path) -> tuple[int, list[Any]]:
    """Items added at serving time (the log) through ``model``'s item tower, from their logged encoder outputs, into ``index``.

    Returns how many came in and the ids of those dropped: logged with text or image vectors of
    another dimension than this model's encoders (the run was re-embedded with other encoders).
    """
    import torch

    batches, log_end = read_log(log_path)
    kept, dropped = 0, []
    for batch in batches:
        n = len(batch.item_ids)
        content: dict[str, torch.Tensor] = {}
        mismatch = None
        for modality, used, dim in (("text", model.use_text, model.spec.text_dim), ("image", model.use_image, model.spec.image_dim)):
            vectors = batch.arrays.get(modality)
            if not used:
                continue
            if vectors is None:  # logged by a model without this modality: missing, as for any item without it
                content |= {modality: torch.zeros(n, dim), f"{modality}_mask": torch.zeros(n)}
            elif vectors.shape[1] != dim:
                mismatch = f"{modality} vectors of dim {vectors.shape[1]}, this model's encoder gives {dim}"
            else:
                content |= {modality: torch.from_numpy(vectors), f"{modality}_mask": torch.from_numpy(batch.arrays[f"{modality}_mask"])}
        if mismatch:
            log.warning("index: DROPPING %d item(s) added at serving time (%s): %s; add them again", n, batch.item_ids[:5], mismatch)
            dropped += batch.item_ids
            continue
        with torch.inference_mode():
            state = model.item_state(torch.zeros(n, dtype=torch.int64), **content)  # no id row: content only, as when they were added
        arrays = {**batch.arrays, "item_vec": state["item_vec"].numpy()}
        if "content_vec" in state:
            arrays["content_vec"] = state["content_vec"].numpy()
        kept += index.replay([AddedBatch(batch.faiss_ids, batch.item_ids, batch.texts, arrays)], log_path)
        index.added_texts.update(zip(batch.item_ids, batch.texts))
    index.log_end = log_end  # the files will hold the whole log
    if kept:
        log.info("index: %d item(s) added at serving time re-embedded from %s", kept, log_path)
    return kept, dropped


def load_content(run: RunDir, model: Any) -> dict[str, Any]:
    """RUN/content/embeddings.safetensors as torch tensors (row = item_idx; masks as float), checked against the model's dims."""
    from safetensors.torch import load_file

    path = run.content / "embeddings.safetensors"
    if not (model.use_text or model.use_image):
        return {}
    content = load_file(str(run.require(path, "embed")))
    for modality, used, dim in (("text", model.use_text, model.spec.text_dim), ("image", model.use_image, model.spec.image_dim)):
        if used and (modality not in content or content[modality].shape[1] != dim):
            found = content[modality].shape if modality in content else "nothing"
            raise RunError(f"{path}: the model expects {modality} vectors of dim {dim}, found {found}; re-run `recsys embed` and `recsys train`")
    return content


def catalogue_vectors(model: Any, item_idx: np.ndarray, content: dict[str, Any], batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray | None]:
    """Item-tower vectors ``(n, d)`` and the ranker's content vectors ``(n, C)`` (None without content) of ``item_idx`` (n,), float32."""
    import torch
    from tqdm.auto import tqdm

    from recsys.model import catalogue_states

    used = [m for m, on in (("text", model.use_text), ("image", model.use_image)) if on]
    matrices = {name: content[name].float() for m in used for name in (m, f"{m}_mask")}
    with torch.inference_mode():
        vectors, content_vecs = catalogue_states(
            model, torch.tensor(np.asarray(item_idx), dtype=torch.int64), matrices, batch_size,
            progress=lambda batches: tqdm(batches, desc="item tower", unit="batch", leave=False),
        )  # fmt: skip
    return vectors.numpy(), content_vecs.numpy() if content_vecs is not None else None


def sample_queries(run: RunDir, model: Any, count: int, seed: int, content_vecs: np.ndarray | None = None, item_idx: np.ndarray | None = None) -> np.ndarray | None:
    """User-tower vectors of sampled training events: the queries the service will see. (q, d)

    ``content_vecs`` (rows of ``item_idx``): the catalogue's content vectors, for the history content.
    """
    import torch

    from recsys.history import mean_content

    path = run.data / "train.parquet"
    if not path.is_file():
        return None
    events = pl.read_parquet(path, columns=["user_idx", "history"])
    if events.height == 0:
        return None
    events = events.sample(min(count, events.height), seed=seed)
    history = padded_history(events["history"], model.spec.history_len)  # (q, L)
    history = torch.from_numpy(history)
    table = None
    if content_vecs is not None:  # row = item_idx
        table = torch.zeros(model.spec.n_items, content_vecs.shape[1])
        table[torch.from_numpy(np.array(item_idx, dtype=np.int64))] = torch.from_numpy(np.array(content_vecs, dtype=np.float32))
    with torch.inference_mode():
        return model.user_vectors(torch.tensor(events["user_idx"].to_numpy()), history, mean_content(table, history)).numpy()
