"""The append-only log of items added at serving time: ``RUN/index/added_items.log``.

POST /items appends one record per call and fsyncs it before it answers 201, so the cost of an
add is the new items, not the index. Loading an index replays the records past the
``log_offset`` its ``index.json`` says the index files already hold; ``recsys index --compact``
folds the log into the files (the log stays: it is the record of every item added live, which
``recsys index`` re-embeds with the run's model when it rebuilds from the catalogue).

A record is one frame of ``recsys.framelog`` (magic ``RSA1``): its header is JSON (faiss ids,
item ids, texts, and the name and shape of each array), its body the arrays as float32 in that
order: ``item_vec`` (n, d), ``content_vec`` (n, C) when the ranker keeps one, and the encoders'
outputs (``text``, ``text_mask``, ``image``, ``image_mask``) a rebuild needs. A torn last frame
(a crash mid-append, never acknowledged) is ignored and cut off by the next append; a bad frame
with whole frames after it is corruption, and loading fails naming the file and the offset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.framelog import Frame, append_frame, encode_frame, read_frames

LOG_FILE = "added_items.log"
MAGIC = b"RSA1"


@dataclass
class AddedBatch:
    """The items of one POST /items call, as logged."""

    faiss_ids: np.ndarray  # (n,) int64
    item_ids: list[Any]
    texts: list[str | None]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 (n, ...) array
    offset: int = 0  # where its frame starts in the log
    end: int = 0  # where the next frame starts

    def encode(self) -> bytes:
        arrays = {name: np.ascontiguousarray(a, dtype="<f4") for name, a in self.arrays.items()}
        header = json.dumps({
            "faiss_ids": [int(i) for i in self.faiss_ids], "item_ids": list(self.item_ids), "texts": list(self.texts),
            "arrays": [[name, list(a.shape)] for name, a in arrays.items()],
        }).encode()  # fmt: skip
        body = b"".join(a.tobytes() for a in arrays.values())
        return encode_frame(MAGIC, header, body)


def _batch(frame: Frame) -> AddedBatch:
    header = json.loads(frame.header)
    arrays, cursor = {}, frame.body_start
    for name, shape in header["arrays"]:
        count = int(np.prod(shape)) if shape else 1
        arrays[name] = np.frombuffer(frame.data, dtype="<f4", count=count, offset=cursor).reshape(shape).astype(np.float32)
        cursor += 4 * count
    return AddedBatch(np.asarray(header["faiss_ids"], dtype=np.int64), header["item_ids"], header["texts"], arrays, frame.offset, frame.end)


def read_log(path: Path) -> tuple[list[AddedBatch], int]:
    """Every whole record of the log at ``path`` and the offset where they end (0, [] when there is none)."""
    frames, end = read_frames(path, MAGIC, "the items added at serving time")
    return [_batch(frame) for frame in frames], end


def append_log(path: Path, batch: AddedBatch, expected_end: int) -> int:
    """Append ``batch`` durably (written and fsynced on return); returns the log's new end.

    ``expected_end`` is where the caller's view of the log ends: bytes beyond it are a torn record
    from a crash (never acknowledged) and are cut off first.
    """
    return append_frame(path, batch.encode(), expected_end)
