"""The evaluation report: RUN/report.html (one self-contained page) and RUN/report.md (its summary).

Everything comes from metrics.json (as written by ``training.evaluate``) and RUN/train_log.jsonl;
plots are matplotlib figures (Agg, no pyplot state) embedded as base64 PNG data URIs. Data a
section needs but the run lacks (a head switched off, no training log) gives a short note
instead of a plot, never an error.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from recsys.errors import RunError
from recsys.rundir import RunDir, atomic_write_text, read_json

SECTIONS = ("Headline metrics", "Calibration", "Rating distribution", "Retrieval", "Slices", "Model insight", "Comparison")

# (task, metric, label, what it means, higher is better)
TASK_METRICS: tuple[tuple[str, str, str, str, bool], ...] = (
    ("click", "auc", "Click AUC", "chance a clicked impression outscores a non-clicked one (0.5 = random)", True),
    ("click", "logloss", "Click log loss", "cross-entropy of p_click; punishes confident mistakes", False),
    ("conversion", "auc", "Conversion AUC (CVR)", "among clicked rows: converted vs not converted", True),
    ("ctcvr", "auc", "Click-and-convert AUC", "over all impressions: clicked and converted vs the rest", True),
    ("rating", "rmse", "Rating RMSE", "error in stars over rated rows (lower is better)", False),
    ("rating", "mae", "Rating MAE", "mean absolute error in stars over rated rows", False),
)
HEAD_LABELS = {"click": "p_click", "conversion": "p_conversion (given click)", "ctcvr": "p_ctcvr"}
SAMPLED = " (against sampled negatives)"  # click and ctcvr AUCs of data without impressions (metrics.json ``auc_sampled``)
BASELINE_LABELS = {
    "most_popular": "Most popular (train clicks)",
    "item_knn": "Item-kNN (cosine)",
    "ease": "EASE",
    "bpr_mf": "BPR-MF",
}

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}td.note{text-align:left;color:#555;font-size:.9em}
.muted{color:#666;font-size:.92em}.good{color:#1a7f37}.bad{color:#b42318}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0}
.meta{color:#555}code{background:#f4f4f4;padding:0 .25em}
"""


# -- entry point -------------------------------------------------------------------------
def load_compare(paths: Iterable[Path] | None) -> list[tuple[str, dict[str, Any]]]:
    """(name, metrics.json) of each comparison run; raises RunError naming a run without metrics."""
    runs = []
    for path in paths or []:
        metrics_path = Path(path) / "metrics.json"
        if not metrics_path.is_file():
            raise RunError(f"--compare {path}: {metrics_path} is missing: run `recsys evaluate --run {path}` first")
        runs.append((Path(path).name or str(path), read_json(metrics_path)))
    return runs


def write_report(run: RunDir, metrics: dict[str, Any] | None = None, compare: Iterable[Path] | None = None) -> dict[str, str]:
    """Write RUN/report.html and RUN/report.md from metrics.json (or ``metrics``) and the training log."""
    if metrics is None:
        metrics = read_json(run.require(run.metrics_path, "evaluate"))
    compared = load_compare(compare)
    train_log = read_train_log(run.train_log)
    gate = read_json(run.gate_path) if run.gate_path.is_file() else None  # an update's verdict against its parent
    body = [
        f"<h1>Evaluation report: {_esc(run.root.name)}</h1>",
        f"<p class='meta'>Run <code>{_esc(run.root)}</code>. {_counts_line(metrics)} "
        "Intervals are 90% percentile bootstrap intervals over users. "
        "Undefined values (e.g. an AUC on a slice with one class) show as &mdash;.</p>",
        section_headline(metrics),
        section_calibration(metrics),
        section_rating(metrics),
        section_retrieval(metrics),
        section_slices(metrics),
        section_insight(metrics, train_log),
        section_comparison(run.root.name, metrics, compared),
        section_gate(gate),
    ]
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>recsys report: {_esc(run.root.name)}</title><style>{CSS}</style></head>"
        f"<body>\n{''.join(body)}\n</body></html>\n"
    )
    atomic_write_text(run.report_html, page)
    atomic_write_text(run.report_md, summary_markdown(run.root.name, metrics, compared) + gate_markdown(gate))
    return {"html": str(run.report_html), "md": str(run.report_md)}


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """The training log's lines (one JSON object per epoch); [] when absent; unreadable lines skipped."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


# -- sections ----------------------------------------------------------------------------
def headline_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(dotted key, label, explanation, higher is better) of every headline metric present in ``metrics``."""
    rows = [
        (f"{t}.{n}", label + (SAMPLED if n == "auc" and "auc_sampled" in metrics.get(t, {}) else ""), note, up)
        for t, n, label, note, up in TASK_METRICS
        if _get(metrics, f"{t}.{n}", absent=True) is not _ABSENT
    ]
    retrieval = metrics.get("retrieval", {})
    for name in ("recall", "ndcg"):
        for key in sorted((k for k in retrieval if k.startswith(f"{name}@")), key=lambda k: int(k.split("@")[1])):
            k = key.split("@")[1]
            note = (
                f"share of a user's clicked test items found in the top {k} of the whole catalogue"
                if name == "recall"
                else f"rank-discounted hits in the top {k} (1 = all relevant items first)"
            )
            rows.append((f"retrieval.{key}", f"{'Recall' if name == 'recall' else 'NDCG'}@{k}", note, True))
    if "ann" in metrics:
        rows.append(("ann.recall@100", "ANN recall@100", "served FAISS index vs exact search on the same vectors", True))
    return rows


