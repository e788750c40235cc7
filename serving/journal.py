"""The append-only log of items added at serving time: ``RUN/index/added_items.log``.

POST /items appends one record per call and fsyncs it before it answers 201, so the cost of an
add is the new items, not the index. Loading an index replays the records past the
``log_offset`` its ``index.json`` says the index files already hold; ``recsys index --compact``
folds the log into the files (the log stays: it is the record of every item added live, which
``recsys index`` re-embeds with the run's model when it rebuilds from the catalogue).

A record is one frame, little-endian::

    b"RSA1" | header bytes (u32) | body bytes (u64) | crc32 of header + body (u32) | header | body

The header is JSON (faiss ids, item ids, texts, and the name and shape of each array); the body
the arrays as float32 in that order: ``item_vec`` (n, d), ``content_vec`` (n, C) when the ranker
keeps one, and the encoders' outputs (``text``, ``text_mask``, ``image``, ``image_mask``) a
rebuild needs. A crash mid-append leaves a torn last frame; it was never acknowledged, so readers
stop before it and the next append cuts it off. A bad frame with whole frames after it is
corruption, and loading fails naming the file and the offset.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.errors import RunError
from recsys.rundir import fsync_directory

log = logging.getLogger("recsys")

LOG_FILE = "added_items.log"
MAGIC = b"RSA1"
FRAME = struct.Struct("<4sIQI")


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
        return FRAME.pack(MAGIC, len(header), len(body), zlib.crc32(header + body)) + header + body


def _decode(data: bytes, pos: int) -> AddedBatch | None:
    """The frame at ``pos``, or None when it is torn or fails its checksum."""
    if pos + FRAME.size > len(data):
        return None
    magic, header_len, body_len, crc = FRAME.unpack_from(data, pos)
    start = pos + FRAME.size
    end = start + header_len + body_len
    if magic != MAGIC or end > len(data) or zlib.crc32(data[start:end]) != crc:
        return None
    header = json.loads(data[start : start + header_len])
    arrays, cursor = {}, start + header_len
    for name, shape in header["arrays"]:
        count = int(np.prod(shape)) if shape else 1
        arrays[name] = np.frombuffer(data, dtype="<f4", count=count, offset=cursor).reshape(shape).astype(np.float32)
        cursor += 4 * count
    return AddedBatch(np.asarray(header["faiss_ids"], dtype=np.int64), header["item_ids"], header["texts"], arrays, pos, end)


def read_log(path: Path) -> tuple[list[AddedBatch], int]:
    """Every whole record of the log at ``path`` and the offset where they end (0, [] when there is none)."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    batches, pos = [], 0
    while pos < len(data):
        batch = _decode(data, pos)
        if batch is None:
            later = data.find(MAGIC, pos + 1)
            while later != -1:
                if _decode(data, later) is not None:  # whole records after a bad one: not a torn tail
                    raise RunError(
                        f"{path}: record at byte {pos} is corrupt and records follow it; "
                        f"the items added at serving time after it cannot be trusted (restore the file, or move it away to drop them)"
                    )
                later = data.find(MAGIC, later + 1)
            log.warning("%s: ignoring a torn last record (%d bytes at %d): an add that was never acknowledged", path, len(data) - pos, pos)
            break
        batches.append(batch)
        pos = batch.end
    return batches, pos


def append_log(path: Path, batch: AddedBatch, expected_end: int) -> int:
    """Append ``batch`` durably (written and fsynced on return); returns the log's new end.

    ``expected_end`` is where the caller's view of the log ends: bytes beyond it are a torn record
    from a crash (never acknowledged) and are cut off first.
    """
    created = not path.exists()
    frame = batch.encode()
    with open(path, "r+b" if not created else "w+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # two writers never interleave frames
        size = os.fstat(handle.fileno()).st_size
        if size != expected_end:
            if size < expected_end:
                raise RunError(f"{path} is shorter ({size} bytes) than the service wrote ({expected_end}): it was replaced under the service; reload the run")
            log.warning("%s: cutting %d bytes after the last whole record (a torn append)", path, size - expected_end)
            handle.truncate(expected_end)
        handle.seek(expected_end)
        handle.write(frame)
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_directory(path.parent)  # the new file's name is durable too
    return expected_end + len(frame)
