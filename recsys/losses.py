"""Losses: per-task losses, the retrieval objective, and how the task losses are weighted.

``L = sum_t lambda_t L_t + retrieval_weight * L_retrieval`` with lambda static (config),
``uncertainty`` (Kendall et al. 2018: learned log-variances s_t, ``exp(-s_t) L_t + s_t``),
``gradnorm`` (Chen et al. 2018: weights learned so each task's gradient norm on a shared layer
follows its relative training rate) or ``dwa`` (Liu et al. 2019: weights from the ratio of each
task's last two epoch losses). None of them weighs the retrieval term, which keeps its static weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Loss name per head: the conversion head is trained through ESMM's click-and-convert target.
LOSS_OF_TASK = {"click": "click", "conversion": "ctcvr", "rating": "rating"}


def task_losses(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], cvr_on_clicks: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-task losses over the batch; only heads present in ``outputs``.

    click: BCE over all impressions. ctcvr (ESMM): BCE of p_click * p_cvr against
    click * conversion over all impressions, so p_cvr is never fit on clicked rows only.
    ``cvr_on_clicks`` > 0 adds that weight times a direct BCE of p_cvr on the clicked rows to
    the ctcvr loss: the ESMM term still covers the whole impression space, the direct term
    gives p_cvr a sharper signal where conversions are observed.
    rating: MSE over rated rows (NaN = unrated); 0 when the batch has none.
    """
    click = batch["click"].float()
    losses = {"click": F.binary_cross_entropy_with_logits(outputs["logit_click"], click)}
    if "logit_conversion" in outputs:
        # log p_ctcvr computed in log space: log sigmoid(a) + log sigmoid(b) stays finite.
        log_p = F.logsigmoid(outputs["logit_click"]) + F.logsigmoid(outputs["logit_conversion"])
        log_not_p = torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-6))
        target = click * batch["conversion"].float()
        losses["ctcvr"] = -(target * log_p + (1 - target) * log_not_p).mean()
        clicked = click > 0
        if cvr_on_clicks > 0 and clicked.any():
            direct = F.binary_cross_entropy_with_logits(outputs["logit_conversion"][clicked], batch["conversion"].float()[clicked])
            losses["ctcvr"] = losses["ctcvr"] + cvr_on_clicks * direct
    if "rating" in outputs:
        rated = ~torch.isnan(batch["rating"])
        pred = outputs["rating"][rated]
        losses["rating"] = F.mse_loss(pred, batch["rating"][rated]) if rated.any() else outputs["rating"].sum() * 0.0
    return losses


def retrieval_logits(
    user_vec: torch.Tensor,
    item_vec: torch.Tensor,
    item_idx: torch.Tensor,
    item_log_q: torch.Tensor,
    temperature: float,
    positive: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled-softmax logits ``(P, C)``: ``u_i . v_j / T - log q(item_j)``; other copies of user i's positive item masked to -inf.

    ``item_vec``/``item_idx`` are the C candidates; ``positive`` (P,) is the column of each
    user's own item (default: ``arange(P)``, the square case where candidate i is user i's item).
    ``exclude (P, C)`` masks further candidates (the user's other positives), never the positive.
    The log-q correction (Yi et al., RecSys 2019) removes the sampling bias of the candidates:
    popular items appear as in-batch negatives more often than a uniform sample would.
    """
    positive = torch.arange(len(user_vec), device=item_idx.device) if positive is None else positive
    logits = user_vec @ item_vec.T / temperature - item_log_q[item_idx].unsqueeze(0)
    masked = item_idx[positive].unsqueeze(1) == item_idx.unsqueeze(0)
    if exclude is not None:
        masked = masked | exclude
    masked[torch.arange(len(positive)), positive] = False
    return logits.masked_fill(masked, float("-inf"))


def other_positives(row_users: torch.Tensor, candidate_users: torch.Tensor, candidate_clicked: torch.Tensor) -> torch.Tensor:
    """``(P, C)``: candidate j is another positive of row i's user (a row's own column is unmasked by ``retrieval_logits``)."""
    return (row_users.unsqueeze(1) == candidate_users.unsqueeze(0)) & candidate_clicked.unsqueeze(0)


def retrieval_loss(
    outputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    item_log_q: torch.Tensor,
    temperature: float,
    all_rows: bool = False,
    uniform: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sampled softmax cross-entropy over the clicked rows (positive = the row's own item).

    The candidates are the clicked rows' items, or with ``all_rows`` every row's item (shown but
    not clicked, sampled negatives): several times more negatives at no extra tower cost; plus,
    with ``uniform = (vectors (S, d), item_idx (S,))``, items drawn uniformly from the catalogue.
    ``item_log_q`` must be the log of each item's expected count among the candidates
    (``mixed_log_q``). A user's other clicked rows in the batch are never its negatives.
    """
    clicked = batch["click"] > 0
    candidates = torch.ones_like(clicked) if all_rows else clicked
    if int(clicked.sum()) < 1 or int(candidates.sum()) + (len(uniform[1]) if uniform is not None else 0) < 2:
        return outputs["user_vec"].sum() * 0.0
    positive = torch.cumsum(candidates.long(), 0)[clicked] - 1  # each clicked row's column among the candidates
    vectors, items = outputs["item_vec"][candidates], batch["item_idx"][candidates]
    exclude = other_positives(batch["user_idx"][clicked], batch["user_idx"][candidates], clicked[candidates])
    if uniform is not None:
        vectors, items = torch.cat([vectors, uniform[0]]), torch.cat([items, uniform[1]])
        exclude = torch.cat([exclude, torch.zeros(len(exclude), len(uniform[1]), dtype=torch.bool)], dim=1)
    logits = retrieval_logits(outputs["user_vec"][clicked], vectors, items, item_log_q, temperature, positive, exclude)
    return F.cross_entropy(logits, positive)


