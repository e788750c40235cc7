"""Append-only logs of checksummed frames, durable on return: the items added at serving time
(``serving.journal``) and the live events (``recsys.events``) are both written this way.

A frame is, little-endian::

    magic (4 bytes) | header bytes (u32) | body bytes (u64) | crc32 of header + body (u32) | header | body

A crash mid-append leaves a torn last frame; it was never acknowledged, so readers stop before
it and the next append cuts it off. A bad frame with whole frames after it is corruption, and
reading fails naming the file and the offset.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from recsys.errors import RunError
from recsys.rundir import fsync_directory

log = logging.getLogger("recsys")

FRAME = struct.Struct("<4sIQI")


@dataclass(frozen=True)
class Frame:
    header: bytes
    data: bytes  # the whole file: the body is data[body_start:end] (no copy)
    body_start: int
    offset: int  # where the frame starts in the file
    end: int  # where the next frame starts


def encode_frame(magic: bytes, header: bytes, body: bytes = b"") -> bytes:
    return FRAME.pack(magic, len(header), len(body), zlib.crc32(header + body)) + header + body


def decode_frame(data: bytes, pos: int, magic: bytes) -> Frame | None:
    """The frame at ``pos``, or None when it is torn or fails its checksum."""
    if pos + FRAME.size > len(data):
        return None
    found, header_len, body_len, crc = FRAME.unpack_from(data, pos)
    start = pos + FRAME.size
    end = start + header_len + body_len
    if found != magic or end > len(data) or zlib.crc32(data[start:end]) != crc:
        return None
    return Frame(data[start : start + header_len], data, start + header_len, pos, end)


def read_frames(path: Path, magic: bytes, what: str) -> tuple[list[Frame], int]:
    """Every whole frame of the log at ``path`` and the offset where they end ([], 0 when there is none).

    ``what`` names the log's records in the corruption error ("the items added at serving time").
    """
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    frames, pos = [], 0
    while pos < len(data):
        frame = decode_frame(data, pos, magic)
        if frame is None:
            later = data.find(magic, pos + 1)
            while later != -1:
                if decode_frame(data, later, magic) is not None:  # whole frames after a bad one: not a torn tail
                    raise RunError(
                        f"{path}: record at byte {pos} is corrupt and records follow it; "
                        f"{what} after it cannot be trusted (restore the file, or move it away to drop them)"
                    )
                later = data.find(magic, later + 1)
            log.warning("%s: ignoring a torn last record (%d bytes at %d): a write that was never acknowledged", path, len(data) - pos, pos)
            break
        frames.append(frame)
        pos = frame.end
    return frames, pos


def append_frame(path: Path, frame: bytes, expected_end: int) -> int:
    """Append ``frame`` durably (written and fsynced on return); returns the log's new end.

    ``expected_end`` is where the caller's view of the log ends: bytes beyond it are a torn frame
    from a crash (never acknowledged) and are cut off first.
    """
    created = not path.exists()
    with open(path, "r+b" if not created else "w+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # two writers never interleave frames
        size = os.fstat(handle.fileno()).st_size
        if size != expected_end:
            if size < expected_end:
                raise RunError(f"{path} is shorter ({size} bytes) than this process wrote ({expected_end}): it was replaced under it; reload the run")
            log.warning("%s: cutting %d bytes after the last whole record (a torn append)", path, size - expected_end)
            handle.truncate(expected_end)
        handle.seek(expected_end)
        handle.write(frame)
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_directory(path.parent)  # the new file's name is durable too
    return expected_end + len(frame)
