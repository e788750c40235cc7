"""The run directory (layout fixed by DESIGN.md) and safe ways to write into it.

Every artifact is written atomically (temp file in the same directory, fsync, rename, fsync of
the directory), so a killed job or a power cut never leaves a half-written file that a later
step would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from recsys.config import Config, load_config, to_toml
from recsys.errors import RunError

log = logging.getLogger("recsys")

PUBLISHED_FILE = "published.json"  # `recsys update --follow OUT` writes OUT/published.json; `recsys serve --follow OUT` reloads what it names


class RunDir:
    """Paths of one run (``RUN/``) and its resolved config.

    ``overrides``: ``section.key=value`` applied on top of ``config.toml`` by ``config()``, never
    written back (``recsys serve --set serve.*`` serves a run with other serving settings).
    """

    def __init__(self, root: str | Path, overrides: tuple[str, ...] | list[str] = ()):
        self.root = Path(root)
        self.overrides = tuple(overrides)
        self.config_path = self.root / "config.toml"
        self.data = self.root / "data"
        self.quarantine = self.root / "data" / "quarantine"
        self.content = self.root / "content"
        self.model = self.root / "model"
        self.index = self.root / "index"
        self.predictions = self.root / "predictions"
        self.metrics_path = self.root / "metrics.json"
        self.report_html = self.root / "report.html"
        self.report_md = self.root / "report.md"
        self.manifest_path = self.root / "manifest.json"
        self.summary_path = self.root / "summary.json"
        self.gate_path = self.root / "gate.json"  # `recsys evaluate --gate LIVE`: this run against the live one
        self.train_log = self.root / "train_log.jsonl"
        self.source_path = self.root / "source.json"  # where the dataset came from

    # -- lifecycle ---------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, cfg: Config, data_dir: str | Path) -> "RunDir":
        """Start a run: write the resolved config and the dataset location."""
        run = cls(root)
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config_path, to_toml(cfg))
        write_json(run.source_path, {"data": str(Path(data_dir).resolve())})
        return run

    def config(self) -> Config:
        if not self.config_path.is_file():
            raise RunError(f"{self.root} is not a run directory (no config.toml); start one with `recsys run --data DIR --out {self.root}`")
        return load_config(self.config_path, list(self.overrides))

    def dataset_dir(self) -> Path:
        if not self.source_path.is_file():
            raise RunError(f"{self.source_path} is missing: this run does not know its dataset")
        return Path(read_json(self.source_path)["data"])

    def require(self, path: Path, step: str) -> Path:
        """Return ``path`` or raise an error telling which step produces it."""
        if not path.exists():
            raise RunError(f"{path} is missing: run `recsys {step} --run {self.root}` first")
        return path

    # -- job summary -------------------------------------------------------------------
    def record(self, step: str, summary: dict[str, Any]) -> None:
        """Merge one step's summary (counts, timings, drops) into RUN/summary.json."""
        current = read_json(self.summary_path) if self.summary_path.is_file() else {}
        current[step] = summary
        write_json(self.summary_path, current)

    def write_manifest(self) -> dict[str, Any]:
        """Versions, config hash and checksums of every artifact (RUN/manifest.json)."""
        files = {}
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and path != self.manifest_path and "cache" not in path.relative_to(self.root).parts:
                files[str(path.relative_to(self.root))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest = {
            "created_unix_s": int(time.time()),
            "config_sha256": self.config().digest() if self.config_path.is_file() else None,
            "versions": _versions(),
            "files": files,
        }
        write_json(self.manifest_path, manifest)
        return manifest


# -- atomic writes -----------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsynced and renamed over ``path`` (and the directory fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are ordinary files
    try:
        yield tmp_path
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp_path, path)
        fsync_directory(path.parent)  # and the rename itself survives a crash
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_directory(directory: str | Path) -> None:
    """Make renames and new names in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(frame: Any, path: str | Path) -> None:
    """Write a polars DataFrame atomically."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    from importlib import metadata

    for name in ("recsys", "torch", "torchrec", "fbgemm-gpu-cpu", "transformers", "polars", "faiss-cpu", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
