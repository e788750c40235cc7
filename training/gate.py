"""The quality gate (``recsys evaluate --run CANDIDATE --gate LIVE``): is an update worse than the model it replaces?

Same rows. Both models score CANDIDATE's test split (RUN/data/test.parquet, the latest window)
with the evaluation's own code: ``training.evaluate.score_rows`` and ``row_metrics`` for the
task metrics, ``training.retrieval.rank_catalogue`` over the candidate's catalogue, with the
candidate's train + valid clicks as histories and exclusions, for ``retrieval.recall@20``.

The live model is an ancestor. Its vocabularies must be a prefix of the candidate's (``recsys
update`` grows them append-only: every old id keeps its index), so the ids it never saw, users
and items new since, reach it as unknown (index 0, the cold path its towers take for ids beyond
their tables): a new item is known to it by its content only, as a candidate and in a history
(its id is dropped from the history's id bag; its content counts, as for an item added live).
That content is the candidate's RUN/content, so both runs must use the same encoders.

Rule. For each metric named in ``max_drop``, drop = live - candidate (``rating.rmse``, lower is
better: candidate - live), so a positive drop means the candidate is worse. Test users are
resampled with replacement, the same resample for both models (a paired bootstrap), and every
metric is recomputed for both on it. The candidate is refused when the lower end of the
one-sided 95% bootstrap interval of a drop (its 5th percentile) exceeds the allowed drop: the
candidate is then worse by more than the tolerance, with 95% confidence. A metric undefined on
these rows (e.g. an AUC over one class, the same for both models) is reported and not gated.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys import metrics as m
from recsys.errors import ConfigError, RunError
from recsys.model import RecsysModel, load_model
from recsys.rundir import RunDir, read_json, write_json
from training.evaluate import all_item_states, check_vocabularies, load_content, row_metrics, score_rows, task_labels
from training.retrieval import RetrievalResult, mean_over_users, rank_catalogue

log = logging.getLogger("recsys")

RECALL_K = 20
GATE_METRICS = ("click.auc", "conversion.auc", "ctcvr.auc", "rating.rmse", f"retrieval.recall@{RECALL_K}")
LOWER_IS_BETTER = frozenset({"rating.rmse"})
DEFAULT_MAX_DROP = {"click.auc": 0.002, "conversion.auc": 0.005, "ctcvr.auc": 0.005, f"retrieval.recall@{RECALL_K}": 0.005}
LEVEL = 0.95  # one-sided: the drop's lower bound is its 5th bootstrap percentile
BOOTSTRAP = 1000  # user resamples
RULE = (
    "drop = live - candidate (rating.rmse: candidate - live); refused when the lower end of the one-sided "
    "95% paired user-bootstrap interval of the drop exceeds the allowed drop"
)


def gate(candidate: RunDir, live: RunDir, max_drop: dict[str, float] | None = None, bootstrap: int = BOOTSTRAP, seed: int = 0, write: bool = True) -> dict[str, Any]:
    """Compare CANDIDATE with its ancestor LIVE on CANDIDATE's test rows (module docstring); writes CANDIDATE/gate.json, returns it.

    ``max_drop``: allowed drop per metric, over ``DEFAULT_MAX_DROP`` (of those, the ones both runs
    measure); ``math.inf`` reports a metric without gating it. ``bootstrap`` user resamples, drawn
    with ``seed``. The verdict's ``passed`` is False when any gated metric is refused. ``write=False``
    only returns it (a comparison that is not this candidate's gate, e.g. against an older ancestor).
    """
    started = time.perf_counter()
    allowed = resolve_max_drop(max_drop)
    if bootstrap < 1:
        raise ConfigError(f"bootstrap = {bootstrap}: the gate needs at least one user resample (default {BOOTSTRAP})")
    live.config()  # fails clearly when LIVE is not a run directory
    cfg = candidate.config().eval.model_copy(update={"ks": (RECALL_K,)})
    candidate_meta = read_json(candidate.require(candidate.data / "meta.json", "prepare"))
    live_meta = read_json(live.require(live.data / "meta.json", "prepare"))
    check_ancestor(candidate, live)
    check_same_encoders(candidate, live)
    candidate_model, live_model = load_model(candidate.require(candidate.model, "train")), load_model(live.require(live.model, "train"))
    check_vocabularies(candidate, candidate_model, candidate_meta)
    check_vocabularies(live, live_model, live_meta)

    tasks = [t for t in candidate_model.tasks if t in live_model.tasks and candidate_meta["tasks"].get(t, False)]
    measured = measured_metrics(tasks)
    unmeasured = sorted(set(max_drop or {}) - set(measured))
    if unmeasured:
        raise ConfigError(f"--max-drop names {', '.join(unmeasured)}, which these runs do not measure (heads of both: {', '.join(tasks)}); measured: {', '.join(measured)}")

    test = pl.read_parquet(candidate.require(candidate.data / "test.parquet", "prepare"))
    n_items = candidate_meta["n_items"]
    scored = {"live": _score(candidate, live_model, test, cfg, n_items), "candidate": _score(candidate, candidate_model, test, cfg, n_items)}
    point, bounds = paired_drops(task_labels(test, tasks), scored, test["user_idx"].to_numpy(), measured, bootstrap, seed)
    verdicts = {name: _metric_verdict(name, point["live"][name], point["candidate"][name], bounds[name], allowed.get(name)) for name in measured}
    retrieval_users = scored["candidate"][1].user_idx
    refused = [name for name, v in verdicts.items() if v["passed"] is False]
    verdict = {
        "passed": not refused,
        "refused": refused,
        "candidate": str(candidate.root.resolve()),
        "live": str(live.root.resolve()),
        "rule": RULE,
        "level": LEVEL,
        "bootstrap": bootstrap,
        "seed": seed,
        "unit": "user",
        "rows": test.height,
        "users": int(test["user_idx"].n_unique()),
        "retrieval_users": int(retrieval_users.size),
        "new_users": candidate_meta["n_users"] - live_meta["n_users"],  # ids beyond the live model's tables
        "new_items": candidate_meta["n_items"] - live_meta["n_items"],
        "rows_of_new_users": int((test["user_idx"] >= live_meta["n_users"]).sum()),
        "rows_of_new_items": int((test["item_idx"] >= live_meta["n_items"]).sum()),
        "metrics": verdicts,
    }
    if write:
        write_json(candidate.gate_path, verdict)
        candidate.record("gate", {"live": verdict["live"], "passed": verdict["passed"], "refused": refused, "seconds": round(time.perf_counter() - started, 2)})
    log.info("gate: %s against %s: %s", candidate.root, live.root, "passed" if verdict["passed"] else f"REFUSED ({', '.join(refused)})")
    for name, v in verdicts.items():
        log.info("gate: %s live %s candidate %s drop %s lower %s allowed %s", name, *(_fmt(v[k]) for k in ("live", "candidate", "drop")), _fmt(v["interval"][0]), _fmt(v["allowed"]))
    return verdict


def resolve_max_drop(max_drop: dict[str, float] | None) -> dict[str, float]:
    """``DEFAULT_MAX_DROP`` with ``max_drop`` over it; unknown names, negative or nan values are an error."""
    given = dict(max_drop or {})
    unknown = sorted(set(given) - set(GATE_METRICS))
    if unknown:
        raise ConfigError(f"--max-drop: unknown metric(s) {', '.join(unknown)}; the gate compares {', '.join(GATE_METRICS)}")
    bad = {name: value for name, value in given.items() if not value >= 0}  # also nan
    if bad:
        raise ConfigError(f"--max-drop: {', '.join(f'{k}={v}' for k, v in bad.items())}: an allowed drop is a number >= 0 (inf: report only)")
    return {**DEFAULT_MAX_DROP, **given}


def measured_metrics(tasks: list[str]) -> list[str]:
    """The gate's metrics that heads ``tasks`` (those of both models) measure, in ``GATE_METRICS`` order."""
    task_of = {"click.auc": "click", "conversion.auc": "conversion", "ctcvr.auc": "conversion", "rating.rmse": "rating"}
    return [name for name in GATE_METRICS if task_of.get(name, "click") in tasks]


def paired_drops(
    labels: dict[str, np.ndarray],
    scored: dict[str, tuple[dict[str, np.ndarray], RetrievalResult]],
    row_users: np.ndarray,
    measured: list[str],
    bootstrap: int,
    seed: int,
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[float, float]]]:
    """Each model's metrics on all rows, and the drops' 5th and 95th percentiles over paired user resamples.

    ``scored``: ``{"live" | "candidate": (score_rows scores, rank_catalogue result)}`` on the same
    rows; ``row_users (N,)`` the test rows' user_idx. A resample draws test users with replacement
    and takes every row and the retrieval entry of each drawn user, for both models at once.
    """
    retrieval_users = scored["candidate"][1].user_idx
    if not np.array_equal(scored["live"][1].user_idx, retrieval_users):  # the protocol reads the candidate's data only
        raise RuntimeError("the live and candidate retrieval evaluated different users: rank_catalogue must not depend on the model")

    def values(model: str, rows: np.ndarray | None, users: np.ndarray | None) -> dict[str, float]:
        scores, retrieval = scored[model]
        flat = {f"{task}.{name}": v for task, section in row_metrics(labels, scores, rows).items() for name, v in section.items()}
        recall = retrieval.per_user[f"recall@{RECALL_K}"]
        flat[f"retrieval.recall@{RECALL_K}"] = mean_over_users(recall if users is None else recall[users])
        return {name: flat[name] for name in measured}

    # One bootstrap "row" per test row, then one per retrieval user; grouped by user, a resample of users draws both.
    n_rows = row_users.size
    groups = np.concatenate([row_users.astype(np.int64), retrieval_users])
    weighted = {model: _weighted_metrics(labels, scored[model], measured) for model in scored}  # sorted once: each resample is O(n)

    def resampled_drops(idx: np.ndarray) -> dict[str, float]:
        row_weights = np.bincount(idx[idx < n_rows], minlength=n_rows)
        user_weights = np.bincount(idx[idx >= n_rows] - n_rows, minlength=retrieval_users.size)
        live, candidate = (weighted[model](row_weights, user_weights) for model in ("live", "candidate"))
        return {name: _drop(name, live[name], candidate[name]) for name in measured}

    point = {model: values(model, None, None) for model in scored}
    bounds = m.bootstrap_intervals(resampled_drops, groups.size, groups=groups, n_boot=bootstrap, level=2 * LEVEL - 1, seed=seed)
    return point, bounds


