"""The training job in N processes (torchrun + TorchRec DMP); ``training.train.train`` dispatches here.

The same epochs as the single-process job, with the tables sharded by TorchRec's planner, the
dense part in DDP, each rank on its own part of train.parquet, validation gathered to rank 0 and
DCP checkpoints (written by N processes, resumable by M). Batch size stays global: each rank
takes B / N rows. The epoch machinery it shares with the single-process job is in ``training.epochs``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
import torchrec.optim as trec_optim
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from tqdm import tqdm

from recsys.config import Config
from recsys.errors import ConfigError, RunError
from recsys.losses import TaskWeighting, log_q_from_counts, other_positives, retrieval_logits, retrieval_loss
from recsys.model import model_state_dict, save_model
from recsys.rundir import RunDir, atomic_write_text
from training.data import TrainingData, batches, load_training_data
from training.distributed.checkpoint import latest_checkpoint
from training.distributed.checkpoint import load_checkpoint as load_sharded_checkpoint
from training.distributed.checkpoint import save_checkpoint as save_sharded_checkpoint
from training.distributed.launch import in_torchrun, launch
from training.distributed.process_group import DistContext, destroy_process_group, gather_to_rank0, init_process_group
from training.distributed.sharding import keyed_optimizer, load_unsharded_state, shard_model, unwrap
from training.calibration import calibrate_ratings
from training.prior import apply_prior, choose_prior
from training.epochs import (
    add_losses, batch_losses, build_model, check_finite, check_resume_digest, clear_checkpoints, end_of_epoch, epoch_seed,
    epochs_summary, head_metrics, log_epoch, loss_names, new_state, resume_digest, set_lr, task_weighting, train_loss_as_valid,
    truncate_log, valid_summary,
)  # fmt: skip

log = logging.getLogger("recsys.training")


def _uses_sharded_checkpoint(ckpt_dir: Path) -> bool:
    return latest_checkpoint(ckpt_dir) is not None


def train_sharded(run: RunDir, cfg: Config, resume: bool, nproc: int) -> dict[str, Any]:
    """``train`` with TorchRec sharding: launches N torchrun workers, or is one of them (or a 1-process group)."""
    ckpt_dir = run.model / "checkpoint"
    if resume and not _uses_sharded_checkpoint(ckpt_dir) and (ckpt_dir / "state.json").is_file():
        raise RunError(
            f"{ckpt_dir} holds a single-process checkpoint (state.json + safetensors); resume it with one process "
            f"(`recsys train --run {run.root} --resume --nproc 1`), or train afresh with --nproc {nproc}"
        )
    if cfg.train.loss_weights == "gradnorm":
        raise ConfigError("train.loss_weights = 'gradnorm' works with one process only (its per-task gradient norms are not all-reduced); use 'uncertainty' or 'static' with --nproc > 1")
    if cfg.train.checkpoint_every_steps:
        raise ConfigError("train.checkpoint_every_steps works with one process only (the sharded job checkpoints at the end of each epoch); set it to 0 with --nproc > 1")
    if cfg.train.average_weights is True:  # "auto" is off here
        raise ConfigError("train.average_weights works with one process only (the sharded tables are not averaged across ranks); set it to false with --nproc > 1")
    if nproc > 1 and not in_torchrun():
        launch(run.root, nproc, ["--resume"] if resume else [])  # each worker runs train_worker
        return json.loads(run.summary_path.read_text())["train"]
    return _in_process_group(run, cfg, resume)


def train_worker(run: RunDir, resume: bool = False) -> dict[str, Any]:
    """The entry of each torchrun worker (``training.distributed.launch``): one rank of the job."""
    return _in_process_group(run, run.config(), resume)


def _in_process_group(run: RunDir, cfg: Config, resume: bool) -> dict[str, Any]:
    ctx = init_process_group()
    try:
        summary = _train_sharded_worker(run, cfg, resume, ctx)
    except BaseException:
        if ctx.world_size == 1:  # in-process group: leave it so a later call can make a new one; torchrun stops the other workers
            dist.destroy_process_group()
        raise
    destroy_process_group()
    return summary


def _global_item_counts(split: dict[str, torch.Tensor], n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, clicked rows) per item_idx over every rank's part: which ids are trained, and log q."""
    counts = torch.stack([
        torch.bincount(split["item_idx"], minlength=n_items),
        torch.bincount(split["item_idx"][split["click"] > 0], minlength=n_items),
    ]).to(torch.int64)  # fmt: skip
    dist.all_reduce(counts)
    return counts[0], counts[1]