def full_softmax_loss(
    user_vec: torch.Tensor,
    positive_item: torch.Tensor,
    catalogue: torch.Tensor,
    temperature: float,
    exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
    future: torch.Tensor | None = None,
    future_weight: float = 1.0,
) -> torch.Tensor:
    """Softmax over the whole catalogue: ``user_vec (P, d)`` against ``catalogue (N, d)`` (row j = item_idx j; row 0 never a candidate).

    ``exclude = (rows, item_idx)`` masks (row, item) pairs, e.g. the user's other training
    positives; the row's own positive is never masked. No log-q: nothing is sampled.

    ``future (P, W)``: item_idx of each row's later positives (0 = none) adds ``future_weight``
    times a multinomial loss over them and the row's own item (Mult-VAE's likelihood on the
    user's next clicks, PinnerFormer's dense all-action loss): minus the mean log-softmax of
    those items, with the row's other excluded items still masked. The next-item term alone
    asks the user's state for one item; the multinomial term for the set the user goes on to
    click, which is what a recommendation from that state is measured against.
    """
    logits = user_vec @ catalogue.T / temperature  # (P, N)
    masked = torch.zeros_like(logits, dtype=torch.bool)
    masked[:, 0] = True
    if exclude is not None:
        masked[exclude[0], exclude[1]] = True
    rows = torch.arange(len(positive_item))
    masked[rows, positive_item] = False
    loss = F.cross_entropy(logits.masked_fill(masked, float("-inf")), positive_item)
    if future is None or future_weight == 0:
        return loss
    targets = torch.zeros_like(masked)
    targets[rows.unsqueeze(1).expand_as(future), future] = True
    targets[:, 0] = False
    targets[rows, positive_item] = True
    return loss + future_weight * multinomial_loss(logits, masked, targets)


