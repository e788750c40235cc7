"""Training throughput: TorchRec fused tables vs the same model in plain PyTorch.

Both runs train the full ``RecsysModel`` (towers, fusion, MMoE with three heads, retrieval loss)
on the same synthetic batches. They differ only in the embedding tables:

- ``torchrec``: tables swapped for ``FusedEmbeddingBagCollection`` (fbgemm kernels, row-wise
  Adagrad applied inside backward, only touched rows updated); dense parameters on Adam.
- ``plain``:    the EBC's ``nn.EmbeddingBag`` modules with dense gradients, ``torch.optim.Adagrad``
  on the tables (every row every step) and Adam on the rest.

Also reports the dense part's achieved GFLOP/s (Linear layers + retrieval logits, forward and
backward counted as 3x forward, divided by the whole step time) against a measured large-matmul
peak on the same threads.
Last line: one JSON object.

    .venv/bin/python benchmarks/train_throughput.py                     # 1M users x 1M items, L=50, B=4096
    .venv/bin/python benchmarks/train_throughput.py --users 100000 --items 100000 --batch 1024 --steps 5

``--bf16`` also times the fused step with the model's forward under bf16 autocast (losses in
fp32), alternated with fp32: whether bf16 units (AMX) pay here, where the step is not matmul-bound.

``--nproc N`` instead compares the multi-process job's step (TorchRec DMP with ``--sharding``, DDP
dense part, gloo/nccl, cross-rank retrieval negatives) in 1 process and in N processes on this
machine, with the global batch ``--batch`` split over the ranks:

    .venv/bin/python benchmarks/train_throughput.py --nproc 2 --users 100000 --items 100000 --batch 1024 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.config import ModelConfig  # noqa: E402
from recsys.losses import TaskWeighting, retrieval_loss, task_losses  # noqa: E402
from recsys.model import ModelSpec, RecsysModel  # noqa: E402
from training.train_single import fuse_tables  # noqa: E402

TEXT_DIM, IMAGE_DIM = 384, 128


def make_batches(args, n: int) -> list[dict[str, torch.Tensor]]:
    """Synthetic batches: Zipf-ish item ids (popular head, long tail), histories of varying length."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        b = args.batch
        items = (torch.rand(b, generator=g) ** 3 * (args.items - 1)).long() + 1
        history = (torch.rand(b, args.history, generator=g) ** 3 * (args.items - 1)).long() + 1
        lengths = torch.randint(0, args.history + 1, (b, 1), generator=g)
        history = torch.where(torch.arange(args.history) < lengths, history, torch.zeros_like(history))
        click = (torch.rand(b, generator=g) < 0.3).float()
        out.append({
            "user_idx": torch.randint(1, args.users, (b,), generator=g),
            "item_idx": items,
            "history": history,
            "text": torch.randn(b, TEXT_DIM, generator=g),
            "text_mask": (torch.rand(b, generator=g) < 0.9).float(),
            "image": torch.randn(b, IMAGE_DIM, generator=g),
            "image_mask": (torch.rand(b, generator=g) < 0.8).float(),
            "click": click,
            "conversion": click * (torch.rand(b, generator=g) < 0.2).float(),
            "rating": torch.where(click > 0, torch.randint(1, 6, (b,), generator=g).float(), torch.full((b,), float("nan"))),
        })
    return out


def model_config(args) -> ModelConfig:
    """The benchmarked model: ``--dim`` wide, the attention as ``--attention`` / ``--attention-len`` say (else the defaults)."""
    chosen = {"attention": args.attention, "attention_len": args.attention_len}
    return ModelConfig(dim=args.dim, embedding_dim=args.dim, expert_dim=args.dim, tower_dim=32, **{k: v for k, v in chosen.items() if v is not None})


def build(args, fused: bool):
    torch.manual_seed(0)
    spec = ModelSpec(
        n_users=args.users, n_items=args.items, history_len=args.history, text_dim=TEXT_DIM, image_dim=IMAGE_DIM,
        tasks=("click", "conversion", "rating"), config=model_config(args),
    )
    model = RecsysModel(spec).train()
    weighting = TaskWeighting(["click", "ctcvr", "rating"], "static")
    if fused:
        fuse_tables(model, embedding_lr=0.05)
        optimizers = [torch.optim.Adam(model.dense_parameters(), lr=1e-3)]
    else:
        optimizers = [torch.optim.Adam(model.dense_parameters(), lr=1e-3), torch.optim.Adagrad(model.embedding_tables.parameters(), lr=0.05)]
    return model, weighting, optimizers