def section_headline(metrics: dict[str, Any]) -> str:
    intervals = metrics.get("intervals", {})
    rows = []
    for key, label, note, _ in headline_rows(metrics):
        rows.append([label, _fmt(_get(metrics, key)), _interval(intervals.get(key)), _td_note(note)])
    table = _table(["Metric", "Value", "90% interval", "Meaning"], rows)
    gauc = metrics.get("group_auc", {})
    extra = "".join(
        f"<li>{_esc(task)} group AUC (per-user AUC weighted by impressions, {value.get('users', 0)} users with both outcomes): {_fmt(value.get('gauc'))}</li>"
        for task, value in gauc.items()
    )
    sampled = (
        " The data has no impressions: the click and click-and-convert AUCs are against negatives sampled by "
        "<code>recsys prepare</code>, not against items users saw and passed over, and are not comparable with AUCs on logged impressions."
        if _sampled_negatives(metrics)
        else ""
    )
    return (
        "<h2>Headline metrics</h2><p class='muted'>Test split, every metric per task. AUCs near 0.5 mean the head "
        f"has not learned to rank; a narrow interval means the estimate is stable across users.{sampled}</p>"
        f"{table}{'<ul>' + extra + '</ul>' if extra else ''}"
    )


def section_calibration(metrics: dict[str, Any]) -> str:
    calibration = metrics.get("calibration", {})
    if not calibration:
        return "<h2>Calibration</h2><p class='muted'>No probability heads were evaluated.</p>"
    rows = [
        [HEAD_LABELS.get(task, task), _fmt(entry.get("ece")), _fmt(entry.get("mean_pred")), _fmt(entry.get("observed"))]
        for task, entry in calibration.items()
    ]
    fig = Figure(figsize=(4.2 * len(calibration), 4.0))
    for i, (task, entry) in enumerate(calibration.items()):
        ax = fig.add_subplot(1, len(calibration), i + 1)
        bins = entry.get("bins", {})
        pred, observed, count = (np.array(bins.get(k, []), dtype=float) for k in ("mean_pred", "frac_pos", "count"))
        filled = count > 0
        ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1, label="perfect")
        if filled.any():
            sizes = 20 + 180 * count[filled] / count[filled].max()
            ax.plot(pred[filled], observed[filled], color="#1f77b4", linewidth=1.2)
            ax.scatter(pred[filled], observed[filled], s=sizes, color="#1f77b4", alpha=0.7, label="bins (size = rows)")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed rate")
        ax.set_title(f"{HEAD_LABELS.get(task, task)}  ECE {_fmt(entry.get('ece'))}")
        ax.legend(loc="upper left", fontsize=8)
    return (
        "<h2>Calibration</h2><p class='muted'>Expected calibration error (ECE) is the row-weighted gap between "
        "predicted probability and observed rate over ten equal-width bins; below about 0.02 the probabilities "
        "can be used as they are (e.g. for blending or bidding). Points on the diagonal are well calibrated; "
        "below it the head over-predicts.</p>"
        + _table(["Head", "ECE", "Mean predicted", "Observed rate"], rows)
        + _img(fig, "reliability diagram")
    )


