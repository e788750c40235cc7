"""How much of the learnable signal a trained run gets, on data with ground truth (``recsys data synth``).

AUC efficiency = (model AUC - 0.5) / (oracle AUC - 0.5) on the test split, the oracle being the
generator's true probabilities (``DATA/truth.parquet``). Beside it the data-limited ceiling
(``training.ceiling``): a learner given the true item attributes that fits per-user weights on
the train rows only, so "the model vs the ceiling" says how much of what these rows allow the
model learns, and "the ceiling vs the oracle" how much the rows allow at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from safetensors.torch import load_file

from recsys import metrics as m
from recsys.model import load_model
from recsys.rundir import RunDir
from training.ceiling import ceiling_scores, decode_attributes, fit_ceiling
from training.evaluate import load_content, score_rows

TRUTH_FILES = ("truth.parquet", "truth_items.parquet")


def has_truth(dataset: Path) -> bool:
    """Whether ``dataset`` carries the generator's ground truth (the files ``recsys data synth`` writes)."""
    return all((Path(dataset) / name).is_file() for name in TRUTH_FILES)


def _efficiency(labels: np.ndarray, scores: np.ndarray, oracle: np.ndarray, rows=slice(None)) -> float:
    return float((m.auc(labels[rows], scores[rows]) - 0.5) / (m.auc(labels[rows], oracle[rows]) - 0.5))


def truth_quality(run: RunDir, dataset: Path, ceiling: bool = True) -> dict[str, float]:
    """Test-split AUC efficiencies and rating RMSE over the oracle's, of the model and (``ceiling``) of the ceiling; cold and warm items apart.

    Keys: ``click``, ``conversion`` (clicked rows), ``ctcvr``, ``rating_rmse_ratio``, ``click_cold``,
    ``click_warm``, ``click_cold_content`` (cold rows against what their content can tell at best),
    ``cold_rows``, and ``ceiling_*`` for the first four; with ``ceiling`` also ``decoded_ceiling_*``
    (the ceiling with the texture and quality as a linear probe reads them from this run's encoder
    vectors, ``training.ceiling.decode_attributes``), ``probe_quality_r2`` and ``probe_texture_accuracy``.
    """
    dataset = Path(dataset)
    model = load_model(run.model)
    test = pl.read_parquet(run.data / "test.parquet")
    scores, _ = score_rows(model, test, load_content(run, model))
    truth = test.select("user_id", "item_id", "timestamp").join(
        pl.read_parquet(dataset / "truth.parquet"), on=["user_id", "item_id", "timestamp"], how="left", maintain_order="left"
    )
    click = test["click"].to_numpy().astype(float)
    conversion = test["conversion"].fill_null(0).to_numpy().astype(float)
    rating = test["rating"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    clicked, rated = click > 0, np.isfinite(rating)
    trained_items = np.zeros(model.spec.n_items, bool)
    trained_items[pl.read_parquet(run.data / "train.parquet", columns=["item_idx"])["item_idx"].to_numpy()] = True
    cold = ~trained_items[test["item_idx"].to_numpy()]
    p_click, p_conversion, p_ctcvr = (truth[c].to_numpy() for c in ("p_click", "p_conversion", "p_ctcvr"))
    oracle_rmse = m.rmse(rating[rated], truth["rating_mean"].to_numpy()[rated])

    out = {
        "click": _efficiency(click, scores["p_click"], p_click),
        "conversion": _efficiency(conversion, scores["p_cvr"], p_conversion, clicked),
        "ctcvr": _efficiency(click * conversion, scores["p_ctcvr"], p_ctcvr),
        "rating_rmse_ratio": float(m.rmse(rating[rated], scores["rating"][rated]) / oracle_rmse),
        "click_cold": _efficiency(click, scores["p_click"], p_click, cold),
        "click_warm": _efficiency(click, scores["p_click"], p_click, ~cold),
        "click_cold_content": _efficiency(click, scores["p_click"], truth["p_click_content"].to_numpy(), cold),
        "cold_rows": int(cold.sum()),
    }
    if ceiling:
        train = pl.read_parquet(run.data / "train.parquet", columns=["user_id", "item_id", "click", "conversion", "rating", "sampled"])
        truth_items = pl.read_parquet(dataset / "truth_items.parquet")
        decoded, probe = decode_attributes(truth_items, *_encoder_vectors(run, truth_items["item_id"]))
        for prefix, items in (("ceiling_", truth_items), ("decoded_ceiling_", decoded)):
            best = ceiling_scores(fit_ceiling(train, items), test)
            out.update({
                f"{prefix}click": _efficiency(click, best["p_click"], p_click),
                f"{prefix}conversion": _efficiency(conversion, best["p_cvr"], p_conversion, clicked),
                f"{prefix}ctcvr": _efficiency(click * conversion, best["p_ctcvr"], p_ctcvr),
                f"{prefix}rating_rmse_ratio": float(m.rmse(rating[rated], best["rating"][rated]) / oracle_rmse),
            })  # fmt: skip
        out.update({"probe_quality_r2": probe.quality_r2, "probe_texture_accuracy": probe.texture_accuracy})
    return out


def _encoder_vectors(run: RunDir, item_ids: pl.Series) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The run's text and image encoder vectors (``RUN/content``) in ``item_ids``' order; NaN rows where an item has none."""
    path = run.content / "embeddings.safetensors"
    tensors = load_file(str(path)) if path.is_file() else {}
    index = pl.DataFrame({"item_id": item_ids}).join(pl.read_parquet(run.data / "items.parquet", columns=["item_id", "item_idx"]), on="item_id", how="left", maintain_order="left")
    rows = index["item_idx"].fill_null(-1).to_numpy()

    def aligned(name: str) -> np.ndarray | None:
        if name not in tensors:
            return None
        vectors, present = tensors[name].float().numpy().astype(np.float64), tensors[f"{name}_mask"].numpy().astype(bool)
        out = np.full((len(rows), vectors.shape[1]), np.nan)
        known = (rows >= 0) & present[np.maximum(rows, 0)]
        out[known] = vectors[rows[known]]
        return out

    return aligned("text"), aligned("image")
