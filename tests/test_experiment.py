"""``recsys experiment ablation``: the grid's runs, their table, and on synthetic data the efficiencies beside the ceiling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from features.synth import synthesize
from recsys.errors import ConfigError
from recsys.rundir import read_json
from training.experiment import GRID, TRUTH, ablation

FAST = ["eval.bootstrap=0", "train.epochs=1", "embed.text_model=none", "data.history_len=8", "model.dim=8", "model.embedding_dim=8", "model.expert_dim=8", "model.tower_dim=4"]


def test_ablation_trains_each_variant_and_reports_efficiency_beside_the_ceiling(tmp_path: Path) -> None:
    data = tmp_path / "data"
    synthesize(data, users=60, items=40, interactions=3000, seed=0)
    table = ablation(data, tmp_path / "out", overrides=FAST, variants=["mmoe_both", "ranker_towers_only"])

    ceiling = "ceiling (true item attributes, per-user weights)"
    decoded = "decoded ceiling (texture and quality as the encoders show them)"
    assert list(table) == ["mmoe_both", "ranker_towers_only", ceiling, decoded]
    assert read_json(tmp_path / "out" / "ranker_towers_only" / "model" / "model.json")["config"]["ranker_input"] == "towers"
    assert read_json(tmp_path / "out" / "mmoe_both" / "model" / "model.json")["config"]["ranker_input"] == "features"
    for name in ("mmoe_both", "ranker_towers_only"):
        row = table[name]
        # an AUC, not a learning check: one epoch on 3,000 rows lands anywhere in 0.43-0.59 across data seeds for
        # either attention (tests/test_quality.py asserts learning, on enough data)
        assert 0.0 <= row["click.auc"] <= 1.0
        for column in TRUTH:
            assert math.isfinite(row[column]), (name, column, row)
        assert (row["efficiency.click"] > 0) == (row["click.auc"] > 0.5)  # lift over chance, as a share of the oracle's
    assert table["ranker_towers_only"] != table["mmoe_both"]
    assert "click.auc" not in table[ceiling] and 0.3 < table[ceiling]["efficiency.click"] <= 1.05
    saved = read_json(tmp_path / "out" / "ablation.json")
    assert saved["variants"] == {name: GRID[name] for name in ("mmoe_both", "ranker_towers_only")}
    assert saved["metrics"][ceiling]["efficiency.ctcvr"] == pytest.approx(table[ceiling]["efficiency.ctcvr"])
    assert math.isfinite(table[decoded]["efficiency.conversion"]) and 0.0 <= saved["probe"]["probe_texture_accuracy"] <= 1.0
    assert math.isnan(saved["probe"]["probe_quality_r2"])  # FAST has no text encoder: the quality is invisible
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| ranker_towers_only |" in markdown and "efficiency.click" in markdown and "| ceiling" in markdown


def test_ablation_refuses_an_unknown_variant_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown variant.*mmoe_bth.*the grid has mmoe_both"):
        ablation(tmp_path / "missing", tmp_path / "out", variants=["mmoe_bth"])
    assert not (tmp_path / "out").exists()
