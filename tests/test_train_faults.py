"""`recsys train` killed with SIGKILL mid-epoch, as a real process, then `--resume`: the same model as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import make_run, read_log  # noqa: E402  (tests/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["train.epochs=3", "train.patience=10"]
N_TRAIN = 20_000  # an epoch of a few seconds: the kill lands inside epoch 2


def recsys_train(run, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "recsys", "-q", "train", "--run", str(run.root), *extra], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_ends_with_the_uninterrupted_runs_model(tmp_path):
    straight = make_run(tmp_path / "straight", overrides=SETTINGS, n_train=N_TRAIN)
    assert recsys_train(straight).wait(timeout=600) == 0

    killed = make_run(tmp_path / "killed", overrides=SETTINGS, n_train=N_TRAIN)
    job = recsys_train(killed)
    first = killed.model / "checkpoint" / "epoch-0001.safetensors"
    deadline = time.monotonic() + 600
    while not first.is_file():
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read() if job.poll() is not None else "no checkpoint in time"
        time.sleep(0.05)
    time.sleep(0.5)  # inside epoch 2
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL
    assert [line["epoch"] for line in read_log(killed)] == [1]  # killed before epoch 2 ended
    assert not (killed.model / "checkpoint" / "epoch-0002.safetensors").exists()

    resumed = recsys_train(killed, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert [line["epoch"] for line in read_log(killed)] == [1, 2, 3]
    a = load_file(str(straight.model / "checkpoint" / "epoch-0003.safetensors"))
    b = load_file(str(killed.model / "checkpoint" / "epoch-0003.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_log(killed)[-1]["valid_auc"] == read_log(straight)[-1]["valid_auc"]  # the same metrics, to the last digit
