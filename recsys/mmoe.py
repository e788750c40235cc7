"""The multi-task ranker: experts, one softmax gate per task, a tower per task.

One module covers the three variants compared in the ablations, by what the gates may do:

- ``mmoe``          E shared experts, a learned softmax gate per task (Ma et al., KDD 2018)
- ``shared_bottom`` one shared expert, every task reads it (gate fixed to 1)
- ``single_task``   one expert per task, task t reads only expert t (gate fixed one-hot)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def short_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``softmax(logits, -1)`` for a short last axis (the gates' E experts): torch's kernel vectorises
    along that axis and took 0.51 ms at (2000, 3, 4) on one thread, these three passes 0.10 ms
    (forward + backward at (4096, 3, 4): 0.69 vs 1.56 ms)."""
    e = (logits - logits.amax(-1, keepdim=True).detach()).exp()  # the shift is a constant of the softmax: no gradient through it
    return e / e.sum(-1, keepdim=True)


def mlp(dims: list[int], last_activation: bool = False) -> nn.Sequential:
    """Linear-ReLU stack through ``dims`` (no activation after the last layer unless asked)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MultiTaskRanker(nn.Module):
    """``x (B, in_dim)`` -> one logit per task ``{task: (B,)}`` and the gate weights ``(B, T, E)``."""

    def __init__(self, in_dim: int, tasks: list[str], kind: str = "mmoe", experts: int = 4, expert_dim: int = 64, tower_dim: int = 32):
        super().__init__()
        if kind not in ("mmoe", "shared_bottom", "single_task"):
            raise ValueError(f"unknown ranker {kind!r}")
        self.tasks = list(tasks)
        self.kind = kind
        n_experts = {"mmoe": experts, "shared_bottom": 1, "single_task": len(self.tasks)}[kind]
        self.experts = nn.ModuleList(mlp([in_dim, expert_dim, expert_dim], last_activation=True) for _ in range(n_experts))
        # Only the MMoE learns its gates; the other two have fixed routing (a buffer, not a parameter).
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, n_experts) for t in self.tasks}) if kind == "mmoe" else None
        self.register_buffer("fixed_gates", torch.eye(len(self.tasks)) if kind == "single_task" else torch.ones(len(self.tasks), 1), persistent=False)
        self.towers = nn.ModuleDict({t: mlp([expert_dim, tower_dim, 1]) for t in self.tasks})

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.from_first_layer(F.linear(x, *self.first_layer()))

    def first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert's and every gate's first layer side by side: weight ``(E D + T E, in_dim)`` and bias.

        ``from_first_layer(x W^T + b)`` is ``forward(x)``; a caller that knows more about ``x``
        (``RecsysModel.rank``: a user's columns shared by its candidates) may compute the product its own way.
        """
        layers = self.first_layers()
        return torch.cat([layer.weight for layer in layers]), torch.cat([layer.bias for layer in layers])

    def first_layers(self) -> list[nn.Linear]:
        """The layers ``first_layer`` joins: each expert's first, then each task's gate (MMoE)."""
        return [expert[0] for expert in self.experts] + ([self.gates[t] for t in self.tasks] if self.gates is not None else [])

    def from_first_layer(self, h: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The rest of ``forward`` from the first layer's output ``h (B, E D + T E)``."""
        expert_out, gate_logits = self._experts_batched(h)  # (E, B, expert_dim), (B, T, E) or None
        if gate_logits is not None:
            gate_weights = short_softmax(gate_logits)  # (B, T, E)
        else:
            gate_weights = self.fixed_gates.expand(h.shape[0], -1, -1)
        # sum_e gate[b, t, e] * expert[e, b, :]: one batched product (0.26 ms at B 2000, T 3, E 4, D 64 on one
        # thread, against 1.6 ms as E multiply-adds over (B, T, D) broadcasts; at B 4096 0.40 vs 2.77 ms)
        # einsum is not on autocast's cast lists: under bf16 autocast the softmax's exp comes back fp32
        mixed = torch.einsum("bte,ebd->tbd", gate_weights.to(expert_out.dtype), expert_out)  # (T, B, expert_dim)
        return dict(zip(self.tasks, self._towers_batched(mixed).unbind(0))), gate_weights

    def _towers_batched(self, mixed: torch.Tensor) -> torch.Tensor:
        """Every task's tower (``towers[t]``, Linear-ReLU-Linear) over its mixture ``mixed (T, B, D)`` as two
        batched products: ``(T, B)`` logits."""
        towers = [self.towers[t] for t in self.tasks]
        first = torch.stack([tower[0].weight for tower in towers]).transpose(1, 2)  # (T, D, tower_dim)
        hidden = torch.relu(torch.baddbmm(torch.stack([tower[0].bias for tower in towers]).unsqueeze(1), mixed, first))
        last = torch.stack([tower[2].weight for tower in towers]).transpose(1, 2)  # (T, tower_dim, 1)
        return torch.baddbmm(torch.stack([tower[2].bias for tower in towers]).unsqueeze(1), hidden, last).squeeze(-1)

    def _experts_batched(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``expert(x)`` of every expert and the gates' logits from the joint first layer ``h`` (``first_layer``),
        as one product per layer instead of one per expert and gate.

        The same parameters (``experts[e]`` is still the Linear-ReLU-Linear-ReLU stack) and function (tested).

        First layer: every expert's and every gate's weights side by side, one ``(B, in) x (in, E D + T E)``
        product; second: a ``(E, B, D) x (E, D, D)`` batched product. At B = 4096, in = 417 this
        took 46 ms forward + backward against 62 ms per expert (one thread).
        """
        n, width = len(self.experts), self.experts[0][0].out_features
        hidden = torch.relu(h[:, : n * width]).reshape(-1, n, width).transpose(0, 1)  # (E, B, D)
        seconds = [expert[2] for expert in self.experts]
        weight = torch.stack([layer.weight for layer in seconds]).transpose(1, 2)  # (E, D, D_out)
        bias = torch.stack([layer.bias for layer in seconds]).unsqueeze(1)  # (E, 1, D_out)
        expert_out = torch.relu(torch.baddbmm(bias, hidden, weight))  # (E, B, D_out)
        gates = h.shape[1] - n * width
        gate_logits = h[:, n * width :].reshape(-1, gates // n, n) if gates else None
        return expert_out, gate_logits
