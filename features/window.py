"""One dataset from a window of day directories (``recsys data window``).

``DIR/dayNN/`` are datasets of the contract, one per day (``recsys data synth --days``). A window
names the days of each split (``--train 1-7 --valid 7 --test 8``: valid days leave train) and
becomes one dataset: the named days' interactions in day order with a ``split`` column, the
catalogue (``items.parquet``, ``users.parquet``) of the last day named, its images linked the way
the day directories have them, and the oracle files when the days have them (``truth.parquet``
concatenated in the same row order, ``truth_items`` / ``truth_users`` of the last day).
``window.json`` records the days and row counts.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import polars as pl

from features.dataset import INTERACTIONS, ITEMS, USERS
from features.synth_stream import day_dir, link_dir
from recsys.errors import ConfigError, DataError
from recsys.rundir import write_json, write_parquet

TRUTH = "truth.parquet"
LAST_DAY_FILES = (ITEMS, USERS, "truth_items.parquet", "truth_users.parquet")  # taken from the last day named, when present
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_days(spec: str, flag: str) -> list[int]:
    """``"1-7"``, ``"8"``, ``"8,9"``, ``"1-3,5"`` -> sorted distinct day numbers (1-based)."""
    days: set[int] = set()
    for part in str(spec).split(","):
        match = _RANGE.match(part)
        if match is None:
            raise ConfigError(f"{flag} {spec!r}: {part.strip()!r} is not a day or a range; write days like 1-7, 8 or 8,9")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if first < 1 or last < first:
            raise ConfigError(f"{flag} {spec!r}: the range {part.strip()!r} is empty (days count from 1, first <= last)")
        days.update(range(first, last + 1))
    return sorted(days)


def assemble_window(source: Path, out: Path, train: str, test: str, valid: str | None = None) -> dict[str, Any]:
    """Write one contract dataset to ``out`` from the day directories of ``source``; returns window.json's body."""
    source, out = Path(source), Path(out)
    splits = _split_days(train, test, valid)
    folders = {day: _day_folder(source, day) for days in splits.values() for day in days}
    days = sorted(folders)
    last = folders[days[-1]]
    if out.exists() and not out.is_dir():
        raise DataError(f"window: --out {out} exists and is not a directory")
    if out.resolve() in {f.resolve() for f in folders.values()} or out.resolve() == source.resolve():
        raise DataError(f"window: --out {out} is the source or one of its day directories; write the window elsewhere")
    split_of = {day: name for name, named in splits.items() for day in named}

    frames = [pl.read_parquet(folders[day] / INTERACTIONS).drop("split", strict=False).with_columns(split=pl.lit(split_of[day])) for day in days]
    _check_same_columns(frames, [folders[day] / INTERACTIONS for day in days])
    interactions = pl.concat(frames)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(interactions, out / INTERACTIONS)

    with_truth = [day for day in days if (folders[day] / TRUTH).is_file()]
    if with_truth and len(with_truth) < len(days):
        missing = [folders[d].name for d in days if d not in with_truth]
        raise DataError(f"window: {TRUTH} is in some day directories but not in {missing}; regenerate them or drop those days")
    if with_truth:
        truth = pl.concat([pl.read_parquet(folders[day] / TRUTH) for day in days])
        if truth.height != interactions.height:
            raise DataError(f"window: {TRUTH} has {truth.height:,} rows but {INTERACTIONS} {interactions.height:,}; regenerate the days")
        write_parquet(truth, out / TRUTH)
    for name in LAST_DAY_FILES:
        if (last / name).is_file():
            shutil.copyfile(last / name, out / name)
        elif (out / name).exists():
            (out / name).unlink()  # a leftover of an earlier window would not match this catalogue
    images = _link_images(last, out)

    counts = interactions.group_by("split").len().rows()
    summary = {
        "out": str(out),
        "source": str(source),
        "days": {name: named for name, named in splits.items()},
        "catalogue_day": days[-1],
        "rows": {name: dict(counts).get(name, 0) for name in splits},
        "items": pl.scan_parquet(out / ITEMS).select(pl.len()).collect().item(),
        "images": images,
        "truth": bool(with_truth),
    }
    write_json(out / "window.json", summary)
    return summary


def _split_days(train: str, test: str, valid: str | None) -> dict[str, list[int]]:
    """Days per split; valid days leave train; train/test and valid/test must not share a day."""
    train_days, test_days = parse_days(train, "--train"), parse_days(test, "--test")
    valid_days = parse_days(valid, "--valid") if valid is not None else []
    for flag, spec, named in (("--train", train, train_days), ("--valid", valid, valid_days)):
        shared = sorted(set(named) & set(test_days))
        if shared:
            raise ConfigError(f"{flag} {spec} and --test {test} share day(s) {shared}; a day belongs to one split")
    train_days = [day for day in train_days if day not in valid_days]
    if not train_days:
        raise ConfigError(f"--train {train} leaves no day once the --valid days {valid} are taken out; give train days of its own")
    splits = {"train": train_days, "valid": valid_days, "test": test_days}
    return {name: named for name, named in splits.items() if named}


def _day_folder(source: Path, day: int) -> Path:
    """``source/dayNN``, checked to hold a dataset."""
    folder = day_dir(source, day)
    if not (folder / INTERACTIONS).is_file() or not (folder / ITEMS).is_file():
        present = sorted(p.name for p in source.glob("day[0-9][0-9]") if p.is_dir()) if source.is_dir() else []
        found = f"found {present[0]} .. {present[-1]} ({len(present)} days)" if present else "found no dayNN directories"
        raise DataError(
            f"window: day {day} needs {folder} with {INTERACTIONS} and {ITEMS}; {found} in {source}. "
            "Fix: name only days that exist, or generate them with `recsys data synth --days D --out DIR`"
        )
    return folder


def _check_same_columns(frames: list[pl.DataFrame], paths: list[Path]) -> None:
    first = frames[0].schema
    for frame, path in zip(frames[1:], paths[1:]):
        if frame.schema != first:
            raise DataError(f"window: {path} has columns {dict(frame.schema)} but {paths[0]} has {dict(first)}; the days must share one schema")


def _link_images(last: Path, out: Path) -> bool:
    """``out/images`` -> the last day's images (resolved: the day's own link points into the stream)."""
    images = last / "images"
    if not images.is_dir():
        if (out / "images").is_symlink():
            (out / "images").unlink()  # an earlier window's link: this catalogue has no images
        return False
    link_dir(out / "images", images.resolve())
    return True
