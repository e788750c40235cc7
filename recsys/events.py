"""The event log of a served run: ``RUN/events/``, every event POST /events accepted.

The service appends each accepted batch to a write-ahead log and fsyncs it before it answers, so
an acknowledged event survives a kill -9. Every ``segment_rows`` events the log is rolled into an
immutable parquet segment::

    RUN/events/wal-00000003.log        frames of recsys.framelog (magic RSE1), a JSON header each
    RUN/events/part-00000001.parquet   the events of wal 1, rolled
    RUN/events/part-00000002.parquet

A roll writes the segment atomically and only then removes its log, so a crash between the two
leaves both, and readers take the segment. ``read_events`` returns every event in arrival order;
it is what ``recsys update --events RUN`` trains on. The columns follow the dataset contract's
``interactions.parquet`` (user_id, item_id, timestamp, click, conversion, rating) plus
``received_ms``, the service's clock when it accepted the event.
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import polars as pl

from recsys.errors import RunError
from recsys.framelog import append_frame, encode_frame, read_frames
from recsys.rundir import fsync_directory, write_parquet

log = logging.getLogger("recsys")

EVENTS_DIR = "events"
MAGIC = b"RSE1"
LABELS = {"timestamp": pl.Int64, "click": pl.Int8, "conversion": pl.Int8, "rating": pl.Float64, "received_ms": pl.Int64}
COLUMNS = ("user_id", "item_id", *LABELS)
_NAME = re.compile(r"^(wal|part)-(\d{8})\.(log|parquet)$")


def event_schema(user_dtype: pl.DataType, item_dtype: pl.DataType) -> dict[str, pl.DataType]:
    return {"user_id": user_dtype, "item_id": item_dtype, **LABELS}


def _files(directory: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    """(wal seq -> path, part seq -> path) of the log's directory."""
    wals, parts = {}, {}
    if directory.is_dir():
        for path in directory.iterdir():
            match = _NAME.match(path.name)
            if match and (match[1] == "wal") == (match[3] == "log"):
                (wals if match[1] == "wal" else parts)[int(match[2])] = path
    return wals, parts


def _wal_frame(path: Path, schema: dict[str, pl.DataType] | None) -> tuple[pl.DataFrame, int]:
    """The events of one write-ahead log and the offset where its whole frames end."""
    frames, end = read_frames(path, MAGIC, "the events logged")
    batches = [json.loads(frame.header)["columns"] for frame in frames]
    columns = {name: [value for batch in batches for value in batch[name]] for name in COLUMNS}
    if schema is None:  # the ids' types as JSON gave them
        kinds = {name: {type(v) for v in columns[name]} for name in ("user_id", "item_id")}
        schema = event_schema(*(pl.Int64 if kinds[name] == {int} else pl.String for name in ("user_id", "item_id")))
    return pl.DataFrame(columns, schema=schema), end


def read_events(directory: str | Path, schema: dict[str, pl.DataType] | None = None) -> pl.DataFrame:
    """Every logged event of ``RUN/events`` in arrival order (an empty frame when there is none).

    ``schema`` (``event_schema``) casts the ids to the run's types; without it they keep the type
    JSON gave them (integers when every id is one, else strings).
    """
    directory = Path(directory)
    wals, parts = _files(directory)
    frames = []
    for seq in sorted(set(wals) | set(parts)):
        if seq in parts:
            frames.append(pl.read_parquet(parts[seq]))
        else:
            frames.append(_wal_frame(wals[seq], schema)[0])
    if schema is None and frames:
        schema = frames[0].schema
    frames = [frame.cast(schema) for frame in frames] if schema else frames  # type: ignore[arg-type]
    if not frames:
        return pl.DataFrame(schema=schema or event_schema(pl.String, pl.String))
    return pl.concat(frames)


class EventLog:
    """Appends batches of events durably to ``directory`` (one writer at a time, across processes)."""

    def __init__(self, directory: str | Path, schema: dict[str, pl.DataType], segment_rows: int = 100_000):
        self.directory = Path(directory)
        self.schema = schema
        self.segment_rows = segment_rows
        self.seq, self.end, self.rows = 1, 0, 0  # the open write-ahead log, where its whole frames end, its events

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._sync()
            yield

    def _sync(self) -> None:
        """Catch up with the directory: the open log is the newest one not yet rolled (another writer may have appended or rolled)."""
        wals, parts = _files(self.directory)
        newest = max([*wals, *parts], default=0)
        seq = newest if newest in wals and newest not in parts else newest + 1
        if seq not in wals:
            self.seq, self.end, self.rows = seq, 0, 0
        elif not (seq == self.seq and wals[seq].stat().st_size == self.end):  # new to us, or bytes we did not write
            frame, self.end = _wal_frame(wals[seq], self.schema)
            self.seq, self.rows = seq, len(frame)

    @staticmethod
    def _wal_name(seq: int) -> str:
        return f"wal-{seq:08d}.log"

    def append(self, columns: dict[str, list[Any]]) -> None:
        """Log one batch (``COLUMNS`` -> equal-length lists); written and fsynced on return."""
        lengths = {len(columns[name]) for name in COLUMNS}
        if len(lengths) != 1:
            raise ValueError(f"event columns of unequal lengths: { {name: len(columns[name]) for name in COLUMNS} }")
        header = json.dumps({"columns": {name: list(columns[name]) for name in COLUMNS}}).encode()
        with self._locked():
            self.end = append_frame(self.directory / self._wal_name(self.seq), encode_frame(MAGIC, header), self.end)
            self.rows += lengths.pop()
            if self.rows >= self.segment_rows:
                self._roll()

    def roll(self) -> None:
        """Roll the open write-ahead log into a parquet segment now (a no-op when it is empty)."""
        with self._locked():
            if self.rows:
                self._roll()

    def _roll(self) -> None:
        wal = self.directory / self._wal_name(self.seq)
        frame, _ = _wal_frame(wal, self.schema)
        write_parquet(frame, self.directory / f"part-{self.seq:08d}.parquet")  # atomic, fsynced
        wal.unlink()
        fsync_directory(self.directory)
        log.info("event log %s: rolled %d events into part-%08d.parquet", self.directory, len(frame), self.seq)
        self.seq, self.end, self.rows = self.seq + 1, 0, 0


def require_events(run_root: Path) -> Path:
    """``RUN/events`` of a run whose service logged events, or a RunError saying there are none."""
    directory = run_root / EVENTS_DIR
    wals, parts = _files(directory)
    if not wals and not parts:
        raise RunError(f"{directory} holds no event log: `recsys serve` writes it as POST /events accepts events")
    return directory
