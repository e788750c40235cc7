"""``recsys embed``: item text and image embeddings -> ``RUN/content/`` (docs/architecture.md).

Row i of every tensor is item_idx i; row 0 (padding) and items without a modality are zero
with mask 0. Vectors are cached by the sha256 of the content (the text string, the image
file's bytes) under a directory per encoder identity, so a re-run on an unchanged catalogue
encodes nothing and a changed item is re-encoded alone. Cache hits and misses count
distinct contents (two items with the same plot are one entry).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from features.encoders import IMAGE_CORRUPT, IMAGE_MISSING, IMAGE_OK, ImageEncoder, TextEncoder, build_image_encoder, build_text_encoder
from recsys.errors import DataError
from recsys.rundir import RunDir, atomic_path, read_json, write_json, write_parquet

log = logging.getLogger("recsys")

MAX_SHARDS = 8  # small shards (below SMALL_SHARD vectors) are merged into one beyond this many
SMALL_SHARD = 10_000  # shards of at least this many vectors (a part of a large embed) are never rewritten
PART_ITEMS = 50_000  # misses encoded and cached together: a killed embed keeps every finished part, and holds one part's inputs


def embed(run: RunDir) -> dict[str, Any]:
    """Embed every catalogue item's text and image; write RUN/content/ and return the step summary."""
    cfg = run.config().embed
    items = read_items(run.require(run.data / "items.parquet", "prepare"))
    n_rows = int(items["item_idx"].max()) + 1 if items.height else 1
    if (run.data / "meta.json").is_file():  # prepare's n_items (= I + 1) sizes every item table
        n_rows = max(n_rows, int(read_json(run.data / "meta.json").get("n_items", 0)))
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else run.content / "cache"
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    summary: dict[str, Any] = {"items": items.height}
    started = time.perf_counter()

    text_encoder = build_text_encoder(cfg)
    if text_encoder is not None:
        text = embed_texts(text_encoder, items, n_rows, EmbeddingCache(cache_root, text_encoder.identity))
        tensors["text"], tensors["text_mask"] = text.vectors, text.mask
        meta["text"] = {"model": cfg.text_model, "dim": text_encoder.dim, **text.counts, "identity": text_encoder.identity}
        summary["text"] = {**text.counts, **text.cache_counts, "items_per_s": text.items_per_s, "precision": text.precision}

    image_encoder = build_image_encoder(cfg)
    if image_encoder is not None:
        image = embed_images(image_encoder, items, n_rows, EmbeddingCache(cache_root, image_encoder.identity))
        tensors["image"], tensors["image_mask"] = image.vectors, image.mask
        meta["image"] = {"model": cfg.image_model, "dim": image_encoder.dim, **image.counts, "identity": image_encoder.identity}
        summary["image"] = {**image.counts, **image.cache_counts, "items_per_s": image.items_per_s, "precision": image.precision}

    parts = [summary[m] for m in ("text", "image") if m in summary]
    meta["cache"] = {"hits": sum(p["cache_hits"] for p in parts), "misses": sum(p["cache_misses"] for p in parts), "dir": str(cache_root)}

    if cfg.align and "text" in tensors and "image" in tensors:
        from features.align import align_and_impute

        imputed, align_summary = align_and_impute(tensors["text"], tensors["text_mask"], tensors["image"], tensors["image_mask"])
        tensors.update(imputed)
        meta["align"] = summary["align"] = align_summary

    run.content.mkdir(parents=True, exist_ok=True)
    with atomic_path(run.content / "embeddings.safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    write_json(run.content / "meta.json", meta)
    summary["cache"] = meta["cache"]
    summary["seconds"] = round(time.perf_counter() - started, 3)
    run.record("embed", summary)
    log.info("embed: %s", {m: {k: v for k, v in summary[m].items() if k != "precision"} for m in ("text", "image") if m in summary})
    return summary


def read_items(path: Path) -> pl.DataFrame:
    """RUN/data/items.parquet with its item_idx checked (unique, >= 1) and text/image columns present (null if absent)."""
    try:
        items = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"{path} is not a readable parquet file: {exc}") from None
    if "item_idx" not in items.columns:
        raise DataError(f"{path}: column 'item_idx' is missing; re-run `recsys prepare`")
    if items["item_idx"].null_count() or (items.height and int(items["item_idx"].min()) < 1):
        raise DataError(f"{path}: column 'item_idx' must be >= 1 and non-null (0 is the padding row)")
    duplicated = items.height - items["item_idx"].n_unique()
    if duplicated:
        raise DataError(f"{path}: column 'item_idx' has {duplicated} duplicated value(s); each item needs its own row")
    for column in ("text", "image"):
        if column not in items.columns:
            items = items.with_columns(pl.lit(None, dtype=pl.String).alias(column))
        elif items[column].dtype != pl.String:
            raise DataError(f"{path}: column {column!r} must be a string column, found {items[column].dtype}")
    return items