def train_step(model, weighting, optimizers, batch, log_q, bf16: bool = False) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the model's matmuls in bf16; the losses below in fp32
        outputs = model(batch)
    if bf16:
        outputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()}
    losses = task_losses(outputs, batch)
    loss = weighting(losses) + retrieval_loss(outputs, batch, log_q, 0.05)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return float(loss.detach())


def dense_flops_per_step(model, batch, log_q) -> float:
    """Forward FLOPs of every nn.Linear (2 * in * out per row) + the retrieval logits, times 3 for training."""
    total = [0.0]

    def hook(module: nn.Linear, inputs, output):
        total[0] += 2.0 * module.in_features * module.out_features * inputs[0].shape[0]

    ranker = model.ranker
    batched = {id(m) for m in ranker.experts.modules()} | ({id(m) for m in ranker.gates.modules()} if ranker.gates is not None else set())
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in batched]
    # the experts and gates run as one product per layer (MultiTaskRanker._experts_batched), not through their modules' forward
    rows_seen = []
    handles.append(ranker.register_forward_pre_hook(lambda m, inputs: rows_seen.append(inputs[0].shape[0])))
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    for linear in (m for m in model.ranker.modules() if isinstance(m, nn.Linear) and id(m) in batched):
        total[0] += 2.0 * linear.in_features * linear.out_features * sum(rows_seen)
    positives = int((batch["click"] > 0).sum())
    total[0] += 2.0 * positives * positives * model.spec.config.dim
    return 3.0 * total[0]


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2.0 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def measure(args, fused: bool, batches, bf16: bool = False) -> dict:
    model, weighting, optimizers = build(args, fused)
    log_q = torch.zeros(args.items)
    for batch in batches[: args.warmup]:
        train_step(model, weighting, optimizers, batch, log_q, bf16)
    started = time.perf_counter()
    for batch in batches[args.warmup :]:
        train_step(model, weighting, optimizers, batch, log_q, bf16)
    seconds = time.perf_counter() - started
    steps = len(batches) - args.warmup
    flops = dense_flops_per_step(model, batches[0], log_q)
    return {"samples_per_s": steps * args.batch / seconds, "step_s": seconds / steps, "dense_gflop_per_step": flops / 1e9,
            "dense_gflops_achieved": flops * steps / seconds / 1e9}


def profile_step(args, batches) -> dict:
    """Where the fused step's time goes: wall time per phase and per module's forward, and self time per kind of op.

    Phases (perf_counter around each; CPU ops are synchronous): forward, losses, backward (which
    includes the tables' fused row-wise Adagrad, applied inside it), the dense Adam step. Forward
    per top-level module by forward hooks. Op kinds from torch.profiler's self CPU time: the
    fbgemm table kernels, matmuls, and every other tensor op; what is left of the wall time is
    Python and dispatch.
    """
    from torch.profiler import ProfilerActivity, profile

    model, weighting, optimizers = build(args, fused=True)
    log_q = torch.zeros(args.items)
    for batch in batches[: args.warmup]:
        train_step(model, weighting, optimizers, batch, log_q)
    modules = {"tables": model.embedding_tables, "user_tower": model.user_tower, "item_tower": model.item_tower, "ranker_mmoe": model.ranker}
    modules.update({"target_attention": model.attention, "content_proj": model.content_proj} if model.sees_features else {})
    forward_s: dict[str, float] = dict.fromkeys(modules, 0.0)
    starts: dict[str, float] = {}
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda m, i, name=name: starts.__setitem__(name, time.perf_counter())))
        handles.append(module.register_forward_hook(lambda m, i, o, name=name: forward_s.__setitem__(name, forward_s[name] + time.perf_counter() - starts[name])))
    phases = dict.fromkeys(("forward", "losses", "backward", "dense_optimizer"), 0.0)
    timed = batches[args.warmup :]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in timed:
            t0 = time.perf_counter()
            outputs = model(batch)
            t1 = time.perf_counter()
            loss = weighting(task_losses(outputs, batch)) + retrieval_loss(outputs, batch, log_q, 0.05)
            t2 = time.perf_counter()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            for opt in optimizers:
                opt.step()
            t4 = time.perf_counter()
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name] += seconds
    for handle in handles:
        handle.remove()
    steps = len(timed)
    forward_s["other (KJT construction, glue)"] = phases["forward"] - sum(forward_s.values())
    kinds = {"fbgemm_tables": 0.0, "matmul": 0.0, "other_tensor_ops": 0.0}
    for event in prof.key_averages():
        if event.key.startswith("fbgemm::"):
            kinds["fbgemm_tables"] += event.self_cpu_time_total
        elif event.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
            kinds["matmul"] += event.self_cpu_time_total
        elif event.key.startswith("aten::"):
            kinds["other_tensor_ops"] += event.self_cpu_time_total
    wall_ms = sum(phases.values()) / steps * 1e3
    ops_ms = {k: v / 1e3 / steps for k, v in kinds.items()}
    ops_ms["python_and_dispatch"] = max(0.0, wall_ms - sum(ops_ms.values()))
    return {
        "step_ms_profiled": wall_ms, "phase_ms": {k: v / steps * 1e3 for k, v in phases.items()},
        "forward_ms_by_module": {k: v / steps * 1e3 for k, v in forward_s.items()}, "self_ms_by_op_kind": ops_ms,
    }  # fmt: skip