def _sharded_optimizer(dmp, weighting: TaskWeighting, cfg: Config) -> tuple[CombinedOptimizer, list[torch.optim.Optimizer]]:
    """Fused row-wise Adagrad (sharded tables), unfused row-wise Adagrad (data_parallel tables), Adam (dense + loss weights).

    Also returns the Adam optimizers, whose learning rate the plateau rule lowers.
    """
    dense: list[torch.optim.Optimizer] = []

    def adam(params):
        dense.append(torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay))
        return dense[-1]

    optims: list[Any] = [keyed_optimizer(dmp, adam, table_optimizer=lambda ps: trec_optim.RowWiseAdagrad(ps, lr=cfg.train.embedding_lr))]
    learned = dict(weighting.named_parameters())
    if learned:
        optims.append(("weighting", KeyedOptimizerWrapper(learned, adam)))
    return CombinedOptimizer(optims), dense


def _export_best(run: RunDir, data: TrainingData, cfg: Config, checkpoint: Path, meta: dict[str, Any]) -> None:
    """Rank 0: the checkpoint's weights -> a plain RecsysModel -> ``model.safetensors`` + ``model.json``."""
    plain = build_model(data, cfg)
    load_sharded_checkpoint(checkpoint, plain, collective=False)
    save_model(plain, run.model, meta)


def retrieval_loss_across_ranks(outputs, batch, log_q: torch.Tensor, temperature: float, all_rows: bool = False, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``recsys.losses.retrieval_loss`` over the global batch: this rank's clicked users against every rank's candidate items.

    The candidates are the clicked rows' items (``all_rows``: every row's item). Their vectors
    are all-gathered with autograd (their gradients go back to the rank that made them), so N
    ranks of B / N rows optimise the same in-batch softmax as one process with B rows; scaled so
    that DDP's average over ranks is the mean over all clicked rows. ``keep`` masks rows out
    (validation padding). Every rank must call it the same number of times (it is collective).
    """
    world = dist.get_world_size()
    keep = torch.ones_like(batch["click"], dtype=torch.bool) if keep is None else keep
    if world == 1:
        rows = {"user_vec": outputs["user_vec"][keep], "item_vec": outputs["item_vec"][keep]}
        return retrieval_loss(rows, {k: batch[k][keep] for k in ("click", "item_idx", "user_idx")}, log_q, temperature, all_rows)
    clicked = (batch["click"] > 0) & keep
    candidates = keep if all_rows else clicked
    item_vec, items = outputs["item_vec"][candidates], batch["item_idx"][candidates]
    counts_list = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts_list, torch.tensor([len(items), int(clicked.sum())], dtype=torch.int64))
    counts = [int(c[0]) for c in counts_list]
    if sum(counts) < 2 or sum(int(c[1]) for c in counts_list) == 0:
        return outputs["user_vec"].sum() * 0.0
    most = max(counts)
    gathered_vecs = dist_nn.all_gather(F.pad(item_vec, (0, 0, 0, most - len(items))))
    # item_idx, user_idx and clicked of every rank's candidates, in one all-gather
    meta = torch.stack([items, batch["user_idx"][candidates], clicked[candidates].long()])  # (3, C)
    gathered_meta = [torch.zeros(3, most, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(gathered_meta, F.pad(meta, (0, most - len(items))))
    all_vec = torch.cat([v[:c] for v, c in zip(gathered_vecs, counts)])  # (C_all, d)
    all_meta = torch.cat([m[:, :c] for m, c in zip(gathered_meta, counts)], dim=1)
    all_items = all_meta[0]
    if not clicked.any():  # still in the graph: the all-gather's backward is collective too
        return all_vec.sum() * 0.0 + outputs["user_vec"].sum() * 0.0
    # this rank's clicked rows: their column among this rank's candidates, offset by the ranks before
    positive = torch.cumsum(candidates.long(), 0)[clicked] - 1 + sum(counts[: dist.get_rank()])
    exclude = other_positives(batch["user_idx"][clicked], all_meta[1], all_meta[2] > 0)  # the user's other clicked rows, on any rank
    logits = retrieval_logits(outputs["user_vec"][clicked], all_vec, all_items, log_q, temperature, positive, exclude)
    n_clicked = sum(int(c[1]) for c in counts_list)
    return F.cross_entropy(logits, positive, reduction="sum") * world / n_clicked


def train_epoch_sharded(dmp, weighting, opt, split, content, log_q, cfg: Config, epoch: int, global_step: int, ctx: DistContext) -> tuple[dict[str, float], int, float]:
    """One pass over this rank's shuffled part -> mean losses over all ranks, global step, samples/s of all ranks."""
    dmp.train()
    rank_seed = epoch_seed(cfg.train.seed, epoch) + 7_919 * ctx.rank  # rank 0 = the single-process seed; other ranks other masks/orders
    torch.manual_seed(rank_seed)  # modality / id dropout
    batch_size = cfg.train.batch_size // ctx.world_size
    n_rows = len(split["click"])
    n_batches = math.ceil(n_rows / batch_size)
    sums: dict[str, float] = {}
    seen, started = 0, time.perf_counter()
    progress = tqdm(total=n_rows * ctx.world_size, desc=f"epoch {epoch}", unit="rows", mininterval=1.0, leave=False, disable=not ctx.is_main)
    for step, batch in enumerate(batches(split, batch_size, content, seed=rank_seed), 1):
        outputs = dmp(batch)
        losses, total = batch_losses(outputs, batch, weighting, cfg, retrieval_loss_across_ranks(outputs, batch, log_q, cfg.train.temperature, cfg.train.retrieval_negatives == "all_rows"))
        check_finite(total, losses, batch, step, f"rank {ctx.rank} of {ctx.world_size}, epoch {epoch}, step {step} of {n_batches} (global step {global_step + 1})")
        opt.zero_grad(set_to_none=True)
        total.backward()  # sharded tables are updated here (fused row-wise Adagrad); DDP averages the dense gradients
        for p in weighting.parameters():  # learned loss weights live outside DDP: average them by hand
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= ctx.world_size
        opt.step()
        weighting.renormalise()
        global_step += 1
        seen += add_losses(sums, losses, total, len(batch["click"]))
        progress.update(len(batch["click"]) * ctx.world_size)
    progress.close()
    seconds = time.perf_counter() - started
    names = sorted(sums)
    totals = torch.tensor([seen, *(sums[k] for k in names)], dtype=torch.float64)
    dist.all_reduce(totals)
    slowest = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    seen_all = float(totals[0])
    return {k: float(v) / max(seen_all, 1.0) for k, v in zip(names, totals[1:])}, global_step, seen_all / max(float(slowest), 1e-9)


