"""Start the N-process training job through torchrun, and be the entry of each worker.

- ``launch(run_dir, nproc, extra_args)`` runs ``python -m torch.distributed.run --standalone ...
  -m training.distributed --run-dir RUN`` on this machine and streams its output; a failed worker
  becomes a ``RecsysError`` naming its rank and the last good checkpoint.
- ``worker_main()`` (``python -m training.distributed``) is what each worker runs: it calls the
  target job (default: the sharded training job) and records a failure in ``RUN/model/rank<k>.error``.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Sequence

from recsys.errors import RecsysError
from recsys.rundir import atomic_write_text
from training.distributed.checkpoint import latest_checkpoint

log = logging.getLogger("recsys.distributed")

# The job each worker runs: the sharded training job itself (no re-dispatch through training.train).
DEFAULT_WORKER_TARGET = "training.train_sharded:train_worker"


def in_torchrun() -> bool:
    """True inside a worker started by torchrun (it sets these variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def launch(
    run_dir: Path,
    nproc: int,
    extra_args: list[str],
    *,
    target: str = DEFAULT_WORKER_TARGET,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``target(RunDir(run_dir), **flags)`` in ``nproc`` processes through torchrun on this machine.

    Output is streamed as it comes. On a non-zero exit raises ``RecsysError`` naming the failed
    rank (from ``RUN/model/rank<k>.error``, or torchrun's "Root Cause" summary when the worker
    died without writing one) and the last good checkpoint, which is left untouched.
    """
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in model_dir.glob("rank*.error"):
        stale.unlink()
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
        "-m", "training.distributed", "--run-dir", str(run_dir), "--target", target, *extra_args,
    ]  # fmt: skip
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    repo_root = str(Path(__file__).resolve().parents[2])  # workers import training.* from this checkout
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, child_env.get("PYTHONPATH", "")) if p)
    log.info("launching %d workers: %s", nproc, " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=400)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=child_env) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stderr.write(line)
                tail.append(line)
        except KeyboardInterrupt:
            proc.terminate()  # torchrun forwards it to its workers
            proc.wait()
            raise
        returncode = proc.wait()
    if returncode != 0:
        raise RecsysError(_failure_message(run_dir, nproc, returncode, "".join(tail)))


def _failure_message(run_dir: Path, nproc: int, returncode: int, output_tail: str) -> str:
    model_dir = run_dir / "model"
    errors = sorted(model_dir.glob("rank*.error"), key=lambda p: p.stat().st_mtime)
    if errors:  # the first to fail is the cause; the others usually died of its broken collectives
        first = errors[0]
        rank = int(re.fullmatch(r"rank(\d+)\.error", first.name).group(1))  # type: ignore[union-attr]
        record = json.loads(first.read_text())
        cause = f"{record['type']}: {record['message']}"
        detail = f"traceback in {first}"
    else:
        match = re.search(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", output_tail, re.S)
        if match:
            rank, exitcode = int(match.group(1)), int(match.group(2))
            cause = f"exit code {exitcode}" + (f" (killed by signal {-exitcode}, e.g. out of memory)" if exitcode < 0 else "")
        else:
            rank, cause = -1, f"torchrun exited with code {returncode}"
        detail = "see the output above"
    where = f"rank {rank} of {nproc}" if rank >= 0 else f"one of {nproc} ranks (unknown which)"
    checkpoint = latest_checkpoint(model_dir / "checkpoint")
    kept = f"the last good checkpoint {checkpoint} is kept; resume with `recsys train --run {run_dir} --nproc {nproc} --resume`" if checkpoint else "no checkpoint had been written yet"
    return f"distributed training failed on {where}: {cause} ({detail}); {kept}"


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry of each torchrun worker: call the target, record a failure in ``RUN/model/rank<k>.error``."""
    parser = argparse.ArgumentParser(prog="python -m training.distributed")
    parser.add_argument("--run-dir", required=True, help="the run directory (not --run: torchrun would take it for its --run-path)")
    parser.add_argument("--target", default=DEFAULT_WORKER_TARGET, help="module:function called as f(RunDir, **flags)")
    parser.add_argument("--resume", action="store_true")
    args, rest = parser.parse_known_args(argv)
    from recsys.rundir import RunDir

    rank = int(os.environ.get("RANK", "0"))
    # force: torchrec's import-time warnings may already have given the root logger a handler.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("recsys").setLevel(logging.INFO)
    # The planner warns about its own defaults (topology construction, storage heuristics) on every run.
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchrec")
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")  # rank 0's plain export
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    module_name, func_name = args.target.split(":")
    kwargs: dict[str, Any] = {"resume": True} if args.resume else {}
    for flag in rest:  # further flags as --key=value
        key, _, value = flag.lstrip("-").partition("=")
        kwargs[key.replace("-", "_")] = value
    try:
        getattr(importlib.import_module(module_name), func_name)(RunDir(args.run_dir), **kwargs)
    except BaseException as exc:
        record = {"rank": rank, "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(), "time_unix_s": time.time()}
        atomic_write_text(Path(args.run_dir) / "model" / f"rank{rank}.error", json.dumps(record, indent=2) + "\n")
        raise
    return 0