def section_rating(metrics: dict[str, Any]) -> str:
    dist = metrics.get("rating_distribution")
    if not dist:
        return "<h2>Rating distribution</h2><p class='muted'>The rating head is off (no rating labels).</p>"
    edges = np.array(dist["edges"], dtype=float)
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.stairs(dist["true"], edges, label="true ratings", color="#444", linewidth=1.8)
    ax.stairs(dist["predicted"], edges, label="predicted", color="#d62728", fill=True, alpha=0.35)
    ax.set(xlabel="rating", ylabel="rated test rows", title="Predicted vs true ratings")
    ax.legend()
    note = (
        f"True mean {_fmt(dist.get('true_mean'))} (sd {_fmt(dist.get('true_std'))}), predicted mean "
        f"{_fmt(dist.get('predicted_mean'))} (sd {_fmt(dist.get('predicted_std'))}). A predicted spread much "
        "narrower than the true one means the head mostly predicts the average."
    )
    calibration = metrics.get("rating_calibration")
    if calibration:
        note += (
            f" Predictions are calibrated: r &rarr; {_fmt(calibration.get('center'))} + {_fmt(calibration.get('slope'))} (r &minus; "
            f"{_fmt(calibration.get('center'))}), the train split's mean rating and a slope fitted on "
            f"{calibration.get('valid_rows', '?')} rated valid rows (valid RMSE {_fmt(calibration.get('valid_rmse_before'))} &rarr; "
            f"{_fmt(calibration.get('valid_rmse_after'))}; <code>train.rating_calibration</code>)."
        )
    return f"<h2>Rating distribution</h2><p class='muted'>{note}</p>{_img(fig, 'rating histogram')}"


def section_retrieval(metrics: dict[str, Any]) -> str:
    retrieval, extra, intervals = metrics.get("retrieval", {}), metrics.get("beyond_accuracy", {}), metrics.get("intervals", {})
    ks = sorted({int(k.split("@")[1]) for k in retrieval})
    if not ks:
        return "<h2>Retrieval</h2><p class='muted'>No retrieval metrics were computed.</p>"
    rows = [
        [
            f"K = {k}",
            _fmt(retrieval.get(f"recall@{k}")) + _small(_interval(intervals.get(f"retrieval.recall@{k}"))),
            _fmt(retrieval.get(f"ndcg@{k}")) + _small(_interval(intervals.get(f"retrieval.ndcg@{k}"))),
            _fmt(extra.get(f"hit_rate@{k}")),
            _fmt(extra.get(f"mrr@{k}")),
            _pct(extra.get(f"coverage@{k}")),
            _fmt(extra.get(f"gini@{k}")),
            _fmt(extra.get(f"mean_log_popularity@{k}")),
        ]
        for k in ks
    ]
    table = _table(["Cut-off", "Recall", "NDCG", "Hit rate", "MRR", "Coverage", "Exposure Gini", "Mean log-pop."], rows)
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for name, color in (("recall", "#1f77b4"), ("ndcg", "#ff7f0e")):
        values = np.array([_num(retrieval.get(f"{name}@{k}")) for k in ks])
        bounds = np.array([intervals.get(f"retrieval.{name}@{k}") or [np.nan, np.nan] for k in ks], dtype=float)
        yerr = np.abs(np.vstack([values - bounds[:, 0], bounds[:, 1] - values]))
        ax.errorbar(ks, values, yerr=np.nan_to_num(yerr), marker="o", capsize=3, label=name, color=color)
    ax.set(xscale="log", xticks=ks, xticklabels=[str(k) for k in ks], xlabel="K", ylabel="mean over users", title="Full-catalogue retrieval")
    ax.legend()
    counts = metrics.get("counts", {})
    ann = metrics.get("ann", {}).get("recall@100")
    ann_line = (
        f"The served FAISS index finds {_pct(ann)} of the exact top 100 (ANN recall@100)."
        if ann is not None
        else "ANN recall was not measured (no <code>ann_recall@100</code> in RUN/index/index.json)."
    )
    against = _baselines_table(metrics, ks)
    return (
        "<h2>Retrieval</h2><p class='muted'>Each test user's vector (from their last train and valid clicks: "
        "with a temporal split, their history at their first test event) is "
        f"scored against all {counts.get('catalogue_items', '?')} catalogue items; items the user clicked in train "
        "or valid are excluded, and the user's clicked test items that are not re-clicks are relevant. The served row "
        "re-orders the towers' top <code>serve.candidates</code> by the ranker's blended score, as the service does. "
        f"{_prior_sentence(metrics.get('retrieval_prior'))}"
        f"{_objective_sentence(metrics.get('retrieval_objective'))}"
        f"{counts.get('retrieval_users', '?')} users evaluated{_sampled(counts)} ({counts.get('retrieval_users_without_relevant', 0)} more had "
        "only re-clicks of training items). Coverage is the share of the catalogue recommended to anyone; the exposure "
        "Gini (0 = even, 1 = one item gets everything) and the mean log(1 + train clicks) of recommended items "
        f"(catalogue average {_fmt(extra.get('catalogue_mean_log_popularity'))}) show popularity bias.</p>"
        f"{table}<p>{ann_line}</p>{_img(fig, 'recall and ndcg by K')}{against}"
    )


