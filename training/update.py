"""``recsys update``: warm-start a trained run (BASE) on new logs into a new run (RUN2).

    recsys update --run BASE --data NEW --out RUN2          # NEW: a dataset of the interactions since BASE
    recsys update --run BASE --events SERVED --out RUN2     # the event log a service wrote (RUN/events)

Steps, each recorded in RUN2/update.json: prepare (``features.update``: vocabularies and tables
grow append-only, BASE's rows become history plus a replay sample) -> embed (BASE's content cache
is reused, so only new or changed items are encoded) -> train (``train.init_from = BASE``:
``training.warm_start``) -> index -> gate (``training.gate``: RUN2 against BASE on RUN2's test
rows, a paired bootstrap; the verdict lands in RUN2/update.json and a refused update exits
non-zero) -> evaluate (the report). RUN2/update.json names the parent, so updates chain (RUN2 -> RUN3).

Killed, the same command resumes: steps already recorded are skipped and training continues
from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl

from recsys.config import Config, load_config
from recsys.errors import ConfigError, RunError
from recsys.events import read_events, require_events
from recsys.rundir import PUBLISHED_FILE, RunDir, read_json, write_json, write_parquet

log = logging.getLogger("recsys")

UPDATE_FILE = "update.json"
STEPS = ("prepare", "embed", "train", "index", "gate", "evaluate")  # the verdict before the report: a refused update is known as soon as it can be


def update_config(base: RunDir, overrides: list[str] | None, nproc: int | None = None) -> Config:
    """BASE's config, the overrides, and the update's own settings (warm start from BASE)."""
    cfg = load_config(None, list(overrides or []), base=base.config())
    forced = [f"train.init_from={base.root.resolve()}"]
    if cfg.update.epochs:
        forced.append(f"train.epochs={cfg.update.epochs}")
    if nproc is not None:
        forced.append(f"train.nproc={nproc}")
    return load_config(None, forced, base=cfg)


def events_dataset(served: Path, out: Path, catalogue: Path) -> tuple[Path, dict[str, Any]]:
    """A dataset (DESIGN.md contract) of a service's event log: its events as interactions, ``catalogue``'s other files linked.

    Events naming items the catalogue lacks (items added live through POST /items) are left out and
    counted. An event without ``conversion`` did not convert; one without ``rating`` is unrated.
    """
    events = read_events(require_events(served))
    out.mkdir(parents=True, exist_ok=True)
    for entry in catalogue.iterdir():
        if entry.name != "interactions.parquet" and not (out / entry.name).exists():
            (out / entry.name).symlink_to(entry.resolve())
    items = pl.read_parquet(catalogue / "items.parquet", columns=["item_id"])
    events = events.with_columns(pl.col("item_id").cast(items.schema["item_id"]))
    known = events.join(items, on="item_id", how="semi")
    interactions = known.drop("received_ms").with_columns(pl.col("conversion").fill_null(0))  # an event that reports no conversion did not convert; no rating = unrated
    write_parquet(interactions, out / "interactions.parquet")
    return out, {"events": events.height, "left_out_unknown_items": events.height - known.height, "from": str(served)}


def link_cache(base: RunDir, run: RunDir) -> None:
    """Hard-link BASE's content cache into RUN2's (copies where links cannot be made): only new content is encoded."""
    cfg = run.config().embed
    source = base.content / "cache"
    if cfg.cache_dir or not source.is_dir() or (run.content / "cache").exists():
        return  # a shared cache directory is shared already

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, run.content / "cache", copy_function=link)


def start_update(base_dir: str | Path, out: str | Path, data: str | Path | None = None, events: str | Path | None = None, overrides: list[str] | None = None, nproc: int | None = None) -> tuple[RunDir, RunDir, Config, dict[str, Any]]:
    """Create RUN2 (or find the update in progress there): (RUN2, BASE, its config, RUN2/update.json)."""
    base = RunDir(base_dir)
    for path, step in ((base.model / "model.safetensors", "train"), (base.data / "meta.json", "prepare")):
        base.require(path, step)
    if (data is None) == (events is None):
        raise ConfigError("recsys update needs --data NEW (a dataset of the new interactions) or --events RUN (a service's event log), one of them")
    cfg = update_config(base, overrides, nproc)
    run = RunDir(out)
    record_path = run.root / UPDATE_FILE
    if record_path.is_file():  # resume
        record = read_json(record_path)
        if record["parent"] != str(base.root.resolve()) or run.config().digest() != cfg.digest():
            raise RunError(f"{run.root} holds an update of {record['parent']} with another config: choose a new --out, or remove it")
        log.info("update: resuming %s (done: %s)", run.root, ", ".join(record["steps_done"]) or "nothing")
        return run, base, cfg, record
    if run.root.exists() and any(run.root.iterdir()):
        raise RunError(f"--out {run.root} exists and is not an update in progress: choose a new directory")
    if events is not None:
        catalogue = Path(data) if data is not None else base.dataset_dir()
        data_dir, source = events_dataset(Path(events), run.root / "update" / "events_data", catalogue)
    else:
        data_dir, source = Path(data), {"data": str(Path(data).resolve())}  # type: ignore[arg-type]
        if not data_dir.is_dir():
            raise ConfigError(f"--data {data_dir}: no such dataset directory")
    run = RunDir.create(run.root, cfg, data_dir)
    parent = read_json(base.root / UPDATE_FILE) if (base.root / UPDATE_FILE).is_file() else {}
    record = {"parent": str(base.root.resolve()), "chain": [*parent.get("chain", []), str(base.root.resolve())], "source": source, "steps_done": [], "seconds": {}}
    write_json(record_path, record)
    return run, base, cfg, record


def is_done(run: RunDir, record: dict[str, Any], step: str) -> bool:
    summary = read_json(run.summary_path) if run.summary_path.is_file() else {}
    return step in record["steps_done"] and (step in summary or step == "gate")


def mark_done(run: RunDir, record: dict[str, Any], step: str, seconds: float) -> None:
    record["steps_done"].append(step)
    record["seconds"][step] = round(seconds, 2)
    write_json(run.root / UPDATE_FILE, record)


def steps() -> tuple[str, ...]:
    return STEPS


def has_checkpoint(run: RunDir) -> bool:
    return (run.model / "checkpoint" / "state.json").is_file()


def run_gate(run: RunDir, base: RunDir, cfg: Config, record: dict[str, Any]) -> None:
    """The gate (``update.gate``): RUN2 against BASE on RUN2's test rows; the verdict goes into ``record``."""
    if not cfg.update.gate:
        return
    from training.gate import gate, parse_max_drop

    record["gate"] = gate(run, base, parse_max_drop([cfg.update.max_drop]) if cfg.update.max_drop else None)