@dataclass
class Modality:
    """One modality's aligned output and its counts."""

    vectors: np.ndarray  # (n_rows, dim) float32
    mask: np.ndarray  # (n_rows,) uint8, 1 = observed
    counts: dict[str, int]
    cache_counts: dict[str, int]
    items_per_s: float | None  # encoding speed over the cache misses (None when nothing was encoded)
    precision: dict[str, Any] | None


def embed_texts(encoder: TextEncoder, items: pl.DataFrame, n_rows: int, cache: EmbeddingCache) -> Modality:
    """Text vectors for every item with a non-blank text; counts present / missing / truncated."""
    present = items.filter(pl.col("text").is_not_null() & (pl.col("text").str.strip_chars() != ""))
    texts = present["text"].to_list()
    keys = [hashlib.sha256(text.encode()).hexdigest() for text in texts]
    unique = dict(zip(keys, texts))
    vectors, truncated, hit = cache.lookup(list(unique), encoder.dim)
    miss_keys = [key for key, was_hit in zip(unique, hit) if not was_hit]
    seconds = 0.0
    if miss_keys:
        started = time.perf_counter()

        def encode(part: list[str]) -> tuple[np.ndarray, np.ndarray]:
            encoding = encoder.encode([unique[key] for key in part], progress=True)
            return encoding.vectors, encoding.truncated.astype(np.int8)

        vectors[~hit], flags = _encode_in_parts(miss_keys, encode, cache, "text")
        truncated[~hit] = flags.astype(bool)
        seconds = time.perf_counter() - started
    position = {key: i for i, key in enumerate(unique)}
    rows = [position[key] for key in keys]
    out, mask = _scatter(present["item_idx"].to_numpy(), vectors[rows], n_rows)
    counts = {"present": len(texts), "missing": items.height - len(texts), "truncated": int(truncated[rows].sum())}
    precision = encoder.precision.to_dict() if encoder.precision else None
    return Modality(out, mask, counts, _cache_counts(hit), _rate(len(miss_keys), seconds), precision)


def embed_images(encoder: ImageEncoder, items: pl.DataFrame, n_rows: int, cache: EmbeddingCache) -> Modality:
    """Image vectors for every item whose image file decodes; counts present / missing / corrupt."""
    idx = items["item_idx"].to_numpy()
    status = np.full(items.height, IMAGE_MISSING, dtype=np.int8)
    keys: list[str | None] = [None] * items.height
    content: dict[str, str] = {}
    missing_examples: list[str] = []
    for row, path in enumerate(items["image"].to_list()):
        if path is None or path.strip() == "":
            continue
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            missing_examples.append(path)
            continue
        except OSError:  # a directory, no permission: present but unusable
            status[row] = IMAGE_CORRUPT
            continue
        keys[row] = hashlib.sha256(data).hexdigest()
        content.setdefault(keys[row], path)  # the path, not the bytes: a part's files are read again when it is encoded
    if missing_examples:
        log.warning("embed: %d image file(s) not found, e.g. %s", len(missing_examples), missing_examples[:3])

    unique = list(content)
    vectors, flags, hit = cache.lookup(unique, encoder.dim)
    miss_keys = [key for key, was_hit in zip(unique, hit) if not was_hit]
    seconds = 0.0
    if miss_keys:
        started = time.perf_counter()

        def encode(part: list[str]) -> tuple[np.ndarray, np.ndarray]:
            encoding = encoder.encode([_read_bytes(content[key]) for key in part], progress=True)
            return encoding.vectors, encoding.status

        vectors[~hit], flags[~hit] = _encode_in_parts(miss_keys, encode, cache, "image")
        seconds = time.perf_counter() - started
    position = {key: i for i, key in enumerate(unique)}
    with_file = np.array([key is not None for key in keys], dtype=bool)
    status[with_file] = flags[[position[key] for key in keys if key is not None]]
    ok = status == IMAGE_OK
    out, mask = _scatter(idx[ok], vectors[[position[key] for key, good in zip(keys, ok) if good]], n_rows, dim=encoder.dim)
    counts = {"present": int(ok.sum()), "missing": int((status == IMAGE_MISSING).sum()), "corrupt": int((status == IMAGE_CORRUPT).sum())}
    precision = getattr(encoder, "precision", None)
    return Modality(out, mask, counts, _cache_counts(hit), _rate(len(miss_keys), seconds), precision.to_dict() if precision else None)


