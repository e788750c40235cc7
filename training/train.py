"""``recsys train``: one process or N, chosen by ``train.nproc`` (or ``--nproc``).

The single-process job is ``training.train_single``; the N-process job (torchrun + TorchRec
sharding) is ``training.train_sharded``. Both share ``training.epochs``; neither imports the other.
"""

from __future__ import annotations

from typing import Any

from recsys.errors import RunError
from recsys.rundir import RunDir
from training.distributed.checkpoint import latest_checkpoint
from training.distributed.launch import in_torchrun
from training.train_sharded import train_sharded
from training.train_single import train_single


def train(run: RunDir, resume: bool = False, nproc: int | None = None) -> dict[str, Any]:
    """Train RUN's model; returns the training summary (also in RUN/summary.json)."""
    cfg = run.config()
    nproc = nproc if nproc is not None else cfg.train.nproc
    if cfg.train.init_from and (nproc > 1 or in_torchrun()):
        raise RunError(f"train.init_from ({cfg.train.init_from}): warm-starting sharded tables is not built yet; train the update in one process (--nproc 1)")
    # A DCP checkpoint (written by N processes) resumes through the sharded job, also with N = 1.
    if nproc > 1 or in_torchrun() or (resume and latest_checkpoint(run.model / "checkpoint") is not None):
        return train_sharded(run, cfg, resume, nproc)
    return train_single(run, cfg, resume)