def multinomial_loss(logits: torch.Tensor, hidden: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """Minus the mean log-softmax of each row's targets, averaged over rows (Mult-VAE's likelihood).

    ``logits (P, N)``; ``hidden (P, N)``: not candidates unless a target; ``is_target (P, N)``. A row without targets counts 0.
    """
    log_p = torch.log_softmax(logits.masked_fill(hidden & ~is_target, float("-inf")), dim=1)
    return -(log_p.masked_fill(~is_target, 0.0).sum(1) / is_target.sum(1).clamp(min=1)).mean()


def set_softmax_loss(user_vec: torch.Tensor, catalogue: torch.Tensor, temperature: float, targets: tuple[torch.Tensor, torch.Tensor], masked: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A multinomial over held-out items: ``user_vec (U, d)`` against ``catalogue (N, d)`` (row 0 never a candidate).

    ``targets = (rows, item_idx)``: each row's held-out items, the labels; ``masked = (rows,
    item_idx)``: items that are neither candidates nor labels (the user's items that the state
    was built from, or left out of both). Minus the mean log-softmax of each row's labels,
    averaged over rows (``multinomial_loss``). A row without labels counts 0.
    """
    logits = user_vec @ catalogue.T / temperature  # (U, N)
    hidden = torch.zeros_like(logits, dtype=torch.bool)
    hidden[:, 0] = True
    hidden[masked[0], masked[1]] = True
    is_target = torch.zeros_like(hidden)
    is_target[targets[0], targets[1]] = True
    return multinomial_loss(logits, hidden, is_target)


def mixed_log_q(item_counts: torch.Tensor, candidates_per_batch: float, uniform: int) -> torch.Tensor:
    """log of each item's expected count among a batch's candidates: ``C q(item) + S / N`` (in-batch share plus uniform draws)."""
    counts = item_counts.double().clamp(min=1.0)
    q = counts / counts.sum()
    n = len(item_counts) - 1  # row 0 is padding, never drawn
    return (candidates_per_batch * q + uniform / max(n, 1)).log().float()


def item_log_q(item_idx: torch.Tensor, clicked: torch.Tensor | None, n_items: int) -> torch.Tensor:
    """``log q`` per item index: q = the item's share of training positives (of all rows when ``clicked`` is None; at least one count)."""
    counted = item_idx if clicked is None else item_idx[clicked > 0]
    return log_q_from_counts(torch.bincount(counted, minlength=n_items))


def log_q_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """``log q`` from per-item counts ``(n_items,)`` (e.g. summed over ranks); every item counts at least once."""
    counts = counts.double().clamp(min=1.0)
    return (counts / counts.sum()).log().float()


class TaskWeighting(nn.Module):
    """Combines task losses into one; holds the learned weights of ``uncertainty`` / ``gradnorm``."""

    def __init__(self, losses: list[str], mode: str = "static", static: dict[str, float] | None = None, gradnorm_alpha: float = 1.5):
        super().__init__()
        if mode not in ("static", "uncertainty", "gradnorm", "dwa"):
            raise ValueError(f"unknown loss weighting {mode!r}")
        self.losses, self.mode, self.alpha = list(losses), mode, gradnorm_alpha
        static = static or {}
        self.register_buffer("static", torch.tensor([static.get(name, 1.0) for name in self.losses]))
        self.log_var = nn.Parameter(torch.zeros(len(self.losses))) if mode == "uncertainty" else None
        self.gradnorm_w = nn.Parameter(torch.ones(len(self.losses))) if mode == "gradnorm" else None
        self.register_buffer("initial_losses", torch.zeros(len(self.losses)))  # GradNorm's L_t(0)
        # DWA (Liu et al., CVPR 2019): the mean training loss of each task over the last two epochs, newest last
        self.register_buffer("epoch_losses", torch.zeros(2, len(self.losses)))
        self.register_buffer("dwa_w", torch.ones(len(self.losses)))

    def weights(self) -> dict[str, float]:
        """The current effective lambda per task (logged per epoch)."""
        if self.mode == "uncertainty":
            w = torch.exp(-self.log_var)
        elif self.mode == "gradnorm":
            w = self.gradnorm_w
        elif self.mode == "dwa":
            w = self.dwa_w
        else:
            w = self.static
        return {name: float(v) for name, v in zip(self.losses, w.detach())}

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([losses[name] for name in self.losses])
        if self.mode == "uncertainty":
            return (torch.exp(-self.log_var) * stacked + self.log_var).sum()
        if self.mode == "gradnorm":
            return (self.gradnorm_w.detach() * stacked).sum()  # the weights learn only from gradnorm_loss
        if self.mode == "dwa":
            return (self.dwa_w * stacked).sum()
        return (self.static * stacked).sum()

    @torch.no_grad()
    def end_epoch(self, train_losses: dict[str, float], temperature: float = 2.0) -> None:
        """DWA: after an epoch, ``λ_k = K softmax(r_k / T)`` with ``r_k = L_k(t-1) / L_k(t-2)`` (1 until two epochs are known).

        A task whose loss fell less than the others' gets more weight. Only the task losses are
        weighted: the retrieval term keeps ``train.retrieval_weight`` (as with every mode).
        """
        if self.mode != "dwa":
            return
        self.epoch_losses[0] = self.epoch_losses[1]
        self.epoch_losses[1] = torch.tensor([train_losses[name] for name in self.losses])
        if bool((self.epoch_losses[0] > 0).all()):
            ratio = self.epoch_losses[1] / self.epoch_losses[0]
            self.dwa_w.copy_(len(self.losses) * torch.softmax(ratio / temperature, dim=0))

    def gradnorm_loss(self, losses: dict[str, torch.Tensor], shared: torch.Tensor) -> torch.Tensor:
        """GradNorm's auxiliary loss; its gradient w.r.t. ``gradnorm_w`` is all that is used."""
        stacked = torch.stack([losses[name] for name in self.losses])
        if not bool(self.initial_losses.any()):
            self.initial_losses.copy_(stacked.detach().clamp(min=1e-8))
        norms = torch.stack([
            torch.autograd.grad(w * loss, shared, retain_graph=True, create_graph=True, allow_unused=True)[0].norm()
            if loss.requires_grad else w * 0.0
            for w, loss in zip(self.gradnorm_w, stacked)
        ])
        ratio = stacked.detach() / self.initial_losses
        target = (norms.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        return (norms - target).abs().sum()

    @torch.no_grad()
    def renormalise(self) -> None:
        """Keep GradNorm weights positive and summing to the number of tasks."""
        if self.gradnorm_w is not None:
            w = self.gradnorm_w.clamp(min=1e-3)
            self.gradnorm_w.copy_(w * len(self.losses) / w.sum())
