"""Helpers for the serving tests: tiny runs with string or integer ids, and a real `recsys serve` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import polars as pl

from recsys.rundir import RunDir, write_parquet
from serving.index import build_index

from test_index import make_tiny_run

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[1]
FIRST_INT_ITEM = 1000  # integer catalogue: item it{i} is 1000 + i, user u{u} is u


def integer_id_run(root: Path, overrides: list[str] | None = None) -> RunDir:
    """``make_tiny_run`` with int64 item ids (1001..1060) and user ids (1..20), indexed."""
    run = make_tiny_run(root, overrides)
    item_id = (pl.col("item_idx") + FIRST_INT_ITEM).cast(pl.Int64)
    write_parquet(pl.read_parquet(run.data / "items.parquet").with_columns(item_id.alias("item_id")), run.data / "items.parquet")
    write_parquet(pl.read_parquet(run.data / "users.parquet").with_columns(pl.col("user_idx").cast(pl.Int64).alias("user_id")), run.data / "users.parquet")
    for split in ("train", "valid", "test"):
        path = run.data / f"{split}.parquet"
        events = pl.read_parquet(path).with_columns(item_id.alias("item_id"), pl.col("user_idx").cast(pl.Int64).alias("user_id"))
        write_parquet(events, path)
    build_index(run)
    return run


def string_id_run(root: Path, overrides: list[str] | None = None) -> RunDir:
    """``make_tiny_run`` (items it1..it60, users u1..u20), indexed."""
    run = make_tiny_run(root, overrides)
    build_index(run)
    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `recsys serve` subprocess on loopback."""

    def __init__(self, run: RunDir, token: str | None = TOKEN, extra: list[str] | None = None):
        self.run = run
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env.pop("RECSYS_ADMIN_TOKEN", None)
        if token:
            env["RECSYS_ADMIN_TOKEN"] = token
        self.log_path = run.root.parent / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "recsys", "-q", "serve", "--run", str(run.root), "--port", str(self.port), *(extra or [])],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=self._log,
        )

    def stderr(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"server exited {self.process.returncode}:\n{self.stderr()[-3000:]}"
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server not healthy within {timeout_s} s:\n{self.stderr()[-3000:]}"
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@contextmanager
def serving(run: RunDir, token: str | None = TOKEN, extra: list[str] | None = None) -> Iterator[Server]:
    """A healthy `recsys serve` over ``run`` for the block; stopped afterwards."""
    server = Server(run, token, extra)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()