def _weighted_metrics(labels: dict[str, np.ndarray], scored: tuple[dict[str, np.ndarray], RetrievalResult], measured: list[str]) -> Any:
    """``(row_weights, user_weights) -> {metric: value}`` for one model: the metrics of the resample drawing each row and
    retrieval user that often (equal to ``row_metrics`` and ``mean_over_users`` of the drawn rows; tested)."""
    scores, retrieval = scored
    click = labels["click"]
    aucs = {"click.auc": (m.ResampledAUC(click, scores["p_click"]), None)}
    if "conversion" in labels:
        clicked = np.flatnonzero(click > 0.5)
        aucs["conversion.auc"] = (m.ResampledAUC(labels["conversion"][clicked], scores["p_cvr"][clicked]), clicked)
        aucs["ctcvr.auc"] = (m.ResampledAUC(labels["ctcvr"], scores["p_ctcvr"]), None)
    rated = np.flatnonzero(np.isfinite(labels["rating"])) if "rating" in labels else None
    squared = (scores["rating"][rated] - labels["rating"][rated]) ** 2 if rated is not None else None
    recall = retrieval.per_user[f"recall@{RECALL_K}"]
    finite = np.isfinite(recall)

    def values(row_weights: np.ndarray, user_weights: np.ndarray) -> dict[str, float]:
        out = {name: auc(row_weights if rows is None else row_weights[rows]) for name, (auc, rows) in aucs.items()}
        if squared is not None:
            w = row_weights[rated]
            out["rating.rmse"] = float(np.sqrt((w * squared).sum() / w.sum())) if w.sum() else float("nan")
        w = user_weights[finite]
        out[f"retrieval.recall@{RECALL_K}"] = float((w * recall[finite]).sum() / w.sum()) if w.sum() else float("nan")
        return {name: out[name] for name in measured}

    return values