def finish_update(run: RunDir, base: RunDir, cfg: Config, record: dict[str, Any]) -> dict[str, Any]:
    """The verdict and the manifest; returns RUN2/update.json."""
    record["published"] = bool(record["gate"]["passed"]) if "gate" in record else True
    record["seconds_to_verdict"] = round(sum(v for k, v in record["seconds"].items() if k != "evaluate"), 2)
    write_json(run.root / UPDATE_FILE, record)
    run.write_manifest()
    verdict = "passed the gate" if record["published"] else "was REFUSED by the gate: do not publish it (the live model stays)"
    log.info("update: %s -> %s %s (%.1f s of steps)", base.root, run.root, verdict, sum(record["seconds"].values()))
    return record


# -- recsys update --follow ----------------------------------------------------------------
FOLLOW_FILE = "follow.json"  # in the follow directory: every generation, its parent and verdict


def follow_state(directory: Path, base: Path) -> dict[str, Any]:
    """The follower's record (``FOLLOW_FILE``), started at ``base`` when new."""
    path = directory / FOLLOW_FILE
    if path.is_file():
        state = read_json(path)
        if state["base"] != str(base.resolve()):
            raise RunError(f"{directory} follows {state['base']}, not {base}: choose another --out")
        return state
    directory.mkdir(parents=True, exist_ok=True)
    state = {"base": str(base.resolve()), "live": str(base.resolve()), "generations": []}
    write_json(path, state)
    return state


def save_follow_state(directory: Path, state: dict[str, Any]) -> None:
    write_json(directory / FOLLOW_FILE, state)


def pending_events(live: RunDir) -> tuple[int, int | None]:
    """Events in the live run's log past its data (count, the latest ``received_ms`` among them)."""
    events_dir = live.root / "events"
    if not events_dir.is_dir():
        return 0, None
    from features.update import data_cut
    from recsys.events import read_events

    cut = data_cut(live)
    news = read_events(events_dir).filter(pl.col("timestamp") > cut)
    return news.height, (int(news["received_ms"].max()) if news.height else None)


def publish(directory: Path, run: RunDir, generation: int, newest_event_ms: int | None) -> dict[str, Any]:
    """Point ``PUBLISHED_FILE`` at ``run`` (atomically): a service started with ``--follow directory`` reloads it."""
    now_ms = int(time.time() * 1000)
    record = {"run": str(run.root.resolve()), "generation": generation, "published_ms": now_ms,
              "newest_event_ms": newest_event_ms, "event_to_publish_s": round((now_ms - newest_event_ms) / 1000, 2) if newest_event_ms else None}  # fmt: skip
    write_json(directory / PUBLISHED_FILE, record)
    log.info("follow: published generation %d (%s)%s", generation, run.root, f", {record['event_to_publish_s']} s after its newest event" if newest_event_ms else "")
    return record
