"""The evaluation report: one self-contained HTML page with every section, and its markdown summary."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from recsys.rundir import RunDir, write_json
from training.report import SECTIONS, compare_metric, write_report

CHROMIUM = Path("/usr/bin/chromium")

METRICS = {
    "click": {"auc": 0.75, "logloss": 0.52},
    "conversion": {"auc": 0.66},
    "ctcvr": {"auc": 0.71},
    "rating": {"rmse": 0.95, "mae": 0.74},
    "retrieval": {"recall@10": 0.1, "recall@20": 0.2, "ndcg@10": 0.05, "ndcg@20": 0.08},
    "ann": {"recall@100": 0.98},
    "intervals": {"level": 0.9, "click.auc": [0.72, 0.78], "retrieval.recall@10": [0.08, 0.12]},
    "beyond_accuracy": {"hit_rate@10": 0.3, "mrr@10": 0.12, "coverage@10": 0.4, "gini@10": 0.6, "mean_log_popularity@10": 2.0, "catalogue_mean_log_popularity": 1.2},
    "group_auc": {"click": {"gauc": 0.7, "users": 40}},
    "calibration": {
        "click": {"ece": 0.03, "mean_pred": 0.3, "observed": 0.28, "bins": {"lower": [0.0, 0.5], "upper": [0.5, 1.0], "count": [80, 20], "mean_pred": [0.2, 0.7], "frac_pos": [0.18, 0.75]}},
        "conversion": {"ece": 0.08, "mean_pred": 0.5, "observed": 0.4, "bins": {"lower": [0.0, 0.5], "upper": [0.5, 1.0], "count": [0, 10], "mean_pred": [None, 0.6], "frac_pos": [None, 0.4]}},
    },
    "rating_distribution": {"edges": [0.75, 1.25, 1.75, 2.25], "true": [3, 0, 5], "predicted": [1, 6, 1], "true_mean": 1.8, "predicted_mean": 1.6, "true_std": 0.5, "predicted_std": 0.2},
    "slices": {
        "recall_k": 20,
        "items": {"warm (in train)": {"rows": 90, "click.auc": 0.76, "relevant_pairs": 30, "retrieval.recall@20": 0.2}, "cold (not in train)": {"rows": 10, "click.auc": None, "relevant_pairs": 0, "retrieval.recall@20": None}},
        "user_activity": {"history 0": {"rows": 5, "users": 2, "click.auc": 0.5, "retrieval.recall@20": 0.0}},
    },
    "gates": {"ranker": "mmoe", "tasks": ["click", "conversion"], "weights": [[0.7, 0.3], [0.2, 0.8]]},
    "counts": {"test_rows": 100, "retrieval_users": 40, "retrieval_users_without_relevant": 1, "catalogue_items": 50},
}
TRAIN_LOG = [
    {"epoch": 1, "train_loss": {"click": 0.6, "total": 1.0}, "valid_loss": {"click": 0.62}, "valid_auc": {"click": 0.70}, "task_weights": {"click": 1.0, "ctcvr": 0.5}, "best": True},
    {"epoch": 2, "train_loss": {"click": 0.5, "total": 0.9}, "valid_loss": {"click": 0.61}, "valid_auc": {"click": 0.72}, "task_weights": {"click": 0.9, "ctcvr": 0.6}, "best": True},
]


def _run(root: Path, metrics: dict | None = None, train_log: list[dict] | None = None) -> RunDir:
    run = RunDir(root)
    run.root.mkdir(parents=True)
    write_json(run.metrics_path, metrics if metrics is not None else METRICS)
    if train_log:
        run.train_log.write_text("".join(json.dumps(line) + "\n" for line in train_log))
    return run


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    run = _run(tmp_path_factory.mktemp("report") / "run", train_log=TRAIN_LOG)
    write_report(run)
    return run.report_html.read_text()


def test_html_loads_nothing_from_outside_the_page(report_html):
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", report_html)
    assert "<script" not in report_html and "<link" not in report_html


def test_every_plot_is_an_inline_png_data_uri(report_html):
    sources = re.findall(r"<img[^>]*src='([^']*)'", report_html)
    assert len(sources) == 5  # reliability, rating histogram, retrieval by K, gate heat map, training curves
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_section_heading_is_present(report_html):
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in report_html


def test_headline_table_shows_values_with_their_intervals(report_html):
    assert "<td>0.750</td><td>[0.720, 0.780]</td>" in report_html


def test_undefined_slice_metrics_show_as_a_dash_not_nan(report_html):
    text = re.sub(r"data:image/png;base64,[^']*", "", report_html)
    assert not re.search(r"\bnan\b", text, flags=re.IGNORECASE)
    assert re.search(r"<td>cold \(not in train\)</td><td>10</td><td>0</td><td>&mdash;</td>", text)


def test_missing_heads_gates_and_training_log_give_notes_instead_of_errors(tmp_path):
    run = _run(tmp_path / "run", metrics={"click": {"auc": 0.6, "logloss": 0.7}, "retrieval": {"recall@10": 0.1, "ndcg@10": 0.05}})
    write_report(run)
    page = run.report_html.read_text()
    assert "The rating head is off" in page
    assert "No gate weights recorded" in page
    assert "No training log" in page


def test_training_log_with_unknown_keys_and_a_broken_line_still_plots(tmp_path):
    run = _run(tmp_path / "run")
    run.train_log.write_text('{"epoch": 1, "train_loss": {"click": 0.7}, "mystery": [1, 2]}\nnot json\n{"epoch": 2, "train_loss": {"click": 0.6}}\n')
    write_report(run)
    assert "Training curves" in run.report_html.read_text()


def test_training_section_names_the_epochs_run_at_a_lowered_learning_rate(tmp_path):
    lines = [{"epoch": e, "train_loss": {"click": 0.6}, "lr": lr, "best": e < 3} for e, lr in [(1, 0.01), (2, 0.01), (3, 0.01), (4, 0.005), (5, 0.0025)]]
    run = _run(tmp_path / "run", train_log=lines)
    write_report(run)
    page = run.report_html.read_text()
    assert "lowered after a plateau for epochs 4, 5." in page and "kept model is from epoch 2" in page
    unchanged = _run(tmp_path / "flat", train_log=TRAIN_LOG)
    write_report(unchanged)
    assert "lowered" not in unchanged.report_html.read_text()


def test_compare_metric_flags_a_difference_outside_both_intervals():
    other = copy.deepcopy(METRICS) | {"click": {"auc": 0.70, "logloss": 0.5}, "intervals": {"click.auc": [0.68, 0.71]}}
    result = compare_metric(METRICS, other, "click.auc")
    assert result["delta"] == pytest.approx(0.05)
    assert result["clear"] is True


def test_compare_metric_calls_overlapping_intervals_noise():
    other = copy.deepcopy(METRICS) | {"click": {"auc": 0.74, "logloss": 0.5}, "intervals": {"click.auc": [0.70, 0.77]}}
    assert compare_metric(METRICS, other, "click.auc")["clear"] is False


def test_comparison_section_and_markdown_list_the_other_run_with_deltas(tmp_path):
    run = _run(tmp_path / "run")
    baseline = _run(tmp_path / "baseline", metrics=copy.deepcopy(METRICS) | {"click": {"auc": 0.70, "logloss": 0.55}, "intervals": {"click.auc": [0.68, 0.71]}})
    write_report(run, compare=[baseline.root])
    page, summary = run.report_html.read_text(), run.report_md.read_text()
    assert "baseline / delta / clear?" in page
    assert "0.700 / <span class='good'>+0.0500</span> / clear" in page
    assert "| Click AUC | 0.750 | 0.700 | +0.0500 | yes |" in summary


def test_markdown_summary_has_headline_metrics_with_intervals(tmp_path):
    run = _run(tmp_path / "run")
    write_report(run)
    summary = run.report_md.read_text()
    assert "| Click AUC | 0.750 | [0.720, 0.780] |" in summary
    assert "| ANN recall@100 | 0.980 | n/a |" in summary


BASELINES = {
    "most_popular": {"retrieval": {"recall@10": 0.03, "recall@20": 0.05, "ndcg@10": 0.02, "ndcg@20": 0.025}, "seconds": 0.1},
    "item_knn": {"retrieval": {"recall@10": 0.12, "recall@20": 0.22, "ndcg@10": 0.06, "ndcg@20": 0.09}, "seconds": 1.2},
    "ease": {"skipped": "catalogue of 25000 items > eval.ease_max_items = 20000"},
}


def test_retrieval_table_shows_the_model_and_every_baseline_side_by_side_and_names_the_skipped(tmp_path):
    served = {"recall@10": 0.15, "recall@20": 0.25, "ndcg@10": 0.07, "ndcg@20": 0.1}
    run = _run(tmp_path / "run", metrics=copy.deepcopy(METRICS) | {"baselines": BASELINES, "served": served})
    write_report(run)
    page, summary = run.report_html.read_text(), run.report_md.read_text()
    header = "<th>Ranker</th><th>Recall@10</th><th>Recall@20</th><th>NDCG@10</th><th>NDCG@20</th><th>Note</th>"
    assert header in page
    assert "<tr><td>this model (towers, full ranking)</td><td>0.100</td><td>0.200</td><td>0.0500</td><td>0.0800</td>" in page
    assert "<td>this model, served (top candidates, ranker blend)</td><td>0.150</td><td>0.250</td><td>0.0700</td><td>0.100</td>" in page
    assert "<tr><td>Item-kNN (cosine)</td><td>0.120</td><td>0.220</td><td>0.0600</td><td>0.0900</td><td class='note'>1.2 s</td></tr>" in page
    assert "<td>EASE</td>" + "<td>&mdash;</td>" * 4 + "<td class='note'>skipped: catalogue of 25000 items &gt; eval.ease_max_items = 20000</td>" in page
    assert "| Ranker | Recall@10 | Recall@20 | NDCG@10 | NDCG@20 | Note |" in summary
    assert "| Most popular (train clicks) | 0.0300 | 0.0500 | 0.0200 | 0.0250 | 0.1 s |" in summary
    assert "| EASE | &mdash; | &mdash; | &mdash; | &mdash; | skipped: catalogue of 25000 items > eval.ease_max_items = 20000 |" in summary


def test_aucs_against_sampled_negatives_are_labelled_and_the_others_not(tmp_path):
    sampled = copy.deepcopy(METRICS)
    sampled["click"]["auc_sampled"], sampled["ctcvr"]["auc_sampled"] = 0.75, 0.71
    run = _run(tmp_path / "run", metrics=sampled)
    write_report(run)
    page, summary = run.report_html.read_text(), run.report_md.read_text()
    assert "<td>Click AUC (against sampled negatives)</td><td>0.750</td>" in page
    assert "| Click-and-convert AUC (against sampled negatives) | 0.710 |" in summary
    assert "| Conversion AUC (CVR) | 0.660 |" in summary and "| Click log loss | 0.520 |" in summary
    assert "negatives sampled by <code>recsys prepare</code>" in page
    plain = _run(tmp_path / "plain")
    write_report(plain)
    assert "sampled negatives" not in plain.report_html.read_text() + plain.report_md.read_text()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is not installed (apt-get install -y chromium)")
def test_report_renders_to_png_in_headless_chromium(tmp_path):
    run = _run(tmp_path / "run", train_log=TRAIN_LOG)
    write_report(run)
    screenshot = tmp_path / "report.png"
    render_png(run.report_html, screenshot)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def render_png(html_path: Path, png_path: Path, height: int = 4000) -> None:
    """Screenshot a report with headless Chromium, no network (also usable by hand to look at a report)."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        subprocess.run(
            [
                str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                f"--screenshot={png_path}", f"--window-size=1280,{height}", html_path.resolve().as_uri(),
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    finally:
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":  # python tests/test_report.py RUN/report.html out.png
    import sys

    render_png(Path(sys.argv[1]), Path(sys.argv[2]))
