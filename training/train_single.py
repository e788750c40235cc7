"""The training job in one process (``recsys train``, ``train.nproc = 1``): RUN/data + RUN/content -> RUN/model/.

Top to bottom: config -> data -> model (TorchRec tables swapped for the fused row-wise Adagrad
kernels, dense parameters on Adam) -> epochs with validation and early stopping -> the best
epoch's weights in ``RUN/model/model.safetensors``. Every epoch writes a checkpoint
(``RUN/model/checkpoint/``) from which ``--resume`` continues bit-identically: each epoch
reseeds the RNGs from (seed, epoch), so an epoch's work depends only on the state it starts from.
The epoch machinery it shares with the N-process job is in ``training.epochs``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchrec.optim as trec_optim
from safetensors.torch import load_file, save_file
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from tqdm import tqdm

from recsys.config import Config
from recsys.errors import ConfigError
from recsys.model import RecsysModel, model_state_dict, save_model
from recsys.rundir import RunDir, atomic_path, read_json, write_json
from training.data import StreamedSplit, TrainingData, batches, concat_splits, load_training_data
from training.calibration import calibrate_ratings
from training.prior import apply_prior, choose_prior, user_state_recall
from training.warm_start import warm_start
from training.epochs import (
    add_losses, averages_weights, batch_losses, build_model, check_finite, check_resume_digest, clear_checkpoints, end_of_epoch, epoch_seed,
    epochs_summary, head_metrics, log_epoch, new_state, resume_digest, set_lr, task_weighting, train_loss_as_valid, truncate_log,
    valid_summary, reads_timestamps, RetrievalObjective, WeightAverage, selection_score, valid_recall,
)  # fmt: skip

log = logging.getLogger("recsys.training")


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


# -- one epoch -------------------------------------------------------------------------------
@dataclass
class EpochPosition:
    """Where a mid-epoch checkpoint stopped: batches done in the epoch, their loss sums and rows, the RNG after them."""

    step: int
    sums: dict[str, float]
    seen: int
    rng: torch.Tensor


def train_epoch(
    model, weighting, dense_opt, data, objective: RetrievalObjective, cfg: Config, epoch: int, global_step: int,
    resume_at: EpochPosition | None = None, checkpoint: Callable[[EpochPosition, int], None] | None = None,
) -> tuple[dict[str, float], int, float]:
    """One pass over the shuffled train split -> mean losses, global step, samples/s.

    ``resume_at``: continue the epoch after that many batches (the same order, the RNG and loss
    sums as they were); ``checkpoint(position, global_step)`` is called every
    ``train.checkpoint_every_steps`` batches within the epoch.
    """
    model.train()
    torch.manual_seed(epoch_seed(cfg.train.seed, epoch))  # modality dropout
    n_rows = len(data.train["click"])
    n_batches = math.ceil(n_rows / cfg.train.batch_size)
    shared = model.user_tower.mlp[-1].weight  # GradNorm's shared layer: every head reads the user vector
    sums: dict[str, float] = dict(resume_at.sums) if resume_at else {}
    seen = resume_at.seen if resume_at else 0
    done_before, started = seen, time.perf_counter()
    if resume_at:
        torch.set_rng_state(resume_at.rng)
    every = cfg.train.checkpoint_every_steps
    progress = tqdm(total=n_rows, initial=seen, desc=f"epoch {epoch}", unit="rows", mininterval=1.0, leave=False)
    skip = resume_at.step if resume_at else 0
    for step, batch in enumerate(batches(data.train, cfg.train.batch_size, data.content, seed=epoch_seed(cfg.train.seed, epoch), skip=skip), skip + 1):
        outputs = model(batch)
        losses, total = batch_losses(outputs, batch, weighting, cfg, objective.loss(model, outputs, batch))
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
        seen += add_losses(sums, losses, total, len(batch["click"]))
        progress.update(len(batch["click"]))
        rate = (seen - done_before) / max(time.perf_counter() - started, 1e-9)
        progress.set_postfix({"samples/s": f"{rate:,.0f}", **{k: f"{v / seen:.4f}" for k, v in sums.items()}}, refresh=False)
        if checkpoint is not None and every and step % every == 0 and step < n_batches:
            checkpoint(EpochPosition(step, dict(sums), seen, torch.get_rng_state()), global_step)
    progress.close()
    return {k: v / max(seen, 1) for k, v in sums.items()}, global_step, (seen - done_before) / max(time.perf_counter() - started, 1e-9)


@torch.no_grad()
def validate(model, weighting, split, content, objective: RetrievalObjective, cfg: Config, run: RunDir | None = None) -> dict[str, Any]:
    """Losses, AUCs, rating RMSE, the towers' recall@K and mean MMoE gate weights per task over a split.

    Batches are shuffled (a fixed order): the split is sorted by user, and a batch of one
    user's rows would make the sampled retrieval loss meaningless.
    """
    model.eval()
    sums: dict[str, float] = {}
    scores: dict[str, list[torch.Tensor]] = {}
    labels: dict[str, list[torch.Tensor]] = {}
    gates_sum, n = None, 0
    torch.manual_seed(cfg.train.seed)  # the uniform negatives of the sampled softmax
    for batch in batches(split, cfg.train.batch_size, content, seed=cfg.train.seed):
        outputs = model(batch)
        losses, total = batch_losses(outputs, batch, weighting, cfg, objective.loss(model, outputs, batch))
        rows = len(batch["click"])
        add_losses(sums, losses, total, rows)
        for k in ("p_click", "p_cvr", "p_ctcvr", "rating"):
            if k in outputs:
                scores.setdefault(k, []).append(outputs[k])
        for k in ("click", "conversion", "rating"):  # the labels in the same (shuffled) order as the scores
            if k in batch:
                labels.setdefault(k, []).append(batch[k])
        gates_sum = outputs["gates"].sum(0) if gates_sum is None else gates_sum + outputs["gates"].sum(0)
        if "modality_gates" in outputs:
            sums["_modality_gates"] = sums.get("_modality_gates", 0.0) + outputs["modality_gates"].sum(0)
        n += rows
    modality_gates = sums.pop("_modality_gates", None)
    result: dict[str, Any] = {"loss": {k: v / max(n, 1) for k, v in sums.items()}}
    result.update(head_metrics({k: torch.cat(v) for k, v in labels.items()}, {k: torch.cat(v) for k, v in scores.items()}))
    result["gates"] = {t: (gates_sum[i] / max(n, 1)).tolist() for i, t in enumerate(model.tasks)}
    if modality_gates is not None:  # gated fusion: mean weight of [id, text?, image?]
        result["modality_gates"] = (modality_gates / max(n, 1)).tolist()
    if cfg.train.selection_recall == "user_state" and run is not None:  # valid measured like test (training.prior)
        result["recall"] = user_state_recall(run, model, cfg)
    else:
        result["recall"] = valid_recall(model, split, objective, cfg.train.selection_recall_k, cfg.train.selection_recall_rows, cfg.train.seed)
    return result


# -- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(
    ckpt_dir: Path, model, weighting, dense_opt, state: dict[str, Any], average: WeightAverage | None = None, position: EpochPosition | None = None
) -> None:
    """Tensors -> ``epoch-NNNN[-step-SSSSSSSS].safetensors``; then ``state.json`` (the commit point) names it.

    ``state["epoch"]`` is the last epoch completed; ``position`` (a checkpoint within the next
    epoch) adds the batches done in it, their loss sums and the RNG state.
    """
    tensors = {f"model/{k}": v for k, v in model_state_dict(model).items()}
    if average is not None:
        tensors.update(average.to_tensors())
    if position is not None:
        tensors["position/rng"] = position.rng
        state = {**state, "position": {"step": position.step, "sums": position.sums, "seen": position.seen}}
    tensors.update({f"weighting/{k}": v.detach().clone() for k, v in weighting.state_dict().items()})
    dense = dense_opt.state_dict()
    for i, param_state in dense["state"].items():
        tensors.update({f"adam/{i}/{k}": v.detach().clone() for k, v in param_state.items()})
    fused = model.embedding_tables.fused_optimizer().state_dict()["state"]
    for param_key, param_state in fused.items():
        tensors.update({f"fused/{param_key}/{k}": v.detach().contiguous().clone() for k, v in param_state.items()})
    name = f"epoch-{state['epoch']:04d}" + (f"-step-{position.step:08d}" if position is not None else "") + ".safetensors"
    with atomic_path(ckpt_dir / name) as tmp:
        save_file(tensors, str(tmp))
    write_json(ckpt_dir / "state.json", {**state, "tensors": name, "adam_param_groups": dense["param_groups"]})
    for old in ckpt_dir.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(ckpt_dir: Path, model, weighting, dense_opt) -> tuple[dict[str, Any], WeightAverage, EpochPosition | None]:
    """The checkpoint into the model and optimizers; returns its bookkeeping, the weight average it carried (maybe empty)
    and, for a checkpoint within an epoch, where in the epoch it was taken."""
    state = json.loads((ckpt_dir / "state.json").read_text())
    tensors = load_file(str(ckpt_dir / state["tensors"]))
    average = WeightAverage.from_tensors(tensors, state.get("average_epochs", []))
    saved = state.get("position")
    position = EpochPosition(saved["step"], saved["sums"], saved["seen"], tensors["position/rng"]) if saved else None

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
    return state, average, position


def _keep_average_if_better(run: RunDir, model, weighting, data, objective, cfg: Config, state: dict[str, Any], average: WeightAverage) -> dict[str, Any] | None:
    """Validate the weight average like an epoch; it becomes RUN/model when it scores above the selected epoch."""
    if len(average.epochs) < 2 or data.valid is None or not state.get("reference_loss"):
        if average.epochs:
            log.info("weight average: %d epoch(s) averaged, not compared (needs 2 and a valid split)", len(average.epochs))
        return {"epochs": list(average.epochs), "kept": False, "reason": "fewer than 2 epochs averaged or no valid split"} if average.epochs else None
    model.load_state_dict(average.mean, strict=True)
    valid = validate(model, weighting, data.valid, data.content, objective, cfg, run)
    score = selection_score(valid, state["reference_loss"], cfg)
    kept = score > state["best_score"]
    if kept:
        save_model(model, run.model, {"best_epoch": state["best_epoch"], "averaged_epochs": list(average.epochs), "valid": valid_summary({**valid, "score": score})})
    log.info("weight average of epochs %s: valid score %.4f vs the selected epoch %d's %.4f: %s", average.epochs, score, state["best_epoch"], state["best_score"], "kept" if kept else "not kept")
    return {"epochs": list(average.epochs), "score": score, "selected_epoch_score": state["best_score"], "kept": kept, "valid": valid_summary(valid)}


def refit_on_valid(run: RunDir, data: TrainingData, cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    """``train.refit``: a fresh model trained on train + valid rows for the selected epoch count, replacing the selected model.

    The valid split chose the epoch count (``state["best_epoch"]``) and, through its plateaus, the
    dense lr of each epoch (read back from the training log); the refit replays both on the train
    rows followed by the valid rows, from the same seed, so it differs from the selected model only
    by what the valid rows teach. Nothing of the test split is read. Its validation figures in
    ``model.json`` stay the selected epoch's (the refit model has seen the valid rows).
    """
    if data.valid is None or isinstance(data.train, StreamedSplit) or cfg.train.init_from:
        why = "no valid split" if data.valid is None else "the train split is streamed" if isinstance(data.train, StreamedSplit) else "an update (train.init_from) warm-starts its model"
        log.warning("train.refit: not done (%s); the selected model is kept", why)
        return {"done": False, "reason": why}
    started = time.perf_counter()
    epochs = state["best_epoch"]
    lrs = {line["epoch"]: line["lr"] for line in map(json.loads, run.train_log.read_text().splitlines()) if "lr" in line}
    both = dataclasses.replace(data, train=concat_splits([dict(data.train), dict(data.valid)]), valid=None, valid_rows=0)
    model = build_model(both, cfg)
    fuse_tables(model, cfg.train.embedding_lr)
    weighting = task_weighting(model.tasks, cfg)
    dense_opt = torch.optim.Adam(model.dense_parameters() + list(weighting.parameters()), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    objective = RetrievalObjective(cfg, both.train, model.spec.n_items, both.content, both.meta)
    log.info("train.refit: %d train + %d valid rows, %d epoch(s) (the selected count)", len(data.train["click"]), len(data.valid["click"]), epochs)
    global_step = 0
    for epoch in range(1, epochs + 1):
        set_lr(dense_opt, lrs.get(epoch, cfg.train.lr))
        losses, global_step, _ = train_epoch(model, weighting, dense_opt, both, objective, cfg, epoch, global_step)
        weighting.end_epoch(losses)
    selected = json.loads((run.model / "model.json").read_text())
    out = {"done": True, "epochs": epochs, "rows": len(both.train["click"]), "seconds": round(time.perf_counter() - started, 2)}
    save_model(model, run.model, {"best_epoch": epochs, "valid": selected.get("valid"), "refit": out})
    return out


# -- the job -------------------------------------------------------------------------------------
def train_single(run: RunDir, cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train on RUN/data (+ RUN/content) in this process; write RUN/model/ and RUN/train_log.jsonl; return the summary."""
    started = time.perf_counter()
    if cfg.train.refit and cfg.train.average_weights is True:
        raise ConfigError("train.refit and train.average_weights both replace the selected model: set one of them")
    n_items = int(read_json(run.require(run.data / "meta.json", "prepare"))["n_items"])
    data = load_training_data(run, cfg.model.use_text, cfg.model.use_image, memory_budget_mb=cfg.train.memory_budget_mb, timestamps=reads_timestamps(cfg, n_items))
    model = build_model(data, cfg)
    fuse_tables(model, cfg.train.embedding_lr)
    weighting = task_weighting(model.tasks, cfg)
    dense_opt = torch.optim.Adam(model.dense_parameters() + list(weighting.parameters()), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    objective = RetrievalObjective(cfg, data.train, model.spec.n_items, data.content, data.meta)
    log.info(
        "train: %d rows, valid: %d rows, tasks %s, text %s, image %s, ranker %s over %s, retrieval: %s",
        len(data.train["click"]), len(data.valid["click"]) if data.valid else 0, ",".join(model.tasks),
        model.use_text, model.use_image, cfg.model.ranker, cfg.model.ranker_input, objective.describe(),
    )
    if data.valid is None:
        log.warning("no valid split: early stopping and model selection use the training loss")

    ckpt_dir = run.model / "checkpoint"
    state = new_state()
    average = WeightAverage() if averages_weights(cfg, model) else None
    resumed_from, position = None, None
    warm: dict[str, Any] | None = None
    if resume and (ckpt_dir / "state.json").is_file():
        check_resume_digest(json.loads((ckpt_dir / "state.json").read_text()), cfg, ckpt_dir)
        saved, saved_average, position = load_checkpoint(ckpt_dir, model, weighting, dense_opt)
        state = {**state, **{k: v for k, v in saved.items() if k in state}}
        if average is not None:
            average = saved_average
        resumed_from = state["epoch"]
        where = f", {position.step} batches into epoch {state['epoch'] + 1}" if position else ""
        log.info("resuming after epoch %d%s (best epoch %d)", state["epoch"], where, state["best_epoch"])
        truncate_log(run.train_log, state["epoch"])
    else:
        if resume:
            log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
        run.train_log.unlink(missing_ok=True)
        clear_checkpoints(ckpt_dir)
        if cfg.train.init_from:  # an update: the earlier run's weights, its tables grown
            warm = warm_start(model, RunDir(cfg.train.init_from))

    rates: list[float] = []
    last_valid: dict[str, Any] = {}
    resume_at = position  # a checkpoint taken within an epoch: continue that epoch where it stopped

    def checkpoint_within(position: EpochPosition, global_step: int) -> None:
        save_checkpoint(ckpt_dir, model, weighting, dense_opt, {**state, "global_step": global_step, "config_digest": resume_digest(cfg), "seed": cfg.train.seed}, average, position)

    for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
        if state["stopped_early"]:
            break
        epoch_started = time.perf_counter()
        train_losses, state["global_step"], rate = train_epoch(model, weighting, dense_opt, data, objective, cfg, epoch, state["global_step"], resume_at, checkpoint_within)
        resume_at = None
        rates.append(rate)
        if data.valid is not None:
            last_valid = validate(model, weighting, data.valid, data.content, objective, cfg, run)
        else:
            last_valid = train_loss_as_valid(train_losses)
        epoch_lr = cfg.train.lr * state["lr_scale"]  # the dense lr this epoch ran with
        improved = end_of_epoch(state, last_valid, cfg, epoch)
        set_lr(dense_opt, cfg.train.lr * state["lr_scale"])
        if improved:
            save_model(model, run.model, {"best_epoch": epoch, "valid": valid_summary(last_valid)})
        if average is not None and (average.epochs or not improved):  # from the first plateau on
            average.add(model, epoch)
            state["average_epochs"] = list(average.epochs)
        log_epoch(run, epoch, train_losses, last_valid, weighting, improved, rate, epoch_started, lr=epoch_lr)
        weighting.end_epoch(train_losses)  # DWA: the weights of the next epoch (after the log, which shows this epoch's)
        save_checkpoint(ckpt_dir, model, weighting, dense_opt, {**state, "config_digest": resume_digest(cfg), "seed": cfg.train.seed, "rng": "torch.manual_seed(epoch_seed(seed, epoch)) at each epoch start"}, average)
        if state["stopped_early"]:
            log.info("early stopping after epoch %d: no improvement for %d epochs", epoch, cfg.train.patience)

    averaged = _keep_average_if_better(run, model, weighting, data, objective, cfg, state, average) if average is not None else None
    prior = choose_prior(run, cfg)  # on the selected model, before a refit sees the valid rows
    refit = refit_on_valid(run, data, cfg, state) if cfg.train.refit else None
    if prior is not None:
        apply_prior(run, prior)
    calibration = calibrate_ratings(run, cfg)
    summary = {
        **epochs_summary(state, resumed_from),
        **({"weight_average": averaged} if averaged else {}),
        **({"refit": refit} if refit else {}),
        **({"popularity_prior": prior} if prior is not None else {}),
        **({"rating_calibration": calibration} if calibration is not None else {}),
        "train_rows": len(data.train["click"]),
        "train_read": "in memory" if isinstance(data.train, dict) else f"in chunks of {data.train.chunk_rows} rows (train.memory_budget_mb)",
        "valid_rows": len(data.valid["click"]) if data.valid else 0,
        "tasks": list(model.tasks),
        "modalities": {"text": model.use_text, "image": model.use_image},
        "retrieval_objective": objective.describe(),
        "samples_per_s": float(np.mean(rates)) if rates else None,
        "seconds": time.perf_counter() - started,
        **({"warm_start": warm} if warm else {}),
    }
    run.record("train", summary)
    return summary
