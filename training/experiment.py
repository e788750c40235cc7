"""``recsys experiment ablation``: the standard grid, trained on one dataset, in one comparison report.

The grid varies one axis at a time around the full model (MMoE ranker over the features, text +
image, static task weights): ranker in {mmoe, shared_bottom, single_task}; content in {id-only,
+text, +image, +both}; the ranker's input (the features or the old towers-only ``[u, v, u*v]``);
the ranker's gradient into the towers (on or stopped); task weights in {static, uncertainty,
GradNorm, DWA}. On data with ground truth (``recsys data synth``) the table also holds each
variant's AUC efficiency against the oracle, and the data-limited ceiling (``training.truth``).
Every variant is a complete run directory under ``OUT/<name>``; prepared data and content
embeddings are computed once (in the base run) and reused, so variants differ only in
the model. The comparison is ``OUT/report.html`` / ``OUT/report.md`` / ``OUT/ablation.json``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from features.embed import embed
from features.pipeline import prepare
from recsys.config import load_config
from recsys.errors import ConfigError
from recsys.rundir import RunDir, read_json, write_json
from training import report
from training.evaluate import evaluate
from training.train import train
from training.truth import has_truth, truth_quality

log = logging.getLogger("recsys.experiment")

# name -> overrides on top of the user's config; the first is the base every other compares to.
GRID: dict[str, list[str]] = {
    "mmoe_both": ["model.ranker=mmoe", "model.use_text=true", "model.use_image=true"],
    "shared_bottom_both": ["model.ranker=shared_bottom", "model.use_text=true", "model.use_image=true"],
    "single_task_both": ["model.ranker=single_task", "model.use_text=true", "model.use_image=true"],
    "mmoe_id_only": ["model.ranker=mmoe", "model.use_text=false", "model.use_image=false"],
    "mmoe_text": ["model.ranker=mmoe", "model.use_text=true", "model.use_image=false"],
    "mmoe_image": ["model.ranker=mmoe", "model.use_text=false", "model.use_image=true"],
    "ranker_towers_only": ["model.ranker_input=towers"],
    "ranker_stop_gradient": ["model.ranker_stop_gradient=true"],
    "ranker_cross": ["model.cross_dim=16"],
    "weights_uncertainty": ["train.loss_weights=uncertainty"],
    "weights_gradnorm": ["train.loss_weights=gradnorm"],
    "weights_dwa": ["train.loss_weights=dwa"],
}

HEADLINE = ("click.auc", "conversion.auc", "ctcvr.auc", "rating.rmse", "retrieval.recall@20", "retrieval.ndcg@20")
# With ground truth: AUC efficiency (model - 0.5) / (oracle - 0.5) and RMSE over the oracle's, test split.
TRUTH = {"efficiency.click": "click", "efficiency.conversion": "conversion", "efficiency.ctcvr": "ctcvr", "efficiency.click_cold": "click_cold", "rmse_over_oracle": "rating_rmse_ratio"}


def ablation(data: Path, out: Path, config: str | None = None, overrides: list[str] | None = None, variants: list[str] | None = None) -> dict[str, Any]:
    """Train every variant of the grid on ``data`` and write the comparison into ``out``."""
    names = variants or list(GRID)
    unknown = [name for name in names if name not in GRID]
    if unknown:
        raise ConfigError(f"ablation: unknown variant(s) {', '.join(unknown)}; the grid has {', '.join(GRID)}")
    base_cfg = load_config(config, overrides or [])
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, RunDir] = {}
    for position, name in enumerate(names):
        cfg = load_config(config, [*(overrides or []), *GRID[name]])
        run = RunDir.create(out / name, cfg, data)
        started = time.perf_counter()
        if position == 0:
            prepare(run)
            embed(run)
        else:
            _reuse_inputs(runs[names[0]], run)
        train(run)
        evaluate(run)
        log.info("ablation %s done in %.0f s", name, time.perf_counter() - started)
        runs[name] = run

    base = runs[names[0]]
    table = {name: _headline(read_json(run.metrics_path)) for name, run in runs.items()}
    if has_truth(data):
        for position, (name, run) in enumerate(runs.items()):
            quality = truth_quality(run, data, ceiling=position == 0)  # the ceiling reads only the (shared) train rows and the truth
            table[name].update({column: quality[key] for column, key in TRUTH.items()})
            if position == 0:
                ceilings = {prefix: {column: quality.get(f"{prefix}{key}") for column, key in TRUTH.items()} for prefix in ("ceiling_", "decoded_ceiling_")}
                probe = {key: quality[key] for key in ("probe_quality_r2", "probe_texture_accuracy")}
        table["ceiling (true item attributes, per-user weights)"] = ceilings["ceiling_"]
        table["decoded ceiling (texture and quality as the encoders show them)"] = ceilings["decoded_ceiling_"]
        log.info("ablation: linear probes of the base run's encoders: quality R^2 %.3f (text), texture accuracy %.3f (image)", probe["probe_quality_r2"], probe["probe_texture_accuracy"])
    write_json(out / "ablation.json", {"data": str(data), "config_sha256": base_cfg.digest(), "variants": {n: GRID[n] for n in names}, "metrics": table,
                                        **({"probe": probe} if has_truth(data) else {})})
    # The base run's report with every other variant side by side, copied up as the grid's report.
    report.write_report(base, read_json(base.metrics_path), [runs[n].root for n in names[1:]])
    shutil.copyfile(base.report_html, out / "report.html")
    (out / "report.md").write_text(_markdown_table(table))
    log.info("ablation report: %s", out / "report.html")
    return table


def _reuse_inputs(base: RunDir, run: RunDir) -> None:
    """Copy the prepared data and content of the base run (identical for every variant)."""
    for source, target in ((base.data, run.data), (base.content, run.content)):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("cache"))
    summary = read_json(base.summary_path)
    for step in ("prepare", "embed"):
        if step in summary:
            run.record(step, {**summary[step], "reused_from": str(base.root)})


def _headline(metrics: dict[str, Any]) -> dict[str, float | None]:
    values: dict[str, float | None] = {}
    for dotted in HEADLINE:
        section, key = dotted.split(".", 1)
        values[dotted] = metrics.get(section, {}).get(key)
    return values


def _markdown_table(table: dict[str, dict[str, float | None]]) -> str:
    columns = [c for c in (*HEADLINE, *TRUTH) if any(row.get(c) is not None for row in table.values())]
    lines = ["# Ablation", "", "| variant | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, row in table.items():
        cells = ["–" if row.get(c) is None else f"{row[c]:.4f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