def _encode_in_parts(keys: list[str], encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]], cache: EmbeddingCache, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``encode`` the missed ``keys`` PART_ITEMS at a time, each part cached as soon as it is done; (vectors, flags) in key order."""
    vectors, flags = [], []
    starts = range(0, len(keys), PART_ITEMS)
    for number, start in enumerate(starts, 1):
        part = keys[start : start + PART_ITEMS]
        part_vectors, part_flags = encode(part)
        cache.add(part, part_vectors, part_flags)
        vectors.append(part_vectors)
        flags.append(part_flags)
        if len(starts) > 1:
            log.info("embed: %s part %d/%d cached (%d items)", what, number, len(starts), len(part))
    return np.concatenate(vectors), np.concatenate(flags)


def _read_bytes(path: str) -> bytes | None:
    """A file's bytes again (None if it went away since it was hashed: encoded as missing)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _scatter(item_idx: np.ndarray, vectors: np.ndarray, n_rows: int, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Place row vectors at their item_idx in an (n_rows, dim) zero matrix; the mask marks filled rows."""
    out = np.zeros((n_rows, vectors.shape[1] if dim is None else dim), dtype=np.float32)
    mask = np.zeros(n_rows, dtype=np.uint8)
    if len(item_idx):
        out[item_idx] = vectors
        mask[item_idx] = 1
    return out, mask


def _cache_counts(hit: np.ndarray) -> dict[str, int]:
    return {"cache_hits": int(hit.sum()), "cache_misses": int((~hit).sum())}


def _rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if count and seconds > 0 else None


class EmbeddingCache:
    """Content-addressed vectors of one encoder identity: safetensors shards + a parquet key table."""

    def __init__(self, root: Path, identity: str):
        self.dir = Path(root) / hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.table_path = self.dir / "keys.parquet"  # key (sha256 of content), shard, row, flag
        self.identity = identity

    def table(self) -> pl.DataFrame:
        if self.table_path.is_file():
            return pl.read_parquet(self.table_path)
        return pl.DataFrame(schema={"key": pl.String, "shard": pl.String, "row": pl.Int64, "flag": pl.Int8})

    def lookup(self, keys: list[str], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vectors (n, dim), flags (n,), hit (n,) bool); rows of misses are zero."""
        vectors = np.zeros((len(keys), dim), dtype=np.float32)
        flags = np.zeros(len(keys), dtype=np.int8)
        hit = np.zeros(len(keys), dtype=bool)
        if not keys:
            return vectors, flags, hit
        wanted = pl.DataFrame({"key": keys, "position": np.arange(len(keys))})
        found = wanted.join(self.table(), on="key", how="inner")
        for (shard,), group in found.group_by("shard"):
            try:
                stored = load_file(str(self.dir / shard))["vectors"]
            except (OSError, SafetensorError, KeyError):  # a deleted or damaged shard: its keys are misses
                log.warning("embed cache: shard %s is unreadable; its vectors will be re-encoded", self.dir / shard)
                continue
            if stored.shape[1] != dim:
                continue
            positions = group["position"].to_numpy()
            vectors[positions] = stored[group["row"].to_numpy()]
            flags[positions] = group["flag"].to_numpy()
            hit[positions] = True
        return vectors, flags, hit

    def add(self, keys: list[str], vectors: np.ndarray, flags: np.ndarray) -> None:
        """Store new vectors as one shard and record their keys (atomic writes)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "identity.txt").is_file():
            (self.dir / "identity.txt").write_text(self.identity + "\n")
        shard = f"shard-{uuid.uuid4().hex[:12]}.safetensors"
        with atomic_path(self.dir / shard) as tmp:
            save_file({"vectors": np.ascontiguousarray(vectors, dtype=np.float32)}, str(tmp))
        new = pl.DataFrame({"key": keys, "shard": shard, "row": np.arange(len(keys)), "flag": flags.astype(np.int8)})
        table = pl.concat([self.table(), new]).unique("key", keep="last", maintain_order=True)
        write_parquet(table, self.table_path)
        sizes = table["shard"].value_counts()
        if sizes.filter(pl.col("count") < SMALL_SHARD).height > MAX_SHARDS:
            self.compact(vectors.shape[1])

    def compact(self, dim: int) -> None:
        """Merge the small shards (fewer than SMALL_SHARD vectors of width ``dim``) into one; large shards are never rewritten."""
        table = self.table()
        sizes = table["shard"].value_counts()
        small = set(sizes.filter(pl.col("count") < SMALL_SHARD)["shard"].to_list())
        merged = table.filter(pl.col("shard").is_in(list(small)))
        vectors, flags, hit = self.lookup(merged["key"].to_list(), dim)
        keep = merged.filter(pl.Series(hit))
        shard = f"shard-{uuid.uuid4().hex[:12]}.safetensors"
        with atomic_path(self.dir / shard) as tmp:
            save_file({"vectors": np.ascontiguousarray(vectors[hit])}, str(tmp))
        keep = keep.with_columns(pl.lit(shard).alias("shard"), pl.Series("row", np.arange(keep.height)), pl.Series("flag", flags[hit]))
        write_parquet(pl.concat([table.filter(~pl.col("shard").is_in(list(small))), keep]), self.table_path)
        for name in small:
            (self.dir / name).unlink(missing_ok=True)
