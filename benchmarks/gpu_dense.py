"""GPU check: the nccl process-group path and training throughput of the model's towers + MMoE on CUDA.

TorchRec's CUDA kernels come from the CUDA build of fbgemm-gpu, which the lent GPU machines do
not have (and whose wheel is too large to carry there), so this measures the same towers and
ranker (``recsys.towers``, ``recsys.mmoe``) over plain ``nn.EmbeddingBag`` tables with sparse
gradients, wrapped in DDP over a 1-process nccl group. On a machine without CUDA it prints a
skip line. Final line: JSON.

    python benchmarks/gpu_dense.py [--users 1000000 --items 1000000 --batch 4096 --steps 50]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recsys.mmoe import MultiTaskRanker  # noqa: E402
from recsys.towers import ItemTower, UserTower  # noqa: E402

TASKS = ["click", "conversion", "rating"]


class PlainModel(nn.Module):
    """User/item tables as nn.EmbeddingBag (sparse grads) + the recsys towers and MMoE ranker."""

    def __init__(self, users: int, items: int, emb: int, dim: int, text_dim: int):
        super().__init__()
        self.user_table = nn.EmbeddingBag(users, emb, mode="mean", sparse=True)
        self.item_table = nn.EmbeddingBag(items, emb, mode="mean", sparse=True)
        self.user_tower = UserTower(users, [], 0, emb, dim)
        self.item_tower = ItemTower(items, [], 0, emb, text_dim, 0, dim, fusion="concat")
        self.ranker = MultiTaskRanker(3 * dim, TASKS, "mmoe", 4, 64, 32)

    def forward(self, user, history, item, text):
        u_id = self.user_table(user.unsqueeze(1))
        hist = self.item_table(history)
        i_id = self.item_table(item.unsqueeze(1))
        u = self.user_tower({"user_id": u_id, "history": hist}, user)
        v, _, _ = self.item_tower({"item_id": i_id}, item, text, torch.ones(len(item), device=item.device))
        logits, _ = self.ranker(torch.cat([u, v, u * v], dim=-1))
        retrieval = F.cross_entropy(u @ v.T / 0.05, torch.arange(len(u), device=u.device))
        return logits, retrieval


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def train_rate(model: nn.Module, args: argparse.Namespace, device: torch.device, bf16: bool) -> float:
    sparse = [p for n, p in model.named_parameters() if "table" in n]
    dense = [p for n, p in model.named_parameters() if "table" not in n]
    opt_sparse, opt_dense = torch.optim.SparseAdam(sparse, lr=1e-3), torch.optim.Adam(dense, lr=1e-3)
    g = torch.Generator(device=device).manual_seed(0)

    def batch():
        return (
            torch.randint(1, args.users, (args.batch,), device=device, generator=g),
            torch.randint(1, args.items, (args.batch, args.history), device=device, generator=g),
            torch.randint(1, args.items, (args.batch,), device=device, generator=g),
            torch.randn(args.batch, 384, device=device, generator=g),
            torch.randint(0, 2, (args.batch,), device=device, generator=g).float(),
        )

    def step():
        user, history, item, text, click = batch()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits, retrieval = model(user, history, item, text)
            loss = retrieval + sum(F.binary_cross_entropy_with_logits(logits[t].float(), click) for t in ("click", "conversion"))
            loss = loss + F.mse_loss(logits["rating"].float(), click)
        opt_sparse.zero_grad(set_to_none=True)
        opt_dense.zero_grad(set_to_none=True)
        loss.backward()
        opt_sparse.step()
        opt_dense.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    return args.steps * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_dense", "skipped": "no CUDA device"}))
        return
    device = torch.device("cuda", 0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    probe = torch.ones(4, device=device)
    dist.all_reduce(probe)  # the nccl collective path itself
    model = PlainModel(args.users, args.items, 64, 64, 384).to(device)
    # Sparse table gradients cannot go through nccl all_reduce: DDP syncs the dense part only
    # (sharding the tables across GPUs is TorchRec's job on the real path).
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["user_table.weight", "item_table.weight"])
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0])
    results = {
        "benchmark": "gpu_dense",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "backend": dist.get_backend(),
        "all_reduce_ok": bool(probe.sum().item() == 4),
        "matmul_tflops_fp32": round(matmul_tflops(device, torch.float32), 1),
        "matmul_tflops_bf16": round(matmul_tflops(device, torch.bfloat16), 1),
        "train_samples_per_s_fp32": round(train_rate(ddp, args, device, bf16=False)),
        "train_samples_per_s_bf16": round(train_rate(ddp, args, device, bf16=True)),
        "shape": vars(args),
    }
    dist.destroy_process_group()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
