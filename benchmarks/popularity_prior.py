"""How much the towers' full ranking gains from a popularity prior added after training, on test and on valid.

    .venv/bin/python benchmarks/popularity_prior.py [--run RUN] [--betas 0,0.025,0.05,0.1,0.2]

Scores ``cos(u, v) + gamma b + beta log(1 + train clicks of the item)``, ``b`` the item's retrieval
bias (``model.item_bias``; 0 without one). For each beta (gamma = 1), and for gamma = 0 (the bias
left out) on a model with a bias:

- test: ``retrieval.recall@20`` / ``ndcg@20`` by the evaluation's protocol (``training.retrieval``:
  the user's state at the end of train + valid, train and valid items excluded);
- valid: hit@20 of every clicked valid row scored with its own history, its user's train items excluded
  (what model selection could see; only the valid split may choose beta).

Without ``--run`` it trains the synthetic fast fixture first (300 users x 300 items x 60k impressions,
seed 0, 12 epochs, in a temporary directory; a few minutes). The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recsys.history import mean_content, padded_history  # noqa: E402
from recsys.model import load_model  # noqa: E402
from recsys.rundir import RunDir  # noqa: E402
from training.evaluate import all_item_states, load_content  # noqa: E402
from training.retrieval import known_clicks, rank_catalogue, retrieval_section  # noqa: E402


class _Scored:
    """The model's user tower with its vectors cut to the unit part and a 1 appended (the prior's coordinate)."""

    def __init__(self, model):
        self.model, self.spec, self.content_history = model, model.spec, model.content_history

    def user_vectors(self, user_idx, history, history_content=None):
        unit = self.model.user_vectors(user_idx, history, history_content)[:, : self.spec.config.dim]
        return torch.cat([unit, torch.ones(len(unit), 1)], dim=1)


def synthetic_run(root: Path) -> RunDir:
    recsys = [sys.executable, "-m", "recsys"]
    subprocess.run([*recsys, "data", "synth", "--out", str(root / "data"), "--users", "300", "--items", "300", "--interactions", "60000", "--seed", "0"], check=True, cwd=REPO)
    subprocess.run([*recsys, "run", "--data", str(root / "data"), "--out", str(root / "run"), "--set", "eval.bootstrap=0", "--set", "train.epochs=12"], check=True, cwd=REPO)
    return RunDir(root / "run")


@torch.inference_mode()
def measure(run: RunDir, betas: list[float]) -> dict:
    cfg = run.config().eval
    model = load_model(run.model)
    content = load_content(run, model)
    item_vecs, content_vecs = all_item_states(model, content)
    d, n = model.spec.config.dim, model.spec.n_items
    bias = item_vecs[:, d] if model.spec.config.item_bias else torch.zeros(n)
    known = known_clicks(run)
    log_pop = torch.log1p(torch.from_numpy(np.bincount(known.filter(pl.col("split") == "train")["item_idx"].to_numpy(), minlength=n)[:n]).float())
    test = pl.read_parquet(run.data / "test.parquet")

    # valid: every clicked row with its own history; its user's train positives excluded (not the row's own item)
    valid = pl.read_parquet(run.data / "valid.parquet").filter(pl.col("click") == 1)
    users = torch.from_numpy(valid["user_idx"].to_numpy().astype(np.int64))
    items = torch.from_numpy(valid["item_idx"].to_numpy().astype(np.int64))
    history = torch.from_numpy(padded_history(valid["history"], model.spec.history_len))
    user_vecs = _Scored(model).user_vectors(users, history, mean_content(content_vecs, history) if model.content_history else None)
    positives = known.filter(pl.col("split") == "train").select("user_idx", "item_idx").unique()
    row_of = pl.DataFrame({"user_idx": valid["user_idx"].cast(pl.Int64), "row": np.arange(valid.height)})
    pairs = positives.join(row_of, on="user_idx")
    excluded = torch.zeros(valid.height, n, dtype=torch.bool)
    excluded[torch.from_numpy(pairs["row"].to_numpy()), torch.from_numpy(pairs["item_idx"].to_numpy())] = True
    excluded[torch.arange(valid.height), items] = False
    excluded[:, 0] = True

    def scored(gamma: float, beta: float) -> dict:
        vectors = torch.cat([item_vecs[:, :d], (gamma * bias + beta * log_pop).unsqueeze(1)], dim=1)
        section = retrieval_section(rank_catalogue(run, _Scored(model), vectors, test, cfg, content_vecs=content_vecs), cfg.ks)
        top = (user_vecs @ vectors.T).masked_fill(excluded, float("-inf")).topk(20, dim=1).indices
        hit = float((top == items.unsqueeze(1)).any(1).float().mean())
        row = {"gamma": gamma, "beta": beta, "test_recall@20": round(section["recall@20"], 4), "test_ndcg@20": round(section["ndcg@20"], 4), "valid_hit@20": round(hit, 4)}
        print(f"gamma {gamma:g} beta {beta:g}: test recall@20 {row['test_recall@20']:.4f} ndcg@20 {row['test_ndcg@20']:.4f} | valid hit@20 {hit:.4f}", flush=True)
        return row

    rows = [scored(1.0, beta) for beta in betas]
    if model.spec.config.item_bias:
        rows.append(scored(0.0, 0.0))
    correlation = float(np.corrcoef(bias[1:].numpy(), log_pop[1:].numpy())[0, 1]) if model.spec.config.item_bias else None
    best_valid = max(rows[: len(betas)], key=lambda r: r["valid_hit@20"])["beta"]
    best_test = max(rows[: len(betas)], key=lambda r: r["test_recall@20"])["beta"]
    return {"run": str(run.root), "item_bias": model.spec.config.item_bias, "bias_log_popularity_correlation": correlation,
            "valid_rows": valid.height, "beta_chosen_on_valid": best_valid, "beta_best_on_test": best_test, "rows": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: train the synthetic fast fixture)")
    parser.add_argument("--betas", default="0,0.025,0.05,0.1,0.2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    betas = [float(b) for b in args.betas.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(args.run) if args.run else synthetic_run(Path(tmp))
        print(json.dumps(measure(run, betas)))


if __name__ == "__main__":
    main()
