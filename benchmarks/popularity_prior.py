"""How much the towers' full ranking gains from a popularity prior (``model.popularity_prior``), on test and on valid.

    .venv/bin/python benchmarks/popularity_prior.py [--run RUN] [--betas 0,0.025,0.05,0.1,0.15,0.2,0.3]

Scores ``cos(u, v) + b + beta log(1 + clicks of the item)``, ``b`` the item's retrieval bias
(``model.item_bias``; 0 without one), for each beta on a trained run (its own prior, if any, is replaced):

- test: ``retrieval.recall@20`` / ``ndcg@20`` by the evaluation's protocol (``training.retrieval``:
  the user's state at the end of train + valid, train and valid items excluded), the prior counting
  train + valid clicks, as ``training.prior`` deploys it;
- valid: recall@20 of the valid split measured the way test is (``training.prior.valid_recall_by_beta``:
  the user's state at the end of train, train items excluded, train clicks counted), what
  ``model.popularity_prior = "valid"`` chooses beta by.

Without ``--run`` it trains the synthetic fast fixture first (300 users x 300 items x 60k impressions,
seed 0, 12 epochs, in a temporary directory; a few minutes). The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recsys.model import RecsysModel, load_model  # noqa: E402
from recsys.rundir import RunDir  # noqa: E402
from training.evaluate import all_item_states, load_content  # noqa: E402
from training.prior import log_click_counts, valid_recall_by_beta  # noqa: E402
from training.retrieval import known_clicks, rank_catalogue, retrieval_section  # noqa: E402


def with_prior(model: RecsysModel) -> RecsysModel:
    """``model`` with a popularity-prior coordinate (0) if it was trained without one (``model.popularity_prior = "off"``)."""
    if model.has_prior:
        return model
    spec = dataclasses.replace(model.spec, config=model.spec.config.model_copy(update={"popularity_prior": "valid"}))
    rebuilt = RecsysModel(spec)
    missing, unexpected = rebuilt.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["item_prior"] and not unexpected, (missing, unexpected)
    return rebuilt.eval()


def synthetic_run(root: Path) -> RunDir:
    recsys = [sys.executable, "-m", "recsys"]
    subprocess.run([*recsys, "data", "synth", "--out", str(root / "data"), "--users", "300", "--items", "300", "--interactions", "60000", "--seed", "0"], check=True, cwd=REPO)
    subprocess.run([*recsys, "run", "--data", str(root / "data"), "--out", str(root / "run"), "--set", "eval.bootstrap=0", "--set", "train.epochs=12"], check=True, cwd=REPO)
    return RunDir(root / "run")


@torch.inference_mode()
def measure(run: RunDir, betas: list[float]) -> dict:
    cfg = run.config()
    model = with_prior(load_model(run.model))
    valid, valid_users = valid_recall_by_beta(run, model, cfg, betas)
    content = load_content(run, model)
    item_vecs, content_vecs = all_item_states(model, content)  # the prior at 0
    log_clicks = log_click_counts(known_clicks(run), model.spec.n_items)
    test = pl.read_parquet(run.data / "test.parquet")
    rows = []
    for beta in sorted(set(betas)):
        vectors = item_vecs.clone()
        vectors[:, -1] += beta * log_clicks
        section = retrieval_section(rank_catalogue(run, model, vectors, test, cfg.eval, content_vecs=content_vecs), cfg.eval.ks)
        row = {"beta": beta, "test_recall@20": round(section["recall@20"], 4), "test_ndcg@20": round(section["ndcg@20"], 4), "valid_recall@20": round(valid[repr(float(beta))], 4)}
        print(f"beta {beta:g}: test recall@20 {row['test_recall@20']:.4f} ndcg@20 {row['test_ndcg@20']:.4f} | valid recall@20 {row['valid_recall@20']:.4f}", flush=True)
        rows.append(row)
    best_valid = max(rows, key=lambda r: (r["valid_recall@20"], -r["beta"]))["beta"]
    best_test = max(rows, key=lambda r: (r["test_recall@20"], -r["beta"]))["beta"]
    return {"run": str(run.root), "item_bias": model.spec.config.item_bias, "valid_users": valid_users,
            "beta_chosen_on_valid": best_valid, "beta_best_on_test": best_test, "rows": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: train the synthetic fast fixture)")
    parser.add_argument("--betas", default="0,0.025,0.05,0.1,0.15,0.2,0.3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    betas = [float(b) for b in args.betas.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(args.run) if args.run else synthetic_run(Path(tmp))
        print(json.dumps(measure(run, betas)))


if __name__ == "__main__":
    main()