def parse_max_drop(specs: list[str] | None) -> dict[str, float]:
    """``["click.auc=0.002,retrieval.recall@20=0.005", ...]`` (the CLI's --max-drop, repeatable) -> ``{metric: allowed drop}``."""
    out: dict[str, float] = {}
    for item in (part.strip() for spec in specs or [] for part in spec.split(",") if part.strip()):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--max-drop {item!r}: expected METRIC=NUMBER, e.g. click.auc=0.002") from None
    resolve_max_drop(out)  # names and values checked before any work
    return out


# -- the checks ---------------------------------------------------------------------------
def check_ancestor(candidate: RunDir, live: RunDir) -> None:
    """LIVE's vocabularies are a prefix of CANDIDATE's: every live user_idx / item_idx holds the same id there."""
    for kind in ("user", "item"):
        id_col, idx_col, name = f"{kind}_id", f"{kind}_idx", f"{kind}s.parquet"
        live_vocab = pl.read_parquet(live.require(live.data / name, "prepare"), columns=[id_col, idx_col])
        candidate_vocab = pl.read_parquet(candidate.require(candidate.data / name, "prepare"), columns=[id_col, idx_col])
        joined = live_vocab.join(candidate_vocab.rename({id_col: "in_candidate"}), on=idx_col, how="left")
        differ = joined.filter(pl.col("in_candidate").is_null() | (pl.col(id_col).cast(pl.String) != pl.col("in_candidate").cast(pl.String)))
        if differ.height:
            first = differ.sort(idx_col).row(0, named=True)
            raise RunError(
                f"{candidate.data / name} does not extend {live.data / name}: {differ.height} of {live_vocab.height} live {idx_col}s hold "
                f"another {id_col} in the candidate (e.g. {idx_col} {first[idx_col]}: {first[id_col]!r} live, {first['in_candidate']!r} candidate). "
                f"The gate compares a run with an ancestor whose ids it keeps (`recsys update` grows vocabularies append-only); "
                f"gate CANDIDATE against the run it was updated from"
            )


