"""The epoch machinery both training jobs share (single-process ``training.train_single`` and
N-process ``training.train_sharded``): building the model, the loss of a batch, validation
metrics, model selection and early stopping, the per-epoch log, and checkpoint housekeeping.

The jobs import this module; it imports neither of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from recsys import metrics
from recsys.config import Config, section_dict
from recsys.errors import ConfigError, RecsysError
from recsys.losses import LOSS_OF_TASK, TaskWeighting, full_softmax_loss, mixed_log_q, retrieval_loss, set_softmax_loss, task_losses
from recsys.history import mean_content
from recsys.model import ModelSpec, RecsysModel, active_tasks, catalogue_states
from recsys.rundir import RunDir
from training.data import TrainingData, history_content_sums

log = logging.getLogger("recsys.training")


# -- the model and its losses -----------------------------------------------------------------
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


def loss_names(tasks: tuple[str, ...]) -> list[str]:
    """The loss of each head (the conversion head trains through ESMM's ctcvr loss)."""
    return [LOSS_OF_TASK[t] for t in tasks]


def task_weighting(tasks: tuple[str, ...], cfg: Config) -> TaskWeighting:
    """The configured combination of the task losses (static weights or learned ones)."""
    static = {"click": cfg.train.click_weight, "ctcvr": cfg.train.conversion_weight, "rating": cfg.train.rating_weight}
    return TaskWeighting(loss_names(tasks), cfg.train.loss_weights, static)


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch reseeds from (seed, epoch): its work depends only on the state it starts from."""
    return seed * 100_003 + epoch


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


def add_losses(sums: dict[str, float], losses: dict[str, torch.Tensor], total: torch.Tensor, rows: int) -> int:
    """Row-weighted running sums of each loss and the total (divided by the rows seen at the end); returns ``rows``."""
    for k, v in [*losses.items(), ("total", total)]:
        sums[k] = sums.get(k, 0.0) + float(v.detach()) * rows
    return rows


# -- validation and model selection ---------------------------------------------------------------
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
    its loss. The towers' valid recall@K (``valid["recall"]``) counts as one more term, the
    inverse ratio (epoch-1 recall / now, lower is better like a loss), weighted as the
    retrieval loss. Selecting on the click/ctcvr AUCs alone kept epochs whose ratings had
    started to over-fit; selecting on the raw sum let the in-batch retrieval loss (about 10x
    the others, and noisy by about 1% between epochs) stop runs whose heads were still improving.
    """
    weights = {"click": cfg.train.click_weight, "ctcvr": cfg.train.conversion_weight, "rating": cfg.train.rating_weight, "retrieval": cfg.train.retrieval_weight}
    ratios = {k: valid["loss"][k] / reference[k] for k in reference if k in valid["loss"] and reference[k] > 0}
    if reference.get("recall", 0) > 0 and valid.get("recall") is not None:
        ratios["recall"] = reference["recall"] / max(valid["recall"], 1e-6)
    terms = {k: weights.get(k, weights["retrieval"] if k == "recall" else 1.0) for k in ratios}
    if not terms or sum(terms.values()) <= 0:
        return -float(valid["loss"]["total"])
    return -sum(w * ratios[k] for k, w in terms.items()) / sum(terms.values())


# -- the towers' objective and their validation recall ---------------------------------------------
def uses_full_softmax(cfg: Config, n_items: int) -> bool:
    """Whether one process's towers train on a softmax over the whole catalogue (``train.retrieval_softmax``)."""
    mode = cfg.train.retrieval_softmax
    return mode == "full" or (mode == "auto" and n_items - 1 <= cfg.train.full_softmax_max_items)


def reads_timestamps(cfg: Config, n_items: int) -> bool:
    """Whether the training data must carry each row's timestamp: ``train.future_positives`` on a full softmax."""
    return cfg.train.future_positives > 0 and uses_full_softmax(cfg, n_items)


AUTO_SET_WEIGHT = 1.0  # train.set_weight = "auto" on data without impressions (u1 towers' recall@20 0.240 -> 0.288; 1.5 and more bought a little more at an RMSE and click AUC cost)


def set_term_weight(cfg: Config, meta: dict[str, Any] | None) -> float:
    """``train.set_weight``, with "auto" resolved by the prepared data: on where it has no impressions.

    Without impressions every row is a positive from a log of what users chose (MovieLens'
    ratings), and retrieval is measured against the set of items each user goes on to choose:
    the set term asks the state for that set. With impressions the heads rank the items shown,
    and the set term lowered every head and the towers on the synthetic data (README).
    """
    setting = cfg.train.set_weight
    if setting != "auto":
        return float(setting)
    return AUTO_SET_WEIGHT if not (meta or {}).get("impressions", True) else 0.0


class RetrievalObjective:
    """The retrieval loss of one run: a full softmax over the catalogue, or a sampled one.

    ``full`` (``train.retrieval_softmax``, or ``auto`` up to ``train.full_softmax_max_items``):
    every catalogue item is a candidate, scored through the item tower with its content each
    step; the user's other training positives are masked. ``sampled``: the batch's items plus
    ``train.uniform_negatives`` items drawn uniformly from the catalogue (cold and tail items
    too), with the log-q of that mixture; a user's other clicked rows in the batch are masked.
    Everything it counts comes from the train split.
    """

    def __init__(self, cfg: Config, train: dict[str, torch.Tensor], n_items: int, content: dict[str, torch.Tensor], meta: dict[str, Any] | None = None):
        self.cfg, self.n_items, self.content = cfg.train, n_items, content
        self.full = uses_full_softmax(cfg, n_items)
        self.all_rows = cfg.train.retrieval_negatives == "all_rows"
        clicked = train["click"] > 0
        counted = train["item_idx"] if self.all_rows else train["item_idx"][clicked]
        candidates_per_batch = len(counted) / max(1, math.ceil(len(train["click"]) / cfg.train.batch_size))
        uniform = 0 if self.full else cfg.train.uniform_negatives
        self.uniform = uniform
        set_weight = set_term_weight(cfg, meta)
        self.set_weight, self.set_holdout, self.set_len = (set_weight if self.full else 0.0), cfg.train.set_holdout, cfg.data.history_len
        self.log_q = cfg.train.logq_correction * mixed_log_q(torch.bincount(counted, minlength=n_items), candidates_per_batch, uniform)
        # each user's training positives, as CSR over user_idx (by time within a user when known): the full softmax masks them
        users, items = train["user_idx"][clicked], train["item_idx"][clicked]
        self.future = cfg.train.future_positives if self.full else 0
        if cfg.train.future_positives and not self.full:
            log.info("train.future_positives: not used (it extends the full softmax; this run's retrieval is %s)", self.describe())
        if set_weight and not self.full:
            log.info("train.set_weight: not used (it extends the full softmax; this run's retrieval is %s)", self.describe())
        if self.future and "timestamp" not in train:  # a streamed split, or a caller that did not read them
            log.warning("train.future_positives: not used (the train split holds no timestamps in memory)")
            self.future = 0
        if self.future:  # by (user, timestamp): a row's later positives are the run after its own key
            times = train["timestamp"][clicked]
            self.times = torch.unique(times)  # sorted: a timestamp's rank is its position here
            self.keys = users * (len(self.times) + 1) + torch.searchsorted(self.times, times)
            order = torch.argsort(self.keys, stable=True)
            self.keys = self.keys[order]
        else:
            order = torch.argsort(users, stable=True)
        self.positive_items = items[order]
        self.positive_ptr = torch.zeros(int(train["user_idx"].max()) + 2 if len(users) else 2, dtype=torch.int64)
        self.positive_ptr[1:] = torch.cumsum(torch.bincount(users, minlength=len(self.positive_ptr) - 1), 0)

    def describe(self) -> str:
        if self.full:
            text = "full softmax over the catalogue" + (f" + the multinomial of each row's next {self.future} clicks" if self.future else "")
            return text + (f" + the set term (weight {self.set_weight:g}, {self.set_holdout:.0%} of each user's train clicks held out)" if self.set_weight else "")
        return f"sampled softmax (in-batch + {self.uniform} uniform, log-q corrected)"

    def later_positives(self, users: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """``(P, W)``: item_idx of each (user, timestamp)'s next ``W = train.future_positives`` training positives
        strictly later in time (0 = none left): the labels of the multinomial term (``full_softmax_loss(future=...)``)."""
        rank = torch.searchsorted(self.times, times, right=True)  # timestamps <= t: a later one has a larger rank
        start = torch.searchsorted(self.keys, users * (len(self.times) + 1) + rank - 1, right=True)  # past every key <= (user, t)
        users = users.clamp(max=len(self.positive_ptr) - 2)
        at = start.unsqueeze(1) + torch.arange(self.future)
        inside = at < self.positive_ptr[users + 1].unsqueeze(1)
        return torch.where(inside, self.positive_items[at.clamp(max=max(len(self.positive_items) - 1, 0))], 0)

    def known_positives(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, item_idx)``: every training positive of each of ``users`` (row r = users[r])."""
        users = users.clamp(max=len(self.positive_ptr) - 2)
        start, stop = self.positive_ptr[users], self.positive_ptr[users + 1]
        counts = stop - start
        rows = torch.repeat_interleave(torch.arange(len(users)), counts)
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return rows, self.positive_items[torch.repeat_interleave(start, counts) + offsets]

    def set_examples(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The set term's examples for distinct ``users`` (U,): ``(users, history, targets, masked)`` of those with 2+ train clicks.

        Each user's train clicks in a random order (the torch RNG, seeded per epoch): the first
        ``round(set_holdout * n)`` (at least one) are the labels (``targets``, (rows, item_idx)), the
        next ``data.history_len`` the history ``(U', L)`` the state is built from, and every click
        that is not a label is ``masked``: test ranks the catalogue without the user's known items.
        """
        rows, items = self.known_positives(users)
        counts = torch.bincount(rows, minlength=len(users))
        order = torch.argsort(rows.double() + torch.rand(len(rows), dtype=torch.float64))  # shuffled within each user
        rows, items = rows[order], items[order]
        rank = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[rows]
        n_label = (counts.double() * self.set_holdout).round().clamp(min=1).long()
        kept = counts >= 2
        new_row = torch.cumsum(kept.long(), 0) - 1  # row among the kept users
        is_label = rank < n_label[rows]
        position = rank - n_label[rows]
        take = kept[rows]
        history = torch.zeros(int(kept.sum()), self.set_len, dtype=torch.int64)
        is_input = take & ~is_label & (position < self.set_len)
        history[new_row[rows[is_input]], position[is_input]] = items[is_input]
        targets = (new_row[rows[take & is_label]], items[take & is_label])
        masked = (new_row[rows[take & ~is_label]], items[take & ~is_label])
        return users[kept], history, targets, masked

    def set_loss(self, model, catalogue: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """The set term for the distinct ``users`` of a batch: their state from part of their train clicks scores the rest."""
        users, history, targets, masked = self.set_examples(users)
        if not len(users):
            return catalogue.sum() * 0.0
        user_vec = model.user_vectors(users, history, history_sums=history_content_sums(history, self.content))
        return set_softmax_loss(user_vec, catalogue, self.cfg.temperature, targets, masked)

    def catalogue_vectors(self, model, items: torch.Tensor) -> torch.Tensor:
        """Item-tower vectors of ``items`` with their content (in the model's current train/eval mode)."""
        return model.item_vectors(items, **{name: matrix[items] for name, matrix in self.content.items()})

    def loss(self, model, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.full:
            uniform = None
            if self.uniform:
                drawn = torch.randint(1, self.n_items, (self.uniform,))
                uniform = (self.catalogue_vectors(model, drawn), drawn)
            return retrieval_loss(outputs, batch, self.log_q, self.cfg.temperature, self.all_rows, uniform)
        clicked = batch["click"] > 0
        if not clicked.any():
            return outputs["user_vec"].sum() * 0.0
        catalogue = self.catalogue_vectors(model, torch.arange(self.n_items))
        exclude = self.known_positives(batch["user_idx"][clicked])
        future = self.later_positives(batch["user_idx"][clicked], batch["timestamp"][clicked]) if self.future else None
        loss = full_softmax_loss(
            outputs["user_vec"][clicked], batch["item_idx"][clicked], catalogue, self.cfg.temperature, exclude, future, self.cfg.future_weight
        )
        if self.set_weight and model.training:  # a training term only: validation measures the rows' own losses
            loss = loss + self.set_weight * self.set_loss(model, catalogue, torch.unique(batch["user_idx"][clicked]))
        return loss


@torch.no_grad()
def valid_recall(model, split: dict[str, torch.Tensor], objective: RetrievalObjective, k: int, max_rows: int, seed: int = 0) -> float | None:
    """Share of (a fixed sample of) clicked valid rows whose item the towers rank in the top K, training positives excluded."""
    clicked = torch.nonzero(split["click"] > 0).squeeze(1)
    if max_rows <= 0 or len(clicked) == 0:
        return None
    rows = clicked[torch.randperm(len(clicked), generator=torch.Generator().manual_seed(seed))[:max_rows]]
    model.eval()
    catalogue, content_vecs = catalogue_states(model, torch.arange(objective.n_items), objective.content)
    hits, block = 0, max(1, 20_000_000 // objective.n_items)  # scores held at once: block x catalogue
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        history = split["history"][part]
        scores = model.user_vectors(split["user_idx"][part], history, mean_content(content_vecs, history)) @ catalogue.T  # (b, N)
        scores[:, 0] = float("-inf")
        known_rows, known_items = objective.known_positives(split["user_idx"][part])
        keep = known_items != split["item_idx"][part][known_rows]  # a re-clicked training item stays rankable
        scores[known_rows[keep], known_items[keep]] = float("-inf")
        top = scores.topk(min(k, objective.n_items - 1), dim=1).indices
        hits += int((top == split["item_idx"][part].unsqueeze(1)).any(1).sum())
    return hits / len(rows)


AVERAGE_AUTO_MAX_MB = 256.0  # train.average_weights = "auto" averages models whose state is at most this (the mean holds a second copy; the scale runs of 1M users x 1M items stay as measured)


def averages_weights(cfg: Config, model: torch.nn.Module) -> bool:
    """Whether a one-process job keeps a ``WeightAverage``: ``train.average_weights`` true, or "auto" without
    ``train.refit`` (which replaces the selected model itself) and for a model state of at most ``AVERAGE_AUTO_MAX_MB``."""
    setting = cfg.train.average_weights
    if setting != "auto":
        return bool(setting)
    if cfg.train.refit:
        return False
    state_mb = sum(v.numel() * v.element_size() for v in model.state_dict().values() if isinstance(v, torch.Tensor)) / 2**20
    if state_mb > AVERAGE_AUTO_MAX_MB:
        log.info("train.average_weights = auto: off, the model state is %.0f MB (> %.0f MB; set it to true to average anyway)", state_mb, AVERAGE_AUTO_MAX_MB)
        return False
    return True


class WeightAverage:
    """A running mean of the model's weights at the end of epochs (stochastic weight averaging, Izmailov et al., 2018).

    ``train.average_weights``: from the first epoch that does not improve the validation score on
    (the first plateau, when the dense learning rate first drops), each epoch's end-of-epoch
    weights, tables included, join the mean. After the last epoch the mean is validated like an
    epoch and replaces the selected model only when it scores better. On ML-100K the valid RMSE of
    consecutive epochs moved by about 0.01 around its trend: the mean of the late epochs smooths
    that noise. Every tensor is held once, in float32 (the model's own size again).
    """

    def __init__(self) -> None:
        self.mean: dict[str, torch.Tensor] = {}
        self.epochs: list[int] = []

    def add(self, model: torch.nn.Module, epoch: int) -> None:
        from recsys.model import model_state_dict

        state = model_state_dict(model)
        count = len(self.epochs)
        if not count:
            self.mean = {k: v.clone() for k, v in state.items()}
        else:
            for key, value in state.items():
                if value.is_floating_point():
                    self.mean[key].mul_(count / (count + 1)).add_(value, alpha=1 / (count + 1))
                else:
                    self.mean[key] = value.clone()  # integer buffers (feature values, trained-item flags) are not averaged
        self.epochs.append(epoch)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"average/{k}": v for k, v in self.mean.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], epochs: list[int]) -> WeightAverage:
        average = cls()
        average.mean = {k[len("average/") :]: v for k, v in tensors.items() if k.startswith("average/")}
        average.epochs = list(epochs)
        return average


def new_state() -> dict[str, Any]:
    """The bookkeeping a job carries from epoch to epoch (and in its checkpoint)."""
    return {"epoch": 0, "global_step": 0, "best_epoch": 0, "best_score": -math.inf, "bad_epochs": 0, "stopped_early": False, "reference_loss": {}, "lr_scale": 1.0, "average_epochs": []}


def train_loss_as_valid(train_losses: dict[str, float]) -> dict[str, Any]:
    """Without a valid split, selection and early stopping fall back on the training loss."""
    return {"loss": {}, "auc": {}, "gates": {}, "score": -train_losses["total"]}


def end_of_epoch(state: dict[str, Any], last_valid: dict[str, Any], cfg: Config, epoch: int) -> bool:
    """Early-stopping bookkeeping after ``epoch``; returns whether it is the best so far."""
    if last_valid["loss"]:  # a validation split: score relative to its losses after the first epoch
        if not state.get("reference_loss"):
            state["reference_loss"] = {k: float(v) for k, v in last_valid["loss"].items() if k != "total"}
            if last_valid.get("recall") is not None:
                state["reference_loss"]["recall"] = float(last_valid["recall"])
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


# -- the per-epoch log ----------------------------------------------------------------------------
def log_epoch(run: RunDir, epoch: int, train_losses, last_valid, weighting, improved: bool, rate: float, epoch_started: float, **extra: Any) -> None:
    """One line of RUN/train_log.jsonl (the report reads it) and one log message."""
    line = {
        "epoch": epoch,
        "train_loss": train_losses,
        "valid_loss": last_valid["loss"],
        "valid_auc": last_valid["auc"],
        **({"valid_rating_rmse": last_valid["rating_rmse"]} if "rating_rmse" in last_valid else {}),
        **({"valid_recall": last_valid["recall"]} if last_valid.get("recall") is not None else {}),
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


def valid_summary(valid: dict[str, Any]) -> dict[str, Any]:
    """What ``model.json`` records of the selected epoch's validation."""
    return {k: valid[k] for k in ("auc", "rating_rmse", "recall", "score") if k in valid}


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def truncate_log(path: Path, last_epoch: int) -> None:
    """Drop log lines of epochs after the checkpoint (a killed job may have logged one)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] <= last_epoch]
        path.write_text("".join(ln + "\n" for ln in lines))


# -- checkpoint housekeeping ------------------------------------------------------------------------
def resume_digest(cfg: Config) -> str:
    """What must not change between a checkpoint and its resume (epochs and patience may)."""
    train = {k: v for k, v in section_dict(cfg.train).items() if k not in ("epochs", "patience", "nproc", "memory_budget_mb", "checkpoint_every_steps")}  # the budget sets how rows are read, not the model
    return hashlib.sha256(json.dumps([section_dict(cfg.model), train], sort_keys=True).encode()).hexdigest()[:16]


def check_resume_digest(saved: dict[str, Any], cfg: Config, ckpt_dir: Path) -> None:
    """Refuse a checkpoint made with other [model]/[train] settings."""
    if saved.get("config_digest") != resume_digest(cfg):
        raise ConfigError(f"{ckpt_dir}: the checkpoint was made with other [model]/[train] settings; start afresh without --resume")


def clear_checkpoints(ckpt_dir: Path) -> None:
    """Remove every checkpoint of an earlier run (single-process files and DCP directories)."""
    for old in ckpt_dir.glob("*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
