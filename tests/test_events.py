"""The event log (recsys.events): durable appends, rolls into parquet segments, torn tails, crashes mid-roll, two writers."""

from __future__ import annotations

import polars as pl
import pytest

from recsys.errors import RunError
from recsys.events import COLUMNS, EventLog, event_schema, read_events, require_events

SCHEMA = event_schema(pl.String, pl.Int64)


def batch(users: list[str], start: int = 0) -> dict[str, list]:
    n = len(users)
    return {
        "user_id": users, "item_id": list(range(start, start + n)), "timestamp": list(range(100 + start, 100 + start + n)),
        "click": [1] * n, "conversion": [None] * n, "rating": [None] * n, "received_ms": [0] * n,
    }  # fmt: skip


def test_appends_roll_into_parquet_segments_and_read_back_in_arrival_order(tmp_path):
    log = EventLog(tmp_path / "events", SCHEMA, segment_rows=4)
    for i in range(5):
        log.append(batch([f"u{i}", f"v{i}"], start=10 * i))
    names = sorted(path.name for path in (tmp_path / "events").iterdir() if not path.name.startswith("."))
    assert names == ["part-00000001.parquet", "part-00000002.parquet", "wal-00000003.log"]  # 4, 4 and the open 2
    frame = read_events(tmp_path / "events", SCHEMA)
    assert frame.columns == list(COLUMNS) and frame.schema == pl.Schema(SCHEMA)
    assert frame["user_id"].to_list() == [name for i in range(5) for name in (f"u{i}", f"v{i}")]
    assert frame["item_id"].to_list() == [10 * i + j for i in range(5) for j in range(2)]


def test_a_torn_last_frame_is_never_read_and_the_next_append_cuts_it(tmp_path):
    log = EventLog(tmp_path / "events", SCHEMA)
    log.append(batch(["a"]))
    wal = tmp_path / "events" / "wal-00000001.log"
    whole = wal.read_bytes()
    log.append(batch(["b"]))
    wal.write_bytes(wal.read_bytes()[: len(whole) + 10])  # a crash mid-append of "b": never acknowledged
    assert read_events(tmp_path / "events", SCHEMA)["user_id"].to_list() == ["a"]
    EventLog(tmp_path / "events", SCHEMA).append(batch(["c"]))  # a restarted writer
    assert read_events(tmp_path / "events", SCHEMA)["user_id"].to_list() == ["a", "c"]
    assert len(wal.read_bytes()) == 2 * len(whole)  # the torn bytes are gone


def test_corruption_before_whole_frames_is_an_error_naming_the_file(tmp_path):
    log = EventLog(tmp_path / "events", SCHEMA)
    log.append(batch(["a"]))
    log.append(batch(["b"]))
    wal = tmp_path / "events" / "wal-00000001.log"
    data = bytearray(wal.read_bytes())
    data[30] ^= 0xFF  # inside the first frame
    wal.write_bytes(bytes(data))
    with pytest.raises(RunError, match="wal-00000001.log: record at byte 0 is corrupt"):
        read_events(tmp_path / "events", SCHEMA)


def test_a_crash_between_writing_a_segment_and_removing_its_log_reads_each_event_once(tmp_path):
    log = EventLog(tmp_path / "events", SCHEMA, segment_rows=100)
    log.append(batch(["a", "b"]))
    wal = tmp_path / "events" / "wal-00000001.log"
    kept = wal.read_bytes()
    log.roll()
    wal.write_bytes(kept)  # as if the process died after the segment's rename, before the unlink
    assert read_events(tmp_path / "events", SCHEMA)["user_id"].to_list() == ["a", "b"]
    EventLog(tmp_path / "events", SCHEMA).append(batch(["c"]))  # goes to a new log, not the rolled one
    assert read_events(tmp_path / "events", SCHEMA)["user_id"].to_list() == ["a", "b", "c"]


def test_two_writers_on_one_directory_lose_nothing(tmp_path):
    first, second = (EventLog(tmp_path / "events", SCHEMA, segment_rows=3) for _ in range(2))
    for i in range(6):
        (first if i % 2 == 0 else second).append(batch([f"u{i}"]))
    assert read_events(tmp_path / "events", SCHEMA)["user_id"].to_list() == [f"u{i}" for i in range(6)]


def test_without_a_schema_ids_keep_their_json_types(tmp_path):
    EventLog(tmp_path / "events", SCHEMA).append(batch(["a"]))
    assert read_events(tmp_path / "events").schema["item_id"] == pl.Int64


def test_a_run_without_events_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="holds no event log"):
        require_events(tmp_path)
