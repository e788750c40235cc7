"""Batches for training: ``RUN/data`` parquet + ``RUN/content`` matrices -> dicts of tensors.

A split is held as columns once: 1-D torch tensors and the histories ragged
(``recsys.history.RaggedHistory``); a batch is a row slice, its histories padded to
``history_len``, plus the content rows of its items, looked up per batch (the content matrices
are inputs, not model parameters).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Literal

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from recsys.errors import DataError, RunError
from recsys.history import RaggedHistory
from recsys.rundir import RunDir

log = logging.getLogger("recsys.training")

Split = dict[str, torch.Tensor | RaggedHistory]  # "history" ragged, the rest 1-D tensors
READ_ROWS = 2_000_000  # a split file is read this many rows at a time (the polars frame of a read is transient)


@dataclass
class TrainingData:
    meta: dict
    train: Split
    valid: Split | None
    content: dict[str, torch.Tensor] = field(default_factory=dict)  # text, text_mask, image, image_mask (rows = item_idx)
    user_features: dict[str, int | None] = field(default_factory=dict)
    item_features: dict[str, int | None] = field(default_factory=dict)
    feature_values: dict[str, torch.Tensor] = field(default_factory=dict)  # user_cat, user_num, item_cat, item_num
    valid_rows: int = 0  # rows of valid.parquet (one rank's part may hold fewer, or repeats marked is_padding)

    @property
    def text_dim(self) -> int:
        return int(self.content["text"].shape[1]) if "text" in self.content else 0

    @property
    def image_dim(self) -> int:
        return int(self.content["image"].shape[1]) if "image" in self.content else 0


def read_split(path: Path, history_len: int, tasks: dict[str, bool], frame: pl.DataFrame | None = None, timestamps: bool = False) -> Split:
    """One split parquet -> columns: user_idx, item_idx, history (ragged, ``split["history"][rows]`` is ``(B, L)``), click, conversion, rating (NaN = unrated).

    ``frame``: rows of ``path`` already read (one rank's part); its ``is_padding`` column, if any, is kept.
    ``timestamps``: also the int64 ``timestamp`` column (what ``train.future_positives`` orders a user's clicks by).
    """
    frame = pl.read_parquet(path) if frame is None else frame
    required = ["user_idx", "item_idx", "history", "click"] + (["timestamp"] if timestamps else [])
    required += ["conversion"] if tasks.get("conversion") else []
    required += ["rating"] if tasks.get("rating") else []
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} ({frame.height} rows); rerun `recsys prepare`")
    split = {
        "user_idx": torch.from_numpy(frame["user_idx"].to_numpy().astype(np.int64)),
        "item_idx": torch.from_numpy(frame["item_idx"].to_numpy().astype(np.int64)),
        "history": RaggedHistory.from_column(frame["history"], history_len, longer="error"),
        "click": torch.from_numpy(frame["click"].to_numpy().astype(np.float32)),
    }
    if tasks.get("conversion"):
        split["conversion"] = torch.from_numpy(frame["conversion"].fill_null(0).to_numpy().astype(np.float32))
    if tasks.get("rating"):
        split["rating"] = torch.from_numpy(frame["rating"].cast(pl.Float32).fill_null(float("nan")).to_numpy().astype(np.float32))
    if timestamps:
        split["timestamp"] = torch.from_numpy(frame["timestamp"].to_numpy().astype(np.int64))
    if "is_padding" in frame.columns:
        split["is_padding"] = torch.from_numpy(frame["is_padding"].to_numpy().astype(bool))
    return split


def read_split_file(path: Path, history_len: int, tasks: dict[str, bool], read_rows: int = READ_ROWS, timestamps: bool = False) -> Split:
    """``read_split`` of the whole file's trained rows, read ``read_rows`` file rows at a time.

    Peak memory: the split held plus one read's polars frame, not the whole file's frame.
    """
    has_context = "context" in pl.scan_parquet(path).collect_schema().names()
    n_rows = pl.scan_parquet(path).select(pl.len()).collect().item()
    parts = [read_split(path, history_len, tasks, trained_slice(path, start, read_rows, has_context), timestamps) for start in range(0, max(n_rows, 1), read_rows)]
    return parts[0] if len(parts) == 1 else concat_splits(parts)


def trained_slice(path: str | Path, start: int, rows: int, has_context: bool) -> pl.DataFrame:
    """File rows ``[start, start + rows)`` (polars reads only the row groups they touch), less an update's context rows."""
    frame = pl.scan_parquet(path).slice(start, rows)
    return (frame.filter(~pl.col("context")).drop("context") if has_context else frame).collect()


def concat_splits(parts: list[Split]) -> Split:
    """The rows of ``parts`` one after another; each part's column is freed once it is copied (peak: the result plus one column)."""
    out: Split = {}
    for name in list(parts[0]):
        columns = [part.pop(name) for part in parts]
        out[name] = RaggedHistory.cat(columns) if isinstance(columns[0], RaggedHistory) else torch.cat(columns)
        del columns
    return out


def take_rows(split: Split, rows: torch.Tensor) -> Split:
    """The rows ``rows`` of ``split``, histories still ragged."""
    return {name: column.take(rows) if isinstance(column, RaggedHistory) else column[rows] for name, column in split.items()}


def feature_table(path: Path, idx_column: int | str, n_rows: int, declared: dict[str, int | None]) -> tuple[dict[str, int | None], torch.Tensor, torch.Tensor]:
    """users/items parquet -> (features, cat (n_rows, C) int64, num (n_rows, N) float32), row = index."""
    frame = pl.read_parquet(path)
    cats = sorted(c for c in frame.columns if c.startswith("cat_"))
    nums = sorted(c for c in frame.columns if c.startswith("num_"))
    features: dict[str, int | None] = {}
    for c in cats:
        card = declared.get(c) or int(frame[c].fill_null(0).max() or 0) + 1
        features[c] = int(card)
    features.update({c: None for c in nums})
    idx = frame[idx_column].to_numpy().astype(np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n_rows):
        raise DataError(f"{path}: column {idx_column} has values outside 0..{n_rows - 1} ({len(idx)} rows); meta.json and the file disagree")
    cat = np.zeros((n_rows, len(cats)), dtype=np.int64)
    num = np.zeros((n_rows, len(nums)), dtype=np.float32)
    for j, c in enumerate(cats):
        cat[idx, j] = np.clip(frame[c].fill_null(0).to_numpy().astype(np.int64), 0, features[c] - 1)
    for j, c in enumerate(nums):
        num[idx, j] = frame[c].cast(pl.Float32).fill_null(0.0).to_numpy()
    return features, torch.from_numpy(cat), torch.from_numpy(num)


def read_content(run: RunDir, n_items: int, use_text: bool, use_image: bool) -> dict[str, torch.Tensor]:
    """``RUN/content/embeddings.safetensors`` -> the modalities that are present and switched on."""
    path = run.content / "embeddings.safetensors"
    if not path.is_file():
        log.warning("no %s: text and image modalities are off (run `recsys embed --run %s` to add them)", path, run.root)
        return {}
    tensors = load_file(str(path))
    content: dict[str, torch.Tensor] = {}
    for modality, wanted in (("text", use_text), ("image", use_image)):
        if modality not in tensors:
            log.warning("%s has no %r embeddings: the %s modality is off", path, modality, modality)
            continue
        if not wanted:
            log.info("model.use_%s = false: the %s modality is off", modality, modality)
            continue
        matrix, mask = tensors[modality].float(), tensors[f"{modality}_mask"].float()
        if matrix.shape[0] != n_items or mask.shape[0] != n_items:
            raise RunError(f"{path}: {modality} has {matrix.shape[0]} rows, meta.json says n_items={n_items}; rerun `recsys embed --run {run.root}`")
        content[modality], content[f"{modality}_mask"] = matrix, mask
    return content


# -- each rank's part of a file ----------------------------------------------------------------
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
    lazy = trained_rows(path)
    if columns is not None:
        lazy = lazy.select(columns)
    n_rows = lazy.select(pl.len()).collect().item()
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


def trained_rows(path: str | Path) -> pl.LazyFrame:
    """The rows of a split file the trainer reads: all but an update's BASE rows kept only as history (``context``, features.update)."""
    lazy = pl.scan_parquet(path)
    return lazy.filter(~pl.col("context")).drop("context") if "context" in lazy.collect_schema().names() else lazy


def train_split(
    path: Path, history_len: int, tasks: dict[str, bool], memory_budget_mb: float, rank: int = 0, world_size: int = 1, timestamps: bool = False
) -> Split | StreamedSplit:
    """This rank's train rows in memory when their padded rows fit ``memory_budget_mb`` (0: always), else a ``StreamedSplit`` within it.

    ``world_size > 1``: the rank's part (``read_rank_part(..., "drop", interleave=True)``), streamed or not.
    ``timestamps``: the in-memory split also holds each row's timestamp (a streamed one never does).
    """
    n_rows, n_items = trained_rows(path).select(pl.len(), pl.col("history").list.len().sum()).collect(engine="streaming").row(0)
    rows, per_row = n_rows // world_size, bytes_per_row((n_items or 0) / max(n_rows, 1))
    fit = int(memory_budget_mb * 2**20 // per_row) if memory_budget_mb else rows
    if rows <= fit:
        if world_size > 1:
            return read_split(path, history_len, tasks, read_rank_part(path, rank, world_size, "drop", interleave=True), timestamps)
        return read_split_file(path, history_len, tasks, timestamps=timestamps)
    log.info("train: %d rows x %d B > train.memory_budget_mb = %d: read in chunks, about %d rows in memory", rows, per_row, memory_budget_mb, fit)
    return StreamedSplit(path, history_len, tasks, rows_in_memory=max(fit, 1), rank=rank, world_size=world_size)


def load_training_data(
    run: RunDir, use_text: bool = True, use_image: bool = True, rank: int = 0, world_size: int = 1, memory_budget_mb: float = 0, timestamps: bool = False
) -> TrainingData:
    """Everything the training job reads: meta, train/valid splits, feature tables, content.

    With ``world_size > 1`` the splits are this rank's part (``read_rank_part``):
    train rows ``rank, rank + N, ...`` (interleaved, so each rank spans the whole time range; the
    last ``n % N`` rows are left out), valid a contiguous range padded to equal length
    (``is_padding`` marks the repeats) for ``training.distributed.process_group.gather_to_rank0``.
    A train part (the whole split in one process, 1/N of it on each rank) beyond ``memory_budget_mb``
    is streamed (``train_split``), each rank reading only its rows of each chunk. ``timestamps``:
    the splits held in memory also carry each row's timestamp.
    """
    meta_path = run.require(run.data / "meta.json", "prepare")
    meta = json.loads(meta_path.read_text())
    history_len, tasks = int(meta["history_len"]), meta["tasks"]
    train_path, valid_path = run.require(run.data / "train.parquet", "prepare"), run.data / "valid.parquet"
    valid_rows = pl.scan_parquet(valid_path).select(pl.len()).collect().item() if valid_path.is_file() else 0
    train = train_split(train_path, history_len, tasks, memory_budget_mb, rank, world_size, timestamps)
    if world_size > 1:
        valid = read_split(valid_path, history_len, tasks, read_rank_part(valid_path, rank, world_size, "pad"), timestamps) if valid_rows else None
    else:
        valid = read_split_file(valid_path, history_len, tasks, timestamps=timestamps) if valid_rows else None
    data = TrainingData(
        meta=meta, train=train, valid=valid, content=read_content(run, int(meta["n_items"]), use_text, use_image), valid_rows=valid_rows
    )
    for side, n_key in (("user", "n_users"), ("item", "n_items")):
        path = run.data / f"{side}s.parquet"
        if path.is_file():
            features, cat, num = feature_table(path, f"{side}_idx", int(meta[n_key]), meta.get(f"{side}_features") or {})
        else:
            features, cat, num = {}, torch.zeros(int(meta[n_key]), 0, dtype=torch.int64), torch.zeros(int(meta[n_key]), 0)
        setattr(data, f"{side}_features", features)
        data.feature_values[f"{side}_cat"], data.feature_values[f"{side}_num"] = cat, num
    return data


def batches(split: Split, batch_size: int, content: dict[str, torch.Tensor], seed: int | None = None, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Row batches of ``split`` (shuffled by ``seed`` when given), each with its items' content rows.

    A ``StreamedSplit`` yields its own (chunk by chunk, shuffled within windows). ``skip``: the
    first this many batches of the same order are not built (a resume in the middle of an epoch).

    With content, also each row's history content summed per modality (``history_{m}_sum``
    (B, dim) and ``history_{m}_present`` (B,), the count of history items with that modality):
    what the user tower's history content is computed from (``RecsysModel._history_content_from_sums``).
    """
    if isinstance(split, StreamedSplit):  # read chunk by chunk
        yield from split.batches(batch_size, content, seed if seed is not None else 0, skip)
        return
    n = len(split["click"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.arange(n)
    for start in range(skip * batch_size, n, batch_size):
        yield make_batch(split, order[start : start + batch_size], content)


def make_batch(split: Split, rows: torch.Tensor, content: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows ``rows`` of ``split`` with their items' content rows and their histories' content sums."""
    batch = {name: column[rows] for name, column in split.items()}
    for name, matrix in content.items():
        batch[name] = matrix[batch["item_idx"]]
    batch.update(history_content_sums(batch["history"], content))
    return batch


def history_content_sums(history: torch.Tensor, content: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``history (B, L)`` 0-padded -> per modality the summed raw content ``(B, dim)`` and the count of items that have it ``(B,)``."""
    sums: dict[str, torch.Tensor] = {}
    for modality in ("text", "image"):
        if modality in content:
            present = content[f"{modality}_mask"][history].masked_fill(history == 0, 0)  # (B, L)
            sums[f"history_{modality}_sum"] = F.embedding_bag(history, content[modality], mode="sum", per_sample_weights=present)
            sums[f"history_{modality}_present"] = present.sum(1)
    return sums


# -- a train split beyond the memory budget ------------------------------------------------------
# A training split read from its parquet file chunk by chunk, for splits larger than ``train.memory_budget_mb``.
# 
# The in-memory split (``training.data.read_split``) holds every row's ids, labels and ragged
# history: ``36 + 4 m`` bytes a row for a mean of m history items (``bytes_per_row``), 59 on the
# 20M-row synthetic data of benchmarks/scale.py (m = 5.8), 236 when every history is L = 50 long,
# so ~2.4 GB at 10M full-length rows. A ``StreamedSplit`` holds only the
# 1-D columns the retrieval objective counts from (user_idx, item_idx, click: 20 bytes a row) and
# reads the rest per epoch, a window of ``WINDOW_CHUNKS`` chunks at a time:
# 
# - the file's rows are cut into chunks of ``chunk_rows`` consecutive rows (slices of the file:
#   polars reads only the row groups a slice touches);
# - each epoch visits the chunks in a seeded random order, ``WINDOW_CHUNKS`` at once; the rows of a
#   window (plus the rows left over from the last one, fewer than a batch) are shuffled, seeded,
#   and cut into batches, so a batch mixes rows of several parts of the file;
# - an update's ``context`` rows (BASE's rows kept only as history) are dropped as each chunk is read.
# 
# Every trained row is in exactly one batch per epoch, every batch but the last is full, and the
# order depends only on the seed (tested). Memory: the 1-D columns (20 bytes a row) plus at most
# ``2 x WINDOW_CHUNKS x chunk_rows`` rows (the budget's rows: a window's chunks and, while they
# are joined column by column, a copy of one column),
# whatever the file's length.
WINDOW_CHUNKS = 4  # chunks shuffled together
COUNTED = ("user_idx", "item_idx", "click")  # the columns held whole (what RetrievalObjective and the trained-item mask count)


def bytes_per_row(mean_history_items: float) -> int:
    """Memory of one in-memory training row with this many history items on average: int64 ids,
    float32 labels (click, conversion, rating), the history's int64 offset and int32 items."""
    return math.ceil(36 + 4 * mean_history_items)


class StreamedSplit:
    """A split file read in chunks (the comment above). ``split["click"]`` etc. are the whole 1-D columns;
    ``len(split)`` the trained rows; ``batches`` one epoch's batches."""

    def __init__(self, path: str | Path, history_len: int, tasks: dict[str, bool], rows_in_memory: int, rank: int = 0, world_size: int = 1):
        """``rank`` of ``world_size``: this rank's part of the trained rows, as ``read_rank_part(..., "drop", interleave=True)``
        takes it (trained rows r, r + N, ...; the last n % N left out), so every rank runs as many batches."""
        self.path, self.history_len, self.tasks = Path(path), history_len, tasks
        self.rank, self.world_size = rank, world_size
        scan = pl.scan_parquet(self.path)
        names = scan.collect_schema().names()
        missing = [c for c in ("history", *COUNTED) if c not in names]
        if missing:
            raise DataError(f"{self.path}: missing column(s) {', '.join(missing)}; rerun `recsys prepare`")
        self.has_context = "context" in names
        self.file_rows = scan.select(pl.len()).collect().item()
        self.chunk_rows = max(1, rows_in_memory // (2 * WINDOW_CHUNKS))  # room for a window and a copy of its largest column while its chunks are joined
        # trained rows before each chunk (an update's context rows are not trained): a row's index among the trained rows
        trained = ~scan.select("context").collect()["context"].to_numpy() if self.has_context else np.ones(self.file_rows, dtype=bool)
        per_chunk = np.add.reduceat(trained.astype(np.int64), np.arange(0, self.file_rows, self.chunk_rows)) if self.file_rows else np.zeros(0, np.int64)
        self._trained_before = np.concatenate([[0], np.cumsum(per_chunk)]).astype(np.int64)
        self._kept_rows = int(self._trained_before[-1]) // world_size * world_size  # the same count on every rank
        counted = (scan.filter(~pl.col("context")) if self.has_context else scan).select(COUNTED).collect()
        mine = self._mine(np.arange(counted.height, dtype=np.int64))
        self.columns: Split = {
            "user_idx": torch.from_numpy(counted["user_idx"].to_numpy().astype("int64")[mine]),
            "item_idx": torch.from_numpy(counted["item_idx"].to_numpy().astype("int64")[mine]),
            "click": torch.from_numpy(counted["click"].to_numpy().astype("float32")[mine]),
        }

    def _mine(self, trained_index: np.ndarray) -> np.ndarray:
        """Which of these trained rows (their index among all trained rows) are this rank's."""
        return (trained_index % self.world_size == self.rank) & (trained_index < self._kept_rows)

    @property
    def n_chunks(self) -> int:
        return -(-self.file_rows // self.chunk_rows)

    def __len__(self) -> int:
        return len(self.columns["click"])

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.columns:
            raise KeyError(f"{name!r}: a streamed split holds only {', '.join(COUNTED)} whole; read its batches instead")
        return self.columns[name]

    def _chunk(self, index: int) -> Split:
        frame = trained_slice(self.path, index * self.chunk_rows, self.chunk_rows, self.has_context)
        if self.world_size > 1:
            frame = frame.filter(pl.Series(self._mine(self._trained_before[index] + np.arange(frame.height, dtype=np.int64))))
        return read_split(self.path, self.history_len, self.tasks, frame)

    def batches(self, batch_size: int, content: dict[str, torch.Tensor], seed: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch: every trained row once, in batches of ``batch_size`` (the last may be smaller), in an order set by ``seed``.

        ``skip``: the first this many batches are not built (their windows are still read: the
        order of the rest depends on them).
        """
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.n_chunks, generator=generator).tolist()
        carry: Split | None = None
        index = 0
        for start in range(0, len(order), WINDOW_CHUNKS):
            parts = [self._chunk(i) for i in order[start : start + WINDOW_CHUNKS]]
            window = concat_splits(([carry] if carry is not None else []) + parts)
            del parts
            n = len(window["click"])
            shuffled = torch.randperm(n, generator=generator)
            full = n - n % batch_size if start + WINDOW_CHUNKS < len(order) else n  # the epoch's last window yields its remainder too
            for at in range(0, full, batch_size):
                if index >= skip:
                    yield make_batch(window, shuffled[at : at + batch_size], content)
                index += 1
            carry = take_rows(window, shuffled[full:]) if full < n else None