@torch.no_grad()
def validate_sharded(dmp, weighting, split, content, log_q, cfg: Config, n_rows: int, ctx: DistContext) -> dict[str, Any]:
    """``validate`` over every rank's padded part: scores gathered to rank 0, sums all-reduced; the result broadcast to all."""
    dmp.eval()
    tasks = unwrap(dmp).tasks
    loss_keys = [*loss_names(tasks), "retrieval", "total"]
    sums = torch.zeros(1 + len(loss_keys), dtype=torch.float64)  # real rows, then loss * rows
    gate_sums: dict[str, torch.Tensor] = {}  # gates (T, E), modality_gates (M,): summed over real rows
    scores: dict[str, list[torch.Tensor]] = {}
    for batch in batches(split, cfg.train.batch_size // ctx.world_size, content):
        outputs = dmp(batch)  # every rank runs the same number of batches (padding included)
        for k in ("p_click", "p_cvr", "p_ctcvr", "rating"):
            if k in outputs:
                scores.setdefault(f"score_{k}", []).append(outputs[k])
        real = ~batch["is_padding"] if "is_padding" in batch else torch.ones(len(batch["click"]), dtype=torch.bool)
        for k in ("gates", "modality_gates"):
            if k in outputs:
                weighted = (outputs[k] * real.view(-1, *[1] * (outputs[k].dim() - 1))).sum(0)
                gate_sums[k] = gate_sums[k] + weighted if k in gate_sums else weighted
        retrieval = retrieval_loss_across_ranks(outputs, batch, log_q, cfg.train.temperature, cfg.train.retrieval_negatives == "all_rows", keep=real)  # collective: before any skip
        rows = int(real.sum())
        if rows == 0:
            continue
        outputs = {k: v[real] for k, v in outputs.items()}
        batch = {k: v[real] for k, v in batch.items()}
        losses, total = batch_losses(outputs, batch, weighting, cfg, retrieval)
        losses["total"] = total
        sums += torch.tensor([rows, *(float(losses[k]) * rows for k in loss_keys)], dtype=torch.float64)
    dist.all_reduce(sums)
    for k in sorted(gate_sums):
        dist.all_reduce(gate_sums[k])
    labels = {k: split[k].numpy() for k in ("click", "conversion", "rating") if k in split}
    gathered = gather_to_rank0({**{k: torch.cat(v).numpy() for k, v in scores.items()}, **labels}, n_rows=n_rows)
    result: dict[str, Any] | None = None
    if ctx.is_main:
        assert gathered is not None
        n = max(float(sums[0]), 1.0)
        col = {k: torch.from_numpy(v) for k, v in gathered.items()}
        result = {"loss": {k: float(v) / n for k, v in zip(loss_keys, sums[1:])}}
        result.update(head_metrics(col, {k.removeprefix("score_"): v for k, v in col.items() if k.startswith("score_")}))
        result["gates"] = {t: (gate_sums["gates"][i] / n).tolist() for i, t in enumerate(tasks)}
        if "modality_gates" in gate_sums:
            result["modality_gates"] = (gate_sums["modality_gates"] / n).tolist()
    shared = [result]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _train_sharded_worker(run: RunDir, cfg: Config, resume: bool, ctx: DistContext) -> dict[str, Any]:
    """One rank's training job (all ranks run it; rank 0 alone writes the log, the model and the summary)."""
    started = time.perf_counter()
    if cfg.train.batch_size // ctx.world_size < 2:
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} is the global batch: it must give each of {ctx.world_size} ranks at least 2 rows")
    data = load_training_data(run, cfg.model.use_text, cfg.model.use_image, ctx.rank, ctx.world_size, memory_budget_mb=cfg.train.memory_budget_mb)
    n_items = int(data.meta["n_items"])
    item_rows, item_clicks = _global_item_counts(data.train, n_items)
    model = build_model(data, cfg)  # the same seed on every rank: the same initial weights
    model.set_trained_items(torch.nonzero(item_rows).squeeze(1))  # from every rank's rows, not just this part
    initial = model_state_dict(model)
    _apply_optimizer_in_backward(trec_optim.RowWiseAdagrad, model.embedding_tables.parameters(), {"lr": cfg.train.embedding_lr})
    logging.disable(logging.INFO)  # fbgemm logs every kernel argument at INFO on the root logger
    try:
        dmp = shard_model(model, cfg.train.sharding, ctx.device, ctx.world_size, batch_size=cfg.train.batch_size // ctx.world_size, local_world_size=ctx.local_world_size)
    finally:
        logging.disable(logging.NOTSET)
    load_unsharded_state(dmp, initial)  # DMP builds its shards afresh: start from the seeded weights
    if ctx.is_main:
        run.model.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.model / "sharding_plan.txt", f"# train.sharding = {cfg.train.sharding}, {ctx.world_size} ranks\n{dmp.plan}\n")
    tasks = unwrap(dmp).tasks
    weighting = task_weighting(tasks, cfg)
    opt, dense_opts = _sharded_optimizer(dmp, weighting, cfg)
    log_q = cfg.train.logq_correction * log_q_from_counts(item_rows if cfg.train.retrieval_negatives == "all_rows" else item_clicks)
    train_rows = int(item_rows.sum())
    if ctx.is_main and (cfg.train.retrieval_softmax != "sampled" or cfg.train.uniform_negatives):
        log.info("the N-process job trains the towers on in-batch negatives across ranks (train.retrieval_softmax, train.uniform_negatives, train.future_positives and train.set_weight apply to one process)")
    if ctx.is_main:
        log.info(
            "train: %d rows on %d ranks (%d each, global batch %d), valid: %d rows, tasks %s, sharding %s (plan in %s)",
            train_rows, ctx.world_size, len(data.train["click"]), cfg.train.batch_size, data.valid_rows, ",".join(tasks),
            cfg.train.sharding, run.model / "sharding_plan.txt",
        )  # fmt: skip

    ckpt_dir = run.model / "checkpoint"
    state = new_state()
    resumed_from = None
    if resume and _uses_sharded_checkpoint(ckpt_dir):
        check_resume_digest(json.loads((latest_checkpoint(ckpt_dir) / "train_state.json").read_text()), cfg, ckpt_dir)  # type: ignore[operator]
        loaded = load_sharded_checkpoint(ckpt_dir, dmp, opt, extra={"weighting": weighting})
        state = {k: v for k, v in loaded.items() if k in state}
        resumed_from = state["epoch"]
        for dense_opt in dense_opts:
            set_lr(dense_opt, cfg.train.lr * state["lr_scale"])
        if ctx.is_main:
            log.info("resuming after epoch %d (best epoch %d), saved by %d processes, now %d", state["epoch"], state["best_epoch"], loaded.get("world_size", 0), ctx.world_size)
            truncate_log(run.train_log, state["epoch"])
    else:
        if resume and ctx.is_main:
            log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
        if ctx.is_main:
            run.train_log.unlink(missing_ok=True)
            clear_checkpoints(ckpt_dir)
        dist.barrier()  # nobody writes a checkpoint before rank 0 has cleared the old ones

    rates: list[float] = []
    for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
        if state["stopped_early"]:
            break
        epoch_started = time.perf_counter()
        train_losses, state["global_step"], rate = train_epoch_sharded(dmp, weighting, opt, data.train, data.content, log_q, cfg, epoch, state["global_step"], ctx)
        rates.append(rate)
        if data.valid is not None:
            last_valid = validate_sharded(dmp, weighting, data.valid, data.content, log_q, cfg, data.valid_rows, ctx)
        else:
            last_valid = train_loss_as_valid(train_losses)
        epoch_lr = cfg.train.lr * state["lr_scale"]  # the dense lr this epoch ran with
        improved = end_of_epoch(state, last_valid, cfg, epoch)
        for dense_opt in dense_opts:
            set_lr(dense_opt, cfg.train.lr * state["lr_scale"])
        weighting.end_epoch(train_losses)  # DWA: the weights of the next epoch, saved in this checkpoint (the log line shows them)
        train_state = {**state, "config_digest": resume_digest(cfg), "seed": cfg.train.seed, "world_size": ctx.world_size, "sharding": cfg.train.sharding}
        checkpoint = save_sharded_checkpoint(ckpt_dir, f"epoch-{epoch:04d}", dmp, opt, train_state, extra={"weighting": weighting})
        if ctx.is_main:
            if improved:  # from the checkpoint just written, before a later epoch's checkpoint replaces it
                _export_best(run, data, cfg, checkpoint, {"best_epoch": epoch, "valid": valid_summary(last_valid), "trained_with": {"processes": ctx.world_size, "sharding": cfg.train.sharding}})
            log_epoch(run, epoch, train_losses, last_valid, weighting, improved, rate, epoch_started, lr=epoch_lr, processes=ctx.world_size)
            if state["stopped_early"]:
                log.info("early stopping after epoch %d: no improvement for %d epochs", epoch, cfg.train.patience)
        dist.barrier()  # model.safetensors is written before any rank goes on

    prior = calibration = None
    if ctx.is_main:
        prior = choose_prior(run, cfg)
        if prior is not None:
            apply_prior(run, prior)
        calibration = calibrate_ratings(run, cfg)
    summary = {
        **epochs_summary(state, resumed_from),
        **({"popularity_prior": prior} if prior is not None else {}),
        **({"rating_calibration": calibration} if calibration is not None else {}),
        "train_rows": train_rows,
        "train_read": "in memory" if isinstance(data.train, dict) else f"in chunks of {data.train.chunk_rows} file rows per rank (train.memory_budget_mb)",
        "train_rows_left_out": _file_rows(run.data / "train.parquet") - train_rows,  # the n % N tail
        "valid_rows": data.valid_rows,
        "tasks": list(tasks),
        "modalities": {"text": unwrap(dmp).use_text, "image": unwrap(dmp).use_image},
        "retrieval_objective": "in-batch softmax across ranks (log-q corrected)",
        "processes": ctx.world_size,
        "sharding": cfg.train.sharding,
        "sharding_plan": str(run.model / "sharding_plan.txt"),
        "samples_per_s": float(np.mean(rates)) if rates else None,
        "seconds": time.perf_counter() - started,
    }
    if ctx.is_main:
        run.record("train", summary)
    return summary


def _file_rows(path: Path) -> int:
    return int(pl.scan_parquet(path).select(pl.len()).collect().item())
