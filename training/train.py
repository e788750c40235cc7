"""The training job (``recsys train``): RUN/data + RUN/content -> RUN/model/.

Top to bottom: config -> data -> model (TorchRec tables swapped for the fused row-wise Adagrad
kernels, dense parameters on Adam) -> epochs with validation and early stopping -> the best
epoch's weights in ``RUN/model/model.safetensors``. Every epoch writes a checkpoint
(``RUN/model/checkpoint/``) from which ``--resume`` continues bit-identically: each epoch
reseeds the RNGs from (seed, epoch), so an epoch's work depends only on the state it starts from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchrec.optim as trec_optim
from safetensors.torch import load_file, save_file
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from tqdm import tqdm

from recsys import metrics
from recsys.config import Config
from recsys.errors import ConfigError, RecsysError
from recsys.losses import LOSS_OF_TASK, TaskWeighting, item_log_q, retrieval_loss, task_losses
from recsys.model import ModelSpec, RecsysModel, active_tasks, model_state_dict, save_model
from recsys.rundir import RunDir, atomic_path, write_json
from training.data import TrainingData, batches, load_training_data
from training.distributed import in_torchrun, latest_checkpoint

log = logging.getLogger("recsys.training")


# -- building blocks of the job ------------------------------------------------------------
def build_model(data: TrainingData, cfg: Config) -> RecsysModel:
    """The module for this run's data; tables still plain TorchRec (``fuse_tables`` swaps them)."""
    meta = data.meta
    spec = ModelSpec(
        n_users=int(meta["n_users"]),
        n_items=int(meta["n_items"]),
        history_len=int(meta["history_len"]),
        text_dim=data.text_dim,
        image_dim=data.image_dim,
        tasks=active_tasks(meta["tasks"], cfg.model.tasks),
        rating_range=tuple(meta.get("rating_range") or (cfg.data.rating_min, cfg.data.rating_max)),
        user_features=data.user_features,
        item_features=data.item_features,
        config=cfg.model,
    )
    torch.manual_seed(cfg.train.seed)
    model = RecsysModel(spec)
    model.set_feature_values(**data.feature_values)
    model.set_trained_items(data.train["item_idx"])
    return model


def fuse_tables(model: RecsysModel, embedding_lr: float) -> None:
    """Swap the plain EBC for fbgemm's fused kernels: row-wise Adagrad applied inside backward.

    Same state-dict keys as the plain EBC, so ``model.safetensors`` loads into an unfused model.
    """
    plain = model.embedding_tables
    logging.disable(logging.INFO)  # fbgemm logs every kernel argument at INFO on the root logger
    try:
        fused = FusedEmbeddingBagCollection(
            tables=plain.embedding_bag_configs(), optimizer_type=trec_optim.RowWiseAdagrad, optimizer_kwargs={"lr": embedding_lr}
        )
    finally:
        logging.disable(logging.NOTSET)
    fused.load_state_dict(plain.state_dict())
    model.embedding_tables = fused


def loss_names(tasks: tuple[str, ...]) -> list[str]:
    return [LOSS_OF_TASK[t] for t in tasks]


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


