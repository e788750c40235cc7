"""Full-catalogue retrieval evaluation: the protocol behind ``retrieval.recall@K`` and ``retrieval.ndcg@K``.

The protocol, as ``rank_catalogue`` implements it (RUN/data splits, item_idx 0 = padding):

- Known data: the clicked (``click == 1``) rows of the train split and, when
  RUN/data/valid.parquet exists, of the valid split. Nothing of the test split enters a
  user's vector or their exclusions.
- Relevant: a user's distinct clicked test items; a (user, item) pair counts once however
  often it was clicked. A clicked test item that is also one of the user's excluded items (a
  re-click) is not relevant: it is excluded from the ranking, so it could never be found.
- Evaluated users: every test user with at least one relevant item left, in ascending
  user_idx. Users whose clicked test items were all train/valid positives are not
  evaluated; they are counted in ``users_without_relevant`` (metrics.json
  ``counts.retrieval_users_without_relevant``). Test users without a click are not
  evaluated either. With ``eval.max_eval_users > 0`` and more users than that, a uniform
  sample of that many users (seed 0) is evaluated.
- User vector: ``model.user_vectors(user_idx, history)``, with history the user's last
  ``history_len`` known clicks (sampled negatives never count), ordered by timestamp,
  oldest first, 0-padded (all padding when the user has no known click). This is the
  user's state at the end of the known data, the same for all their test items: with a
  temporal split it is their history at their first test event; with a random split (the
  GroupLens files) it is what a matrix factorisation of the same rows also sees.
- Ranked items: item_idx 1 .. n_items - 1 (padding row 0 never), scored by the dot
  product of the user vector and ``item_vecs[item_idx]`` (for the model: cosine, plus the item
  bias and the popularity prior of ``training.prior`` in the last coordinate when it has them). Every item the user clicked in
  train or valid is excluded (``eval.exclude = "train"``: only train items, the protocol of
  MMRec and most papers; a valid item then stays rankable, and a test click of it relevant). The top ``min(max(ks), n_items - 1)`` eligible items are
  kept, by ``torch.topk``: equal scores are ordered as it returns them (no defined
  tie-break). A user with fewer eligible items than that gets a shorter list.
- Per user, with R relevant items at 0-based ranks r (``metrics.retrieval_per_user``):
  ``recall@K = #{r < K} / R`` (R, not min(R, K): a user with more than K relevant items
  cannot reach 1); ``ndcg@K = sum_{r < K} 1 / log2(r + 2)`` over the ideal
  ``sum_{j < min(R, K)} 1 / log2(j + 2)`` (binary gains); ``hit_rate@K``; ``mrr@K`` = 1 /
  (best rank + 1), 0 when no relevant item is in the top K. A relevant item beyond the
  kept list is a miss at every K.
- Headline value: the mean over evaluated users, each user weighing the same
  (``retrieval_section``).
- ``served.*`` (what ``/recommend`` returns): the same users, history, exclusions and
  relevance, but the towers retrieve their top ``serve.candidates`` eligible items, the
  ranker scores them and the blended score (``recsys.ranking``, the service's code) orders
  them; the metrics read that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from recsys import metrics as m
from recsys.config import EvalConfig
from recsys.history import mean_content, padded_history
from recsys.rundir import RunDir

SCORES_PER_BATCH = 20_000_000  # users x catalogue items scored per step (~80 MB of float32)
BLOCKED_USERS = 256  # users ranked together when the catalogue is scored in chunks (metrics.top_k_blocked)


class IdSpace(Protocol):
    """The sizes the protocol reads from a model's spec (``ModelSpec``, ``baseline.MFSpec``)."""

    @property
    def n_users(self) -> int: ...
    @property
    def n_items(self) -> int: ...
    @property
    def history_len(self) -> int: ...