def check_same_encoders(candidate: RunDir, live: RunDir) -> None:
    """Both runs' RUN/content/meta.json name the same text and image encoders (the live model reads the candidate's content)."""
    ours, theirs = _encoders(candidate), _encoders(live)
    if ours != theirs:
        differ = {key: (theirs.get(key), ours.get(key)) for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)}
        detail = "; ".join(f"{key}: live {a}, candidate {b}" for key, (a, b) in differ.items())
        raise RunError(
            f"{candidate.content / 'meta.json'} and {live.content / 'meta.json'} differ in their encoders ({detail}): the gate scores "
            f"the live model on the candidate's content, which must come from the encoders it was trained with; embed the candidate "
            f"with the live run's embed settings"
        )


def _encoders(run: RunDir) -> dict[str, Any]:
    path = run.content / "meta.json"
    meta = read_json(path) if path.is_file() else {}
    out: dict[str, Any] = {m: {k: meta[m].get(k) for k in ("model", "dim", "identity")} for m in ("text", "image") if m in meta}
    out["aligned"] = "align" in meta
    return out


# -- scoring ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sizes:  # a training.retrieval.IdSpace
    n_users: int
    n_items: int
    history_len: int


class _OnCatalogue:
    """A model as ``rank_catalogue`` sees it over a grown catalogue: its own user tower and history length, the catalogue's size."""

    def __init__(self, model: RecsysModel, n_items: int):
        self.model = model
        self.spec = _Sizes(model.spec.n_users, n_items, model.spec.history_len)
        self.content_history = model.content_history

    def user_vectors(self, user_idx: torch.Tensor, history: torch.Tensor, history_content: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.user_vectors(user_idx, history, history_content)


def _score(run: RunDir, model: RecsysModel, test: pl.DataFrame, cfg: Any, n_items: int) -> tuple[dict[str, np.ndarray], RetrievalResult]:
    """One model's head scores on ``test`` and its full ranking of RUN's catalogue (``n_items``), with RUN's content."""
    content = load_content(run, model)
    model_rows = test.with_columns(pl.col("history").list.tail(model.spec.history_len))  # what a model of a shorter history reads
    scores, _ = score_rows(model, model_rows, content)
    item_vecs, content_vecs = all_item_states(model, content, n_items)
    return scores, rank_catalogue(run, _OnCatalogue(model, n_items), item_vecs, test, cfg, content_vecs=content_vecs)


# -- the verdict --------------------------------------------------------------------------
def _drop(name: str, live: float, candidate: float) -> float:
    """How much worse the candidate is (positive = worse), whichever way the metric points."""
    return candidate - live if name in LOWER_IS_BETTER else live - candidate


def _metric_verdict(name: str, live: float, candidate: float, interval: tuple[float, float], allowed: float | None) -> dict[str, Any]:
    lower = interval[0]
    allowed = allowed if allowed is not None and math.isfinite(allowed) else None  # inf: reported, not gated
    gated = allowed is not None and math.isfinite(lower)
    status = ("passed" if lower <= allowed else "refused") if gated else ("not gated" if allowed is None else "undefined")
    return {
        "direction": "lower is better" if name in LOWER_IS_BETTER else "higher is better",
        "live": _number(live),
        "candidate": _number(candidate),
        "drop": _number(_drop(name, live, candidate)),
        "interval": [_number(interval[0]), _number(interval[1])],  # the drop's 5th and 95th bootstrap percentiles
        "allowed": allowed,
        "passed": bool(lower <= allowed) if gated else None,  # None: not gated, or undefined on these rows
        "status": status,
    }


def _number(value: float | None) -> float | None:
    """nan and inf -> None: gate.json is strict JSON."""
    return float(value) if value is not None and math.isfinite(value) else None


def format_verdict(verdict: dict[str, Any]) -> str:
    """The verdict as a table for the terminal."""
    lines = [
        f"gate: {verdict['candidate']} against {verdict['live']}",
        (
            f"  {verdict['rows']} test rows, {verdict['users']} users ({verdict['retrieval_users']} in retrieval), "
            f"{verdict['new_users']} users and {verdict['new_items']} items new since live; {verdict['bootstrap']} paired user resamples"
        ),
        f"  {verdict['rule']}",
        "",
        f"{'metric':<22}{'live':>10}{'candidate':>11}{'drop':>10}{'95% lower':>11}{'allowed':>10}  verdict",
    ]
    for name, v in verdict["metrics"].items():
        status = v["status"].upper() if v["passed"] is False else v["status"]
        lines.append(f"{name:<22}{_fmt(v['live']):>10}{_fmt(v['candidate']):>11}{_fmt(v['drop']):>10}{_fmt(v['interval'][0]):>11}{_fmt(v['allowed']):>10}  {status}")
    lines += ["", "PASSED" if verdict["passed"] else f"REFUSED: {', '.join(verdict['refused'])}"]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
