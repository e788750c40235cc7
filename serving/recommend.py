"""``recsys recommend``: top-k for one user (or a history of item ids) printed as a table."""

from __future__ import annotations

from typing import Any, Sequence

import polars as pl

from recsys.errors import RunError
from recsys.rundir import RunDir
from serving.recommender import Recommender

TEXT_WIDTH = 48


def shorten(text: str | None, width: int = TEXT_WIDTH) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(recommender: Recommender, items: Sequence[Any]) -> str:
    """One line per recommendation: rank, item id, shortened text, score and per-task predictions."""
    header = ("#", "item_id", "text", "score", "p_click", "p_conv", "p_ctcvr", "rating")
    rows = [
        (str(rank), str(item.item_id), shorten(recommender.text_of(item.item_id)), _number(item.score),
         _number(item.p_click), _number(item.p_conversion), _number(item.p_ctcvr), _number(item.rating, 2))
        for rank, item in enumerate(items, start=1)
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    return "\n".join(lines)


def main(run: RunDir, user: str | None = None, history: Sequence[str] | None = None, k: int = 10) -> None:
    """Print the top-k for ``user`` (or ``history``; neither: popular items) from the run's model and index."""
    recommender = Recommender.load(run)
    result = recommender.recommend(user_id=user, history=list(history or []), k=k)  # RequestError is a RecsysError
    who = f"user {user}" if user is not None else (f"history of {len(history or [])} items" if history else "no user (popular items)")
    print(f"top {len(result.items)} for {who} [{result.source}; model {recommender.model_version}, {recommender.index.kind} index of {recommender.index.count} items]")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(format_table(recommender, result.items))
    print(f"timings (ms): {', '.join(f'{stage} {ms:.2f}' for stage, ms in result.timings_ms.items())}")


def sample_user(run: RunDir) -> str:
    """A user worth showing: the one with the most clicks in the test split (ties: smallest id)."""
    path = run.require(run.data / "test.parquet", "prepare")
    counts = (
        pl.scan_parquet(path)
        .filter(pl.col("click") == 1)
        .group_by("user_id")
        .len()
        .sort(["len", "user_id"], descending=[True, False])
        .head(1)
        .collect()
    )
    if counts.height == 0:
        raise RunError(f"{path} has no clicked rows: no user to show recommendations for")
    return str(counts["user_id"][0])