class UserTower(Protocol):
    """What ``rank_catalogue`` needs of a model: its id space and user vectors."""

    @property
    def spec(self) -> IdSpace: ...

    def user_vectors(self, user_idx: torch.Tensor, history: torch.Tensor, history_content: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` user_idx, ``(B, history_len)`` item_idx -> ``(B, d)``; ``history_content (B, C)``, the history's mean content vector (``recsys.history.mean_content``), is passed only with ``content_vecs``."""
        ...


@dataclass(frozen=True)
class RetrievalResult:
    """Per-user ranking metrics and the data the report slices them by."""

    user_idx: np.ndarray  # (U,) the evaluated users, ascending
    per_user: dict[str, np.ndarray]  # name -> (U,) over evaluated users
    user_history_len: np.ndarray  # (U,) length of the known (train + valid) history the user vector used
    pair_item_idx: np.ndarray  # (P,) relevant (user, item) pairs: item_idx
    pair_ranks: np.ndarray  # (P,) 0-based rank, or metrics.NOT_RETRIEVED
    top_items: np.ndarray  # (U, min(max K, n_items - 1)) item_idx, 0 where nothing eligible
    item_popularity: np.ndarray  # (n_items,) clicked train rows per item_idx
    users_without_relevant: int  # test users whose clicked items were all train/valid positives
    users_eligible: int = 0  # test users with relevant items, of whom ``user_idx`` are evaluated (all, or an eval.max_eval_users sample)


# (user_idx (b,), history (b, L), candidate item_idx (b, N) in retrieval order) -> the same candidates in served order
Reranker = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (user_idx (b,), history (b, L), the towers' columns (b, N) (-1 = none), the excluded (row, column) pairs as rows (P,) and
# columns (P,)) -> more columns (b, N'), -1 at the end
Proposer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.inference_mode()
def rank_catalogue(
    run: RunDir,
    model: UserTower,
    item_vecs: torch.Tensor,
    test: pl.DataFrame,
    cfg: EvalConfig,
    rerank: Reranker | None = None,
    candidates: int = 0,
    content_vecs: torch.Tensor | None = None,
    propose: Proposer | None = None,
    known: pl.DataFrame | None = None,
) -> RetrievalResult:
    """Rank the whole catalogue for each evaluated test user (module docstring); ``item_vecs`` is ``(n_items, d)``.

    ``content_vecs (n_items, C)``: the catalogue's content vectors, for a model whose user tower
    reads the history's content (``RecsysModel.content_history``); None for the baselines.
    ``propose`` (with ``rerank``): adds other sources' candidates to the towers' (``recsys.candidates``).
    ``known``: the clicks the users' state and exclusions come from (default ``known_clicks(run)``, train +
    valid); train clicks alone with the valid split as ``test`` measure the valid split the way test is measured.

    With ``rerank``, the two-stage protocol of ``served.*``: the towers' top ``candidates``
    eligible items (same exclusions) are reordered by ``rerank`` and the metrics read that order.
    """
    n_items, history_len = model.spec.n_items, model.spec.history_len
    if content_vecs is None and getattr(model, "content_history", False):
        raise ValueError("this model's user tower reads the history's content: pass the catalogue's content_vecs (recsys.model.catalogue_states)")
    known = known_clicks(run) if known is None else known
    excluded = (known if cfg.exclude == "train_valid" else known.filter(pl.col("split") == "train")).select("user_idx", "item_idx").unique()
    relevant = test.filter(pl.col("click") == 1).select(pl.col("user_idx", "item_idx").cast(pl.Int64)).unique()
    users_with_clicks = relevant["user_idx"].n_unique()
    relevant = relevant.join(excluded, on=["user_idx", "item_idx"], how="anti")  # re-clicks can never be retrieved
    users_without_relevant = users_with_clicks - relevant["user_idx"].n_unique()

    users = (
        relevant.select("user_idx").unique()
        .join(_known_history(known, history_len), on="user_idx", how="left")
        .with_columns(pl.col("history").fill_null(pl.lit([], dtype=pl.List(pl.Int64))))
        .sort("user_idx")
    )  # fmt: skip
    eligible = users.height
    if cfg.max_eval_users and users.height > cfg.max_eval_users:
        users = users.sample(cfg.max_eval_users, seed=0).sort("user_idx")
    user_idx = users["user_idx"].to_numpy().astype(np.int64)
    history = torch.from_numpy(padded_history(users["history"], history_len))
    row_of_user = pl.DataFrame({"user_idx": user_idx, "row": np.arange(user_idx.size, dtype=np.int64)})
    excluded = excluded.join(row_of_user, on="user_idx")  # only the evaluated users' exclusions
    excluded_rows, excluded_cols = excluded["row"].to_numpy(), excluded["item_idx"].to_numpy().astype(np.int64) - 1

    k_max = min(max(cfg.ks), n_items - 1)
    retrieved = max(k_max, min(candidates, n_items - 1)) if rerank is not None else k_max
    catalogue = item_vecs[1:]  # column j is item_idx j + 1
    top = np.full((user_idx.size, k_max), -1, dtype=np.int64)
    # The scores are never held whole: the catalogue in chunks, a running top-k (memory users x chunk).
    batch_users = BLOCKED_USERS
    chunk = max(1, SCORES_PER_BATCH // batch_users)
    for start in tqdm(range(0, user_idx.size, batch_users), desc="evaluate: ranking the catalogue", unit="block", leave=False):
        stop = min(start + batch_users, user_idx.size)
        batch_user, batch_history = torch.from_numpy(user_idx[start:stop]), history[start:stop]
        user_vec = (
            model.user_vectors(batch_user, batch_history) if content_vecs is None
            else model.user_vectors(batch_user, batch_history, mean_content(content_vecs, batch_history))
        )  # (B, d)  # fmt: skip
        in_batch = (excluded_rows >= start) & (excluded_rows < stop)
        rows, cols = torch.from_numpy(excluded_rows[in_batch] - start), torch.from_numpy(excluded_cols[in_batch])
        found = m.top_k_blocked(user_vec, catalogue, retrieved, rows, cols, chunk)  # (B, retrieved) columns, -1 where nothing is eligible
        if propose is not None:
            found = propose(batch_user, batch_history, found, rows, cols)
        if rerank is not None:
            found = _reranked(rerank, torch.from_numpy(user_idx[start:stop]), history[start:stop], found)
        top[start:stop] = found[:, :k_max].numpy()

    pairs = relevant.join(row_of_user, on="user_idx")  # relevant pairs of the evaluated users
    pair_user, pair_item = pairs["row"].to_numpy(), pairs["item_idx"].to_numpy().astype(np.int64)
    ranks = m.relevant_ranks(top, pair_user, pair_item - 1)
    return RetrievalResult(
        user_idx=user_idx,
        per_user=m.retrieval_per_user(ranks, pair_user, user_idx.size, cfg.ks),
        user_history_len=users["history"].list.len().fill_null(0).to_numpy(),
        pair_item_idx=pair_item,
        pair_ranks=ranks,
        top_items=top + 1,  # back to item_idx; -1 padding becomes 0
        item_popularity=_train_popularity(known, n_items),
        users_without_relevant=int(users_without_relevant),
        users_eligible=int(eligible),
    )


def _reranked(rerank: Reranker, users: torch.Tensor, history: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """Reorder each row's eligible candidates (columns) by ``rerank``; ineligible slots (-1) stay at the end."""
    out = torch.full_like(found, -1)
    counts = (found >= 0).sum(1)
    for n in torch.unique(counts).tolist():  # rows with the same number of eligible candidates go together
        if n == 0:
            continue
        rows = torch.nonzero(counts == n).squeeze(1)
        ordered = rerank(users[rows], history[rows], found[rows, :n] + 1) - 1  # item_idx in, columns back
        out[rows, :n] = ordered
    return out


def retrieval_section(result: RetrievalResult, ks: tuple[int, ...]) -> dict[str, float]:
    """metrics.json's ``retrieval`` section: ``recall@K`` and ``ndcg@K``, means over evaluated users."""
    return {f"{name}@{k}": mean_over_users(result.per_user[f"{name}@{k}"]) for name in ("recall", "ndcg") for k in ks}


def mean_over_users(values: np.ndarray) -> float:
    """Mean of per-user values, users without a relevant item (nan) left out; nan when none is left."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def known_clicks(run: RunDir) -> pl.DataFrame:
    """Clicked rows of train and valid (user_idx, item_idx, timestamp, split), in file order: all the protocol may use."""
    paths = {"train": run.require(run.data / "train.parquet", "prepare"), "valid": run.data / "valid.parquet"}
    frames = []
    for split, path in paths.items():
        if not path.is_file():
            continue
        frame = pl.scan_parquet(path)
        clicked = pl.col("click") == 1
        if "sampled" in frame.collect_schema().names():
            clicked = clicked & ~pl.col("sampled")  # sampled negatives carry click = 0; never a positive either way
        frames.append(frame.filter(clicked).select(pl.col("user_idx", "item_idx", "timestamp").cast(pl.Int64), split=pl.lit(split)))
    return pl.concat(frames).collect()


def _known_history(known: pl.DataFrame, length: int) -> pl.DataFrame:
    """Each user's last ``length`` known clicked items, oldest first (equal timestamps: train before valid, file order)."""
    return (
        known.sort(["user_idx", "timestamp"], maintain_order=True)
        .group_by("user_idx", maintain_order=True)
        .agg(pl.col("item_idx").tail(length).alias("history"))
    )  # fmt: skip


def _train_popularity(known: pl.DataFrame, n_items: int) -> np.ndarray:
    """Clicked train rows per item_idx, ``(n_items,)``: the popularity the beyond-accuracy metrics compare with."""
    train_items = known.filter(pl.col("split") == "train")["item_idx"].to_numpy()
    return np.bincount(train_items, minlength=n_items)[:n_items]
