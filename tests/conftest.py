"""Shared fixtures. Tests that need ../shared/data skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))

# Several test processes on a 2-core machine: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The real MovieLens-100K directory (with posters and plots), or skip."""
    path = SHARED_DATA / "ml-100k"
    if not (path / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {path}")
    return path