def _prior_sentence(prior: dict[str, Any] | None) -> str:
    """The towers' popularity prior (``model.popularity_prior``), when the model has one."""
    if not prior or prior.get("beta") is None:
        return ""
    return (
        f"The towers' score adds a popularity prior, {prior['beta']:g} &times; log(1 + train and valid clicks of the item) "
        f"(beta chosen on: {html.escape(str(prior.get('chosen_on')))}). "
    )


def _objective_sentence(objective: str | None) -> str:
    """What the towers were trained with (RUN/summary.json ``train.retrieval_objective``), when recorded."""
    return f"The towers' training objective: {html.escape(objective)}. " if objective else ""


def baseline_rows(metrics: dict[str, Any], ks: list[int]) -> list[tuple[str, list[Any], str]]:
    """(label, recall@K then ndcg@K values, note) for the model and each baseline in metrics.json ``baselines``.

    A skipped baseline has no values (None) and its reason as the note.
    """
    rows = [("this model (towers, full ranking)", [metrics.get("retrieval", {}).get(f"{name}@{k}") for name in ("recall", "ndcg") for k in ks], "")]
    if metrics.get("served"):
        served = metrics["served"]
        rows.append(("this model, served (top candidates, ranker blend)", [served.get(f"{name}@{k}") for name in ("recall", "ndcg") for k in ks], "what /recommend returns"))
    for name, entry in metrics.get("baselines", {}).items():
        retrieval = entry.get("retrieval", {})
        values = [retrieval.get(f"{metric}@{k}") for metric in ("recall", "ndcg") for k in ks]
        seconds = entry.get("seconds")
        note = f"skipped: {entry['skipped']}" if "skipped" in entry else (f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else "")
        if "training" in entry:  # the factorisation baselines' budget (eval.baseline_max_samples)
            note = f"{note}; {entry['training']['note']}" if note else entry["training"]["note"]
        rows.append((BASELINE_LABELS.get(name, name), values, note))
    return rows