# -- one epoch -------------------------------------------------------------------------------
def batch_losses(outputs, batch, weighting: TaskWeighting, cfg: Config, retrieval: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-task losses (+ the retrieval loss) and the weighted total ``Σ λ_t L_t + w_r L_retrieval``."""
    losses = task_losses(outputs, batch, cfg.train.cvr_on_clicks)
    total = weighting(losses) + cfg.train.retrieval_weight * retrieval
    losses["retrieval"] = retrieval
    return losses, total


def check_finite(total: torch.Tensor, losses: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], step: int, where: str) -> None:
    """Stop the job on a NaN/inf loss, naming where (epoch, step, rank) and the batch."""
    if torch.isfinite(total):
        return
    shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
    raise RecsysError(
        f"training stopped: non-finite loss at {where}; batch {step} has {len(batch['click'])} rows, "
        f"user_idx {batch['user_idx'][:5].tolist()}..., item_idx {batch['item_idx'][:5].tolist()}...; task losses: {shown}. "
        "Look for NaN/inf in RUN/data features or content, or lower train.lr / train.embedding_lr"
    )


def add_losses(sums: dict[str, float], losses: dict[str, torch.Tensor], total: torch.Tensor, rows: int) -> None:
    """Row-weighted running sums of each loss and the total (divided by the rows seen at the end)."""
    for k, v in [*losses.items(), ("total", total)]:
        sums[k] = sums.get(k, 0.0) + float(v.detach()) * rows


def train_epoch(model, weighting, dense_opt, data, log_q, cfg: Config, epoch: int, global_step: int) -> tuple[dict[str, float], int, float]:
    """One pass over the shuffled train split -> mean losses, global step, samples/s."""
    model.train()
    torch.manual_seed(epoch_seed(cfg.train.seed, epoch))  # modality dropout
    n_rows = len(data.train["click"])
    n_batches = math.ceil(n_rows / cfg.train.batch_size)
    shared = model.user_tower.mlp[-1].weight  # GradNorm's shared layer: every head reads the user vector
    sums: dict[str, float] = {}
    seen, started = 0, time.perf_counter()
    progress = tqdm(total=n_rows, desc=f"epoch {epoch}", unit="rows", mininterval=1.0, leave=False)
    for step, batch in enumerate(batches(data.train, cfg.train.batch_size, data.content, seed=epoch_seed(cfg.train.seed, epoch)), 1):
        outputs = model(batch)
        losses, total = batch_losses(outputs, batch, weighting, cfg, retrieval_loss(outputs, batch, log_q, cfg.train.temperature, cfg.train.retrieval_negatives == "all_rows"))
        check_finite(total, losses, batch, step, f"epoch {epoch}, step {step} of {n_batches} (global step {global_step + 1})")
        dense_opt.zero_grad(set_to_none=True)
        gradnorm_grad = None
        if weighting.mode == "gradnorm":
            task_only = {k: v for k, v in losses.items() if k != "retrieval"}
            gradnorm_grad = torch.autograd.grad(weighting.gradnorm_loss(task_only, shared), weighting.gradnorm_w, retain_graph=True)[0]
        total.backward()  # the TorchRec tables are updated here, by the fused row-wise Adagrad
        if gradnorm_grad is not None:
            weighting.gradnorm_w.grad = gradnorm_grad
        dense_opt.step()
        weighting.renormalise()
        global_step += 1
        rows = len(batch["click"])
        seen += rows
        add_losses(sums, losses, total, rows)
        progress.update(rows)
        rate = seen / max(time.perf_counter() - started, 1e-9)
        progress.set_postfix({"samples/s": f"{rate:,.0f}", **{k: f"{v / seen:.4f}" for k, v in sums.items()}}, refresh=False)
    progress.close()
    return {k: v / max(seen, 1) for k, v in sums.items()}, global_step, seen / max(time.perf_counter() - started, 1e-9)


@torch.no_grad()
def validate(model, weighting, split, content, log_q, cfg: Config) -> dict[str, Any]:
    """Losses, AUCs, rating RMSE and mean MMoE gate weights per task over a split."""
    model.eval()
    sums: dict[str, float] = {}
    scores: dict[str, list[torch.Tensor]] = {}
    gates_sum, n = None, 0
    for batch in batches(split, cfg.train.batch_size, content):
        outputs = model(batch)
        losses, total = batch_losses(outputs, batch, weighting, cfg, retrieval_loss(outputs, batch, log_q, cfg.train.temperature, cfg.train.retrieval_negatives == "all_rows"))
        rows = len(batch["click"])
        add_losses(sums, losses, total, rows)
        for k in ("p_click", "p_cvr", "p_ctcvr", "rating"):
            if k in outputs:
                scores.setdefault(k, []).append(outputs[k])
        gates_sum = outputs["gates"].sum(0) if gates_sum is None else gates_sum + outputs["gates"].sum(0)
        if "modality_gates" in outputs:
            sums["_modality_gates"] = sums.get("_modality_gates", 0.0) + outputs["modality_gates"].sum(0)
        n += rows
    modality_gates = sums.pop("_modality_gates", None)
    result: dict[str, Any] = {"loss": {k: v / max(n, 1) for k, v in sums.items()}}
    result.update(head_metrics(split, {k: torch.cat(v) for k, v in scores.items()}))
    result["gates"] = {t: (gates_sum[i] / max(n, 1)).tolist() for i, t in enumerate(model.tasks)}
    if modality_gates is not None:  # gated fusion: mean weight of [id, text?, image?]
        result["modality_gates"] = (modality_gates / max(n, 1)).tolist()
    return result


def head_metrics(labels: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Validation AUCs per head (``auc``) and ``rating_rmse`` from the labels and the heads' scores (keys as ``rank()``)."""
    click = labels["click"]
    auc = {"click": metrics.auc(click, scores["p_click"])}
    if "p_ctcvr" in scores:
        auc["ctcvr"] = metrics.auc(click * labels["conversion"], scores["p_ctcvr"])
        clicked = click > 0
        auc["conversion"] = metrics.auc(labels["conversion"][clicked], scores["p_cvr"][clicked])
    result: dict[str, Any] = {"auc": auc}
    if "rating" in scores:
        rated = ~torch.isnan(labels["rating"])
        result["rating_rmse"] = metrics.rmse(labels["rating"][rated], scores["rating"][rated])
    return result


def selection_score(valid: dict[str, Any], reference: dict[str, float], cfg: Config) -> float:
    """Early stopping and model selection: minus the mean relative validation loss over every objective.

    Each loss (click, ctcvr, rating, retrieval) is divided by its value after the first epoch
    and the ratios averaged with the configured static weights, so every head and the
    retrieval tower count in proportion to how much it has improved, whatever the scale of
    its loss. Selecting on the click/ctcvr AUCs alone kept epochs whose ratings had started
    to over-fit; selecting on the raw sum let the in-batch retrieval loss (about 10x the
    others, and noisy by about 1% between epochs) stop runs whose heads were still improving.
    """
    weights = {"click": cfg.train.click_weight, "ctcvr": cfg.train.conversion_weight, "rating": cfg.train.rating_weight, "retrieval": cfg.train.retrieval_weight}
    terms = {k: weights.get(k, 1.0) for k in reference if reference[k] > 0 and k in valid["loss"]}
    if not terms or sum(terms.values()) <= 0:
        return -float(valid["loss"]["total"])
    return -sum(w * valid["loss"][k] / reference[k] for k, w in terms.items()) / sum(terms.values())


# -- checkpoints -------------------------------------------------------------------------------
def _resume_digest(cfg: Config) -> str:
    """What must not change between a checkpoint and its resume (epochs and patience may)."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("epochs", "patience", "nproc")}
    return hashlib.sha256(json.dumps([dataclasses.asdict(cfg.model), train], sort_keys=True, default=list).encode()).hexdigest()[:16]


def save_checkpoint(ckpt_dir: Path, model, weighting, dense_opt, state: dict[str, Any]) -> None:
    """Tensors -> ``epoch-NNNN.safetensors``; then ``state.json`` (the commit point) names it."""
    tensors = {f"model/{k}": v for k, v in model_state_dict(model).items()}
    tensors.update({f"weighting/{k}": v.detach().clone() for k, v in weighting.state_dict().items()})
    dense = dense_opt.state_dict()
    for i, param_state in dense["state"].items():
        tensors.update({f"adam/{i}/{k}": v.detach().clone() for k, v in param_state.items()})
    fused = model.embedding_tables.fused_optimizer().state_dict()["state"]
    for param_key, param_state in fused.items():
        tensors.update({f"fused/{param_key}/{k}": v.detach().contiguous().clone() for k, v in param_state.items()})
    name = f"epoch-{state['epoch']:04d}.safetensors"
    with atomic_path(ckpt_dir / name) as tmp:
        save_file(tensors, str(tmp))
    write_json(ckpt_dir / "state.json", {**state, "tensors": name, "adam_param_groups": dense["param_groups"]})
    for old in ckpt_dir.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(ckpt_dir: Path, model, weighting, dense_opt) -> dict[str, Any]:
    state = json.loads((ckpt_dir / "state.json").read_text())
    tensors = load_file(str(ckpt_dir / state["tensors"]))

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(section("model/"), strict=True)
    weighting.load_state_dict(section("weighting/"), strict=True)
    adam_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in section("adam/").items():
        index, name = key.split("/", 1)
        adam_state.setdefault(int(index), {})[name] = value
    dense_opt.load_state_dict({"state": adam_state, "param_groups": state["adam_param_groups"]})
    fused_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in section("fused/").items():
        param_key, name = key.split("/", 1)
        fused_state.setdefault(param_key, {})[name] = value
    model.embedding_tables.fused_optimizer().load_state_dict({"state": fused_state})  # copies into fbgemm's buffers
    return state


# -- the job -------------------------------------------------------------------------------------
def train(run: RunDir, resume: bool = False, nproc: int | None = None) -> dict[str, Any]:
    """Train on RUN/data (+ RUN/content); write RUN/model/ and RUN/train_log.jsonl; return the summary."""
    cfg = run.config()
    nproc = nproc if nproc is not None else cfg.train.nproc
    if nproc > 1 or in_torchrun() or (resume and latest_checkpoint(run.model / "checkpoint") is not None):
        from training.train_sharded import train_sharded  # imports this module's helpers

        return train_sharded(run, cfg, resume, nproc)  # N processes, or 1 resuming an N-process checkpoint
    started = time.perf_counter()
    data = load_training_data(run, cfg.model.use_text, cfg.model.use_image)
    model = build_model(data, cfg)
    fuse_tables(model, cfg.train.embedding_lr)
    names = loss_names(model.tasks)
    static = {"click": cfg.train.click_weight, "ctcvr": cfg.train.conversion_weight, "rating": cfg.train.rating_weight}
    weighting = TaskWeighting(names, cfg.train.loss_weights, static)
    dense_opt = torch.optim.Adam(model.dense_parameters() + list(weighting.parameters()), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    counted = None if cfg.train.retrieval_negatives == "all_rows" else data.train["click"]  # q: the candidates' distribution
    log_q = cfg.train.logq_correction * item_log_q(data.train["item_idx"], counted, model.spec.n_items)
    log.info(
        "train: %d rows, valid: %d rows, tasks %s, text %s, image %s, ranker %s",
        len(data.train["click"]), len(data.valid["click"]) if data.valid else 0, ",".join(model.tasks),
        model.use_text, model.use_image, cfg.model.ranker,
    )
    if data.valid is None:
        log.warning("no valid split: early stopping and model selection use the training loss")

    ckpt_dir = run.model / "checkpoint"
    state = {"epoch": 0, "global_step": 0, "best_epoch": 0, "best_score": -math.inf, "bad_epochs": 0, "stopped_early": False, "reference_loss": {}, "lr_scale": 1.0}
    resumed_from = None
    if resume and (ckpt_dir / "state.json").is_file():
        saved = json.loads((ckpt_dir / "state.json").read_text())
        if saved.get("config_digest") != _resume_digest(cfg):
            raise ConfigError(f"{ckpt_dir}: the checkpoint was made with other [model]/[train] settings; start afresh without --resume")
        state = {k: v for k, v in load_checkpoint(ckpt_dir, model, weighting, dense_opt).items() if k in state}
        resumed_from = state["epoch"]
        log.info("resuming after epoch %d (best epoch %d)", state["epoch"], state["best_epoch"])
        _truncate_log(run.train_log, state["epoch"])
    else:
        if resume:
            log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
        run.train_log.unlink(missing_ok=True)
        _clear_checkpoints(ckpt_dir)

    rates: list[float] = []
    last_valid: dict[str, Any] = {}
    for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
        if state["stopped_early"]:
            break
        epoch_started = time.perf_counter()
        train_losses, state["global_step"], rate = train_epoch(model, weighting, dense_opt, data, log_q, cfg, epoch, state["global_step"])
        rates.append(rate)
        if data.valid is not None:
            last_valid = validate(model, weighting, data.valid, data.content, log_q, cfg)
        else:
            last_valid = {"loss": {}, "auc": {}, "gates": {}, "score": -train_losses["total"]}
        epoch_lr = cfg.train.lr * state["lr_scale"]  # the dense lr this epoch ran with
        improved = end_of_epoch(state, last_valid, cfg, epoch)
        set_lr(dense_opt, cfg.train.lr * state["lr_scale"])
        if improved:
            save_model(model, run.model, {"best_epoch": epoch, "valid": _valid_summary(last_valid)})
        log_epoch(run, epoch, train_losses, last_valid, weighting, improved, rate, epoch_started, lr=epoch_lr)
        save_checkpoint(ckpt_dir, model, weighting, dense_opt, {**state, "config_digest": _resume_digest(cfg), "seed": cfg.train.seed, "rng": "torch.manual_seed(epoch_seed(seed, epoch)) at each epoch start"})
        if state["stopped_early"]:
            log.info("early stopping after epoch %d: no improvement for %d epochs", epoch, cfg.train.patience)

    summary = {
        **epochs_summary(state, resumed_from),
        "train_rows": len(data.train["click"]),
        "valid_rows": len(data.valid["click"]) if data.valid else 0,
        "tasks": list(model.tasks),
        "modalities": {"text": model.use_text, "image": model.use_image},
        "samples_per_s": float(np.mean(rates)) if rates else None,
        "seconds": time.perf_counter() - started,
    }
    run.record("train", summary)
    return summary


def end_of_epoch(state: dict[str, Any], last_valid: dict[str, Any], cfg: Config, epoch: int) -> bool:
    """Early-stopping bookkeeping after ``epoch``; returns whether it is the best so far."""
    if last_valid["loss"]:  # a validation split: score relative to its losses after the first epoch
        if not state.get("reference_loss"):
            state["reference_loss"] = {k: float(v) for k, v in last_valid["loss"].items() if k != "total"}
        last_valid["score"] = selection_score(last_valid, state["reference_loss"], cfg)
    improved = state["best_epoch"] == 0 or last_valid["score"] > state["best_score"]
    if improved:
        state.update(best_epoch=epoch, best_score=last_valid["score"], bad_epochs=0)
    else:
        state["bad_epochs"] += 1
        state["lr_scale"] *= cfg.train.plateau_lr_factor  # a plateau: smaller dense steps from here on
    state["epoch"] = epoch
    state["stopped_early"] = state["bad_epochs"] >= cfg.train.patience and epoch < cfg.train.epochs
    return improved


def epochs_summary(state: dict[str, Any], resumed_from: int | None) -> dict[str, Any]:
    """The epoch bookkeeping part of the training summary (both jobs)."""
    return {
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"],
        "best_score": state["best_score"],
        "score": "minus the mean valid loss relative to epoch 1 over the heads and retrieval (-train loss without a valid split)",
        "stopped_early": state["stopped_early"],
        "resumed_from_epoch": resumed_from,
    }


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every param group's learning rate (the dense optimizers; ``state["lr_scale"]`` records it for --resume)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def log_epoch(run: RunDir, epoch: int, train_losses, last_valid, weighting, improved: bool, rate: float, epoch_started: float, **extra: Any) -> None:
    """One line of RUN/train_log.jsonl (the report reads it) and one log message."""
    line = {
        "epoch": epoch,
        "train_loss": train_losses,
        "valid_loss": last_valid["loss"],
        "valid_auc": last_valid["auc"],
        **({"valid_rating_rmse": last_valid["rating_rmse"]} if "rating_rmse" in last_valid else {}),
        "score": last_valid["score"],
        "best": improved,
        "task_weights": weighting.weights(),
        "gates": last_valid["gates"],
        **({"modality_gates": last_valid["modality_gates"]} if "modality_gates" in last_valid else {}),
        "samples_per_s": rate,
        "seconds": time.perf_counter() - epoch_started,
        **extra,
    }
    with open(run.train_log, "a") as handle:
        handle.write(json.dumps(line) + "\n")
    log.info("epoch %d: train %s | valid auc %s | score %.4f%s", epoch, _fmt(train_losses), _fmt(last_valid["auc"]), last_valid["score"], " (best)" if improved else "")


def _valid_summary(valid: dict[str, Any]) -> dict[str, Any]:
    return {k: valid[k] for k in ("auc", "rating_rmse", "score") if k in valid}


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def _truncate_log(path: Path, last_epoch: int) -> None:
    """Drop log lines of epochs after the checkpoint (a killed job may have logged one)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= last_epoch]
        path.write_text("".join(ln + "\n" for ln in lines))


def _clear_checkpoints(ckpt_dir: Path) -> None:
    """Remove every checkpoint of an earlier run (single-process files and DCP directories)."""
    for old in ckpt_dir.glob("*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