def print_profile(breakdown: dict) -> None:
    print(f"profile of the fused step ({breakdown['step_ms_profiled']:.1f} ms under the profiler):")
    for title, key in (("phases", "phase_ms"), ("forward by module", "forward_ms_by_module"), ("self time by op kind", "self_ms_by_op_kind")):
        print(f"  {title}: " + ", ".join(f"{name} {ms:.1f}" for name, ms in breakdown[key].items()) + " ms")


def _sharded_rank(rank: int, world_size: int, port: int, args, out: str) -> None:
    """One rank of the --nproc measurement: the training job's sharded step on this rank's B / N rows."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() // world_size))
    import torch.distributed as dist
    import torchrec.optim as trec_optim
    from torch.distributed.optim import _apply_optimizer_in_backward

    from training.distributed import process_group as PG
    from training.distributed import sharding as SH
    from training.train_sharded import retrieval_loss_across_ranks

    ctx = PG.init_process_group()
    torch.manual_seed(0)
    spec = ModelSpec(
        n_users=args.users, n_items=args.items, history_len=args.history, text_dim=TEXT_DIM, image_dim=IMAGE_DIM,
        tasks=("click", "conversion", "rating"), config=model_config(args),
    )  # fmt: skip
    model = RecsysModel(spec).train()
    _apply_optimizer_in_backward(trec_optim.RowWiseAdagrad, model.embedding_tables.parameters(), {"lr": 0.05})
    local_batch = args.batch // world_size
    dmp = SH.shard_model(model, args.sharding, ctx.device, world_size, batch_size=local_batch)
    opt = SH.keyed_optimizer(dmp, lambda ps: torch.optim.Adam(ps, lr=1e-3), lambda ps: trec_optim.RowWiseAdagrad(ps, lr=0.05))
    weighting = TaskWeighting(["click", "ctcvr", "rating"], "static")
    log_q = torch.zeros(args.items)
    rows = slice(rank * local_batch, (rank + 1) * local_batch)
    local = [{k: v[rows] for k, v in batch.items()} for batch in make_batches(args, args.warmup + args.steps)]

    def step(batch):
        outputs = dmp(batch)
        loss = weighting(task_losses(outputs, batch)) + retrieval_loss_across_ranks(outputs, batch, log_q, 0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for batch in local[: args.warmup]:
        step(batch)
    dist.barrier()
    started = time.perf_counter()
    for batch in local[args.warmup :]:
        step(batch)
    dist.barrier()
    seconds = time.perf_counter() - started
    if rank == 0:
        Path(out).write_text(json.dumps({
            "processes": world_size, "samples_per_s": args.steps * local_batch * world_size / seconds, "step_s": seconds / args.steps,
            "threads_per_process": torch.get_num_threads(), "plan": str(dmp.plan),
        }))  # fmt: skip
    PG.destroy_process_group()


def measure_processes(args, world_size: int) -> dict:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="recsys-bench-") as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.start_processes(_sharded_rank, args=(world_size, port, args, out), nprocs=world_size, start_method="spawn", join=True)
        return json.loads(Path(out).read_text())


def main_nproc(args) -> None:
    results = {}
    for world_size in (1, args.nproc):
        results[world_size] = r = measure_processes(args, world_size)
        print(f"{world_size} process(es): {r['samples_per_s']:>10,.0f} samples/s  {r['step_s'] * 1e3:8.1f} ms/step  ({r['threads_per_process']} threads each)", flush=True)
    ratio = results[args.nproc]["samples_per_s"] / results[1]["samples_per_s"]
    print(f"{args.nproc} vs 1 process: {ratio:.2f}x (sharding {args.sharding}, global batch {args.batch})")
    print(json.dumps({"config": vars(args), "cpus": __import__("os").cpu_count(), "one": results[1], "n": results[args.nproc], "ratio": ratio}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    # 1 by default: on a shared, oversubscribed CPU, multi-threaded small matmuls stall (20x slower here).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    parser.add_argument("--nproc", type=int, default=0, help="compare the sharded job step in 1 vs N processes instead")
    parser.add_argument("--sharding", default="auto", choices=["auto", "data_parallel", "table_wise", "column_wise", "row_wise"])
    parser.add_argument("--attention", choices=["mlp", "dot"], default=None, help="the target attention's scoring (default: model.attention's default)")
    parser.add_argument("--attention-len", type=int, default=None, help="history positions the target attention reads (default: model.attention_len's default)")
    parser.add_argument("--profile", action="store_true", help="also break the fused step down by phase, module and op kind (torch.profiler)")
    parser.add_argument("--fused-only", action="store_true", help="skip the plain-PyTorch variant (no speed-up figure)")
    parser.add_argument("--bf16", action="store_true", help="also time the fused step with the model's forward under bf16 autocast (fp32 and bf16 alternated, twice each)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.nproc:
        main_nproc(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = make_batches(args, args.warmup + args.steps)
    peak = matmul_peak_gflops()
    results: dict = {}
    for name, fused in (("torchrec_fused", True), ("plain_pytorch", False))[: 1 if args.fused_only else 2]:
        results[name] = measure(args, fused, batches)
        r = results[name]
        print(f"{name:15s} {r['samples_per_s']:>10,.0f} samples/s  {r['step_s'] * 1e3:8.1f} ms/step  dense {r['dense_gflops_achieved']:.1f} GFLOP/s", flush=True)
    if args.bf16:  # alternated, so the machine's drift falls on both
        rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(2):
            for name in rates:
                rates[name].append(measure(args, True, batches, bf16=name == "bf16")["samples_per_s"])
        results["bf16_autocast"] = {"fp32_samples_per_s": rates["fp32"], "bf16_samples_per_s": rates["bf16"], "ratio": sum(rates["bf16"]) / sum(rates["fp32"])}
        print(f"fused step, bf16 autocast vs fp32: {', '.join(f'{r:,.0f}' for r in rates['bf16'])} vs {', '.join(f'{r:,.0f}' for r in rates['fp32'])} samples/s ({results['bf16_autocast']['ratio']:.2f}x)", flush=True)
    ratio = results["torchrec_fused"]["samples_per_s"] / results["plain_pytorch"]["samples_per_s"] if "plain_pytorch" in results else None
    dense = results["torchrec_fused"]["dense_gflops_achieved"]
    if ratio is not None:
        print(f"speed-up {ratio:.2f}x (target >= 3x)")
    print(f"dense part {dense:.1f} of {peak:.1f} GFLOP/s matmul peak ({100 * dense / peak:.1f}%)")
    if args.profile:
        results["profile"] = profile_step(args, batches)
        print_profile(results["profile"])
    print(json.dumps({
        "config": {k: v for k, v in vars(args).items()}, "threads": torch.get_num_threads(),
        **results, "speedup": ratio, "matmul_peak_gflops": peak, "dense_fraction_of_peak": dense / peak,
    }))


if __name__ == "__main__":
    main()