def _baselines_table(metrics: dict[str, Any], ks: list[int]) -> str:
    if not metrics.get("baselines"):
        return ""
    header = ["Ranker"] + [f"Recall@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["Note"]
    rows = [[label] + [_fmt(v) for v in values] + [_td_note(note)] for label, values, note in baseline_rows(metrics, ks)]
    return (
        "<h3>Against baselines</h3><p class='muted'>The same protocol for every row: the same test users, their train "
        "and valid clicks excluded, their new test clicks relevant. Most popular ranks by clicked train rows; item-kNN "
        "(cosine, each item's nearest neighbours) and EASE (closed-form item-item regression) score a user by the items "
        "they clicked in train and valid; BPR-MF is a matrix factorisation of the train clicks. A model below item-kNN or "
        "EASE is not yet using the interactions as well as these simple methods.</p>" + _table(header, rows)
    )


def section_slices(metrics: dict[str, Any]) -> str:
    slices = metrics.get("slices", {})
    titles = {
        "items": "Cold vs warm items (cold = no interaction in train: the content-only case)",
        "text": "Items with vs without text",
        "image": "Items with vs without an image",
        "user_activity": "Users by activity (history length at the event)",
    }
    k = slices.get("recall_k", 20)
    parts = [
        "<h2>Slices</h2><p class='muted'>Every metric per slice with its row count. Small slices are noisy: treat "
        f"differences on a few hundred rows with care. Recall@{k} on item slices is the share of relevant "
        "(user, item) pairs of that slice retrieved; on user slices it is the mean per user."
        + (" Click and click-and-convert AUCs are against sampled negatives here too." if _sampled_negatives(metrics) else "")
        + "</p>"
    ]
    for family, groups in slices.items():
        if not isinstance(groups, dict) or not groups:
            continue
        columns = [c for c in next(iter(groups.values())) if c not in ("rows", "users", "relevant_pairs")]
        count_cols = [c for c in ("rows", "users", "relevant_pairs") if c in next(iter(groups.values()))]
        rows = [[name] + [_int(entry.get(c)) for c in count_cols] + [_fmt(entry.get(c)) for c in columns] for name, entry in groups.items()]
        parts.append(f"<h3>{_esc(titles.get(family, family))}</h3>")
        parts.append(_table(["Slice"] + [c.replace("_", " ") for c in count_cols] + [_column_label(c) for c in columns], rows))
    if len(parts) == 1:
        parts.append("<p class='muted'>No slices were computed.</p>")
    return "".join(parts)


def section_insight(metrics: dict[str, Any], train_log: list[dict[str, Any]]) -> str:
    parts = ["<h2>Model insight</h2>"]
    gates = metrics.get("gates", {})
    weights = np.array(gates.get("weights") or [], dtype=float)
    tasks = gates.get("tasks") or []
    source = "test rows"
    if weights.size == 0 and train_log and isinstance(train_log[-1].get("gates"), dict) and train_log[-1]["gates"]:
        tasks = list(train_log[-1]["gates"])
        weights, source = np.array([train_log[-1]["gates"][t] for t in tasks], dtype=float), "the last epoch's validation rows"
    if weights.ndim == 2 and weights.size:
        fig = Figure(figsize=(1.2 + 0.9 * weights.shape[1], 0.8 + 0.7 * weights.shape[0]))
        ax = fig.add_subplot(1, 1, 1)
        image = ax.imshow(weights, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for (row, col), value in np.ndenumerate(weights):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", color="white" if value > 0.6 else "black", fontsize=9)
        ax.set_xticks(range(weights.shape[1]), [f"expert {i}" for i in range(weights.shape[1])])
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_title("Mean gate weight per task")
        fig.colorbar(image, ax=ax, fraction=0.05)
        fig.tight_layout()
        parts.append(
            f"<h3>Expert utilisation ({_esc(gates.get('ranker', 'ranker'))})</h3><p class='muted'>Mean softmax gate "
            f"weight each task gives each expert, over {source}. Rows that look alike mean the tasks share experts; "
            "a column near zero everywhere is an unused expert.</p>" + _img(fig, "gate weights heat map")
        )
    else:
        parts.append("<p class='muted'>No gate weights recorded.</p>")
    parts.append(_training_curves(train_log))
    return "".join(parts)


def _training_curves(train_log: list[dict[str, Any]]) -> str:
    """Per-task loss curves, learned task weights and validation metrics over epochs, for whatever keys exist."""
    if not train_log:
        return "<p class='muted'>No training log (RUN/train_log.jsonl): loss curves are not available.</p>"
    flat = [_flatten_numbers(line) for line in train_log]
    epochs = np.array([line.get("epoch", i + 1) for i, line in enumerate(train_log)], dtype=float)
    names = sorted({name for line in flat for name in line})
    panels = {
        "Losses (solid: train, dashed: valid)": [n for n in names if "loss" in n and not n.startswith("task_weights")],
        "Task weights": [n for n in names if n.startswith("task_weights.")],
        "Validation metrics": [n for n in names if n.startswith("valid_") and "loss" not in n],
    }
    panels = {title: series for title, series in panels.items() if series}
    if not panels:
        return "<p class='muted'>The training log has no loss, weight or validation series to plot.</p>"
    fig = Figure(figsize=(4.4 * len(panels), 3.6))
    for i, (title, series) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        labels = sorted({_series_label(n) for n in series})  # one colour per task: train and valid share it
        for name in series:
            values = np.array([line.get(name, np.nan) for line in flat], dtype=float)
            is_valid_loss = name.startswith("valid") and title.startswith("Losses")
            label = _series_label(name)
            ax.plot(
                epochs, values, "--" if is_valid_loss else "-", marker="o", markersize=3,
                color=f"C{labels.index(label) % 10}", label=None if is_valid_loss else label,
            )  # fmt: skip
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    best = [line.get("epoch") for line in train_log if line.get("best")]
    best_note = f" The kept model is from epoch {best[-1]}." if best else ""
    lowered = [str(line["epoch"]) for prev, line in zip(train_log, train_log[1:]) if isinstance(line.get("lr"), float) and isinstance(prev.get("lr"), float) and line["lr"] < prev["lr"]]
    lr_note = f" The dense learning rate was lowered after a plateau for epoch{'s' if len(lowered) > 1 else ''} {', '.join(lowered)}." if lowered else ""
    return (
        "<h3>Training curves</h3><p class='muted'>From RUN/train_log.jsonl, one point per epoch. Valid loss rising while "
        f"train loss falls is over-fitting; learned task weights show which task the optimiser leaned on.{best_note}{lr_note}</p>"
        + _img(fig, "training curves")
    )


def section_comparison(name: str, metrics: dict[str, Any], compared: list[tuple[str, dict[str, Any]]]) -> str:
    if not compared:
        return "<h2>Comparison</h2><p class='muted'>No comparison runs given (use <code>recsys evaluate --run RUN --compare OTHER_RUN ...</code>).</p>"
    header = ["Metric", f"{name} (this run)"] + [f"{other} / delta / clear?" for other, _ in compared]
    rows = []
    for key, label, _, higher_better in headline_rows(metrics):
        row = [label, _fmt(_get(metrics, key)) + _small(_interval(metrics.get("intervals", {}).get(key)))]
        for _, other in compared:
            row.append(_comparison_cell(metrics, other, key, higher_better))
        rows.append(row)
    return (
        "<h2>Comparison</h2><p class='muted'>This run against each other run. Delta = this run minus the other; "
        "green is better for this run, red worse. <b>clear</b> means the difference lies outside the 90% intervals "
        "(the two runs' intervals do not overlap, or the other value is outside this run's interval when only one "
        "has intervals); otherwise the difference may be noise.</p>" + _table(header, rows)
    )


GATE_HEADER = ["Metric", "live (parent)", "this run", "drop (live - this)", "95% lower bound", "allowed", "verdict"]


def _gate_rows(gate: dict[str, Any]) -> list[list[str]]:
    return [
        [name, _fmt(v.get("live")), _fmt(v.get("candidate")), _signed(v["drop"]) if v.get("drop") is not None else "—",
         _fmt((v.get("interval") or [None])[0]), _fmt(v.get("allowed")), v.get("status", "")]
        for name, v in gate.get("metrics", {}).items()
    ]  # fmt: skip


def section_gate(gate: dict[str, Any] | None) -> str:
    """The gate's verdict (``RUN/gate.json``): this run against the live one on the same test rows."""
    if gate is None:
        return ""
    verdict = "passed" if gate["passed"] else f"REFUSED ({', '.join(gate['refused'])})"
    return (
        f"<h2>Against the live run (gate): {_esc(verdict)}</h2><p class='muted'>This run and <code>{_esc(gate['live'])}</code> scored on "
        f"the same {gate['rows']} test rows of {gate['users']} users ({gate.get('rows_of_new_users', 0)} rows of users and "
        f"{gate.get('rows_of_new_items', 0)} of items the live model has no row for). {_esc(gate['rule'])}.</p>" + _table(GATE_HEADER, _gate_rows(gate))
    )


def gate_markdown(gate: dict[str, Any] | None) -> str:
    if gate is None:
        return ""
    lines = ["", f"## Against the live run (gate): {'passed' if gate['passed'] else 'REFUSED'}", "", f"`{gate['live']}` on the same {gate['rows']} test rows. {gate['rule']}.", ""]
    lines += ["| " + " | ".join(GATE_HEADER) + " |", "| --- |" + " ---: |" * 5 + " --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in _gate_rows(gate)]
    return "\n".join(lines) + "\n"


def compare_metric(this: dict[str, Any], other: dict[str, Any], key: str) -> dict[str, Any]:
    """Delta (this - other) of one dotted metric and whether it lies outside the bootstrap intervals."""
    a, b = _num(_get(this, key)), _num(_get(other, key))
    delta = a - b
    ia, ib = this.get("intervals", {}).get(key), other.get("intervals", {}).get(key)
    if ia and ib and None not in ia and None not in ib:
        clear = ia[1] < ib[0] or ib[1] < ia[0]
    elif ia and None not in ia:
        clear = not (ia[0] <= b <= ia[1])
    elif ib and None not in ib:
        clear = not (ib[0] <= a <= ib[1])
    else:
        clear = None
    return {"this": a, "other": b, "delta": delta, "clear": clear if math.isfinite(delta) else None}


def _comparison_cell(this: dict[str, Any], other: dict[str, Any], key: str, higher_better: bool) -> str:
    result = compare_metric(this, other, key)
    if not math.isfinite(result["other"]):
        return "&mdash;"
    delta = result["delta"]
    css = "good" if (delta > 0) == higher_better and delta != 0 else ("bad" if delta != 0 else "")
    clear = {True: "clear", False: "within noise", None: "no intervals"}[result["clear"]]
    return f"{_fmt(result['other'])} / <span class='{css}'>{_signed(delta)}</span> / {clear}"


# -- markdown summary --------------------------------------------------------------------
def summary_markdown(name: str, metrics: dict[str, Any], compared: list[tuple[str, dict[str, Any]]]) -> str:
    """RUN/report.md: headline metrics with intervals, key retrieval numbers and comparison deltas."""
    intervals = metrics.get("intervals", {})
    lines = [f"# Evaluation summary: {name}", "", _counts_line(metrics), "", "| Metric | Value | 90% interval |", "| --- | ---: | --- |"]
    for key, label, _, _ in headline_rows(metrics):
        lines.append(f"| {label} | {_fmt(_get(metrics, key))} | {_interval(intervals.get(key), markdown=True)} |")
    extra = metrics.get("beyond_accuracy", {})
    ks = sorted({int(k.split("@")[1]) for k in metrics.get("retrieval", {})})
    if ks:
        k = 20 if 20 in ks else ks[-1]
        lines += [
            "",
            f"Top-{k}: hit rate {_fmt(extra.get(f'hit_rate@{k}'))}, MRR {_fmt(extra.get(f'mrr@{k}'))}, "
            f"catalogue coverage {_pct(extra.get(f'coverage@{k}'))}, exposure Gini {_fmt(extra.get(f'gini@{k}'))}.",
        ]
    calibration = metrics.get("calibration", {})
    if calibration:
        lines += ["", "Calibration (ECE): " + ", ".join(f"{HEAD_LABELS.get(t, t)} {_fmt(e.get('ece'))}" for t, e in calibration.items()) + "."]
    if ks and metrics.get("baselines"):
        lines += ["", "## Retrieval against baselines (same protocol)", ""]
        lines += ["| Ranker | " + " | ".join([f"Recall@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]) + " | Note |"]
        lines += ["| --- | " + " | ".join(["---:"] * (2 * len(ks))) + " | --- |"]
        for label, values, note in baseline_rows(metrics, ks):
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in values) + f" | {note} |")
    for other_name, other in compared:
        lines += ["", f"## Against {other_name}", "", "| Metric | this run | other | delta | outside intervals |", "| --- | ---: | ---: | ---: | --- |"]
        for key, label, _, _ in headline_rows(metrics):
            result = compare_metric(metrics, other, key)
            clear = {True: "yes", False: "no", None: "n/a"}[result["clear"]]
            lines.append(f"| {label} | {_fmt(result['this'])} | {_fmt(result['other'])} | {_signed(result['delta'])} | {clear} |")
    lines += ["", "Plots, calibration, slices and model insight: `report.html`.", ""]
    return "\n".join(lines)


# -- formatting helpers ------------------------------------------------------------------
_ABSENT = object()


def _get(metrics: dict[str, Any], dotted: str, absent: bool = False) -> Any:
    """``metrics["click"]["auc"]`` for ``"click.auc"``; the part after the first dot may itself hold '@'."""
    task, _, name = dotted.partition(".")
    section = metrics.get(task)
    if not isinstance(section, dict) or name not in section:
        return _ABSENT if absent else None
    return section[name]


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _sampled(counts: dict[str, Any]) -> str:
    eligible, evaluated = counts.get("retrieval_users_eligible"), counts.get("retrieval_users")
    return f", a uniform sample (<code>eval.max_eval_users</code>) of the {eligible} with relevant items" if eligible and evaluated and eligible > evaluated else ""


def _fmt(value: Any) -> str:
    """Numbers to 3 significant decimals (4 below 0.1, so small losses and ECEs stay readable)."""
    number = _num(value)
    if not math.isfinite(number):
        return "&mdash;"
    if number == 0:
        return "0"
    if abs(number) >= 100:
        return f"{number:,.0f}"
    return f"{number:.4f}" if abs(number) < 0.1 else f"{number:.3f}"


def _signed(value: float) -> str:
    return "&mdash;" if not math.isfinite(value) else ("+" if value > 0 else "") + _fmt(value)


def _pct(value: Any) -> str:
    number = _num(value)
    return "&mdash;" if not math.isfinite(number) else f"{100 * number:.1f}%"


def _int(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) else "&mdash;"


def _interval(bounds: Any, markdown: bool = False) -> str:
    if not bounds or any(b is None for b in bounds):
        return "n/a" if markdown else "&mdash;"
    return f"[{_fmt(bounds[0])}, {_fmt(bounds[1])}]"


def _small(text: str) -> str:
    return "" if text == "&mdash;" else f" <span class='muted'>{text}</span>"


def _td_note(text: str) -> tuple[str, str]:
    return ("note", _esc(text))


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain HTML table; cells are pre-formatted HTML, or (css class, html) tuples."""

    def cell(value: Any) -> str:
        return f"<td class='{value[0]}'>{value[1]}</td>" if isinstance(value, tuple) else f"<td>{value}</td>"

    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(fig: Figure, alt: str) -> str:
    """The figure as an inline PNG (data URI), so the page needs no other file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='{_esc(alt)}' src='data:image/png;base64,{encoded}'>"


def _counts_line(metrics: dict[str, Any]) -> str:
    counts = metrics.get("counts", {})
    if not counts:
        return ""
    return (
        f"{counts.get('test_rows', 0):,} test rows, {counts.get('retrieval_users', 0):,} users in the retrieval metrics, "
        f"{counts.get('catalogue_items', 0):,} catalogue items."
    )


def _sampled_negatives(metrics: dict[str, Any]) -> bool:
    """True when the click AUC is against sampled negatives (metrics.json ``click.auc_sampled``, data without impressions)."""
    return "auc_sampled" in metrics.get("click", {})


def _column_label(dotted: str) -> str:
    """``click.auc`` -> ``Click AUC``; ``retrieval.recall@20`` -> ``Recall@20``."""
    labels = {f"{t}.{n}": label for t, n, label, _, _ in TASK_METRICS}
    return labels.get(dotted, dotted.split(".", 1)[-1].replace("recall", "Recall"))


def _series_label(name: str) -> str:
    """``train_loss.click`` -> ``click``; a name without a dot stays as it is."""
    return name.split(".", 1)[1] if "." in name else name


def _flatten_numbers(line: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict as dotted names (lists and strings skipped)."""
    out: dict[str, float] = {}
    for key, value in line.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            out[name] = float(value)
    return out
