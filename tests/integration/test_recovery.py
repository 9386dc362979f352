"""Failure recovery on the real local Slurm cluster: a killed rank resumes from the newest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dtp.hooks.slurm import SlurmHook
from dtp.metrics.parse import json_records
from dtp.pipeline.data import SAMPLE_CORPUS
from dtp.pipeline.jobs import TRAINING_DIR
from dtp.templates import render

pytestmark = pytest.mark.stack
INTERVAL = 20


def _records(path: Path) -> list[dict]:
    return list(json_records(path.read_text().splitlines())) if path.exists() else []


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def test_killed_rank_resumes_from_newest_checkpoint(stack) -> None:
    workdir = stack.shared_dir / "it" / f"recovery-{uuid.uuid4().hex[:6]}"
    (workdir / "logs").mkdir(parents=True)
    (workdir / "train.bin").write_bytes(SAMPLE_CORPUS.read_bytes())
    metrics = workdir / "metrics.jsonl"
    config = {
        "model": "tiny",
        "data_path": str(workdir / "train.bin"),
        "checkpoint_dir": str(workdir / "checkpoints"),
        "metrics_path": str(metrics),
        "max_steps": 150,
        "checkpoint_interval": INTERVAL,
        "log_interval": 1,
    }
    (workdir / "train.json").write_text(json.dumps(config))
    script = render(
        "slurm/train.sbatch.j2",
        num_nodes=2,
        procs_per_node=1,
        python=sys.executable,
        omp_threads=1,
        env={},
        program=TRAINING_DIR / "train.py",
        config_path=workdir / "train.json",
        max_restarts=3,
        exclude_nodes="",
        nsys_dir="",
    )
    (workdir / "train.sbatch").write_text(script)
    hook = SlurmHook()
    job_id = hook.submit(
        str(workdir / "train.sbatch"), job_name=f"it-recovery-{workdir.name}", output=str(workdir / "logs/%j.out")
    )
    try:
        _wait_for(
            lambda: any(r["event"] == "checkpoint" and r["step"] >= 2 * INTERVAL for r in _records(metrics)),
            240,
            "no checkpoint at step 40",
        )
        _wait_for(
            lambda: max((r["step"] for r in _records(metrics) if r["event"] == "step"), default=0) >= 2 * INTERVAL + 5,
            60,
            "no step 45",
        )
        killed_at = max(r["step"] for r in _records(metrics) if r["event"] == "step")
        # The workers torchrun starts (python -u train.py ...), not srun or torchrun, whose argv look alike.
        workers = subprocess.run(
            ["pgrep", "-f", "--", f"-u [^ ]*train\\.py --config {workdir}/train.json"], capture_output=True, text=True
        )
        pids = workers.stdout.split()
        assert len(pids) == 2, pids
        os.kill(int(max(pids, key=int)), signal.SIGKILL)
        _wait_for(lambda: hook.get_job(job_id).finished, 300, f"job {job_id} did not finish")
        assert hook.get_job(job_id).state == "COMPLETED", (workdir / f"logs/{job_id}.out").read_text()[-3000:]
    finally:
        hook.cancel(job_id)

    records = _records(metrics)
    starts = [r for r in records if r["event"] == "start"]
    assert len(starts) >= 2 and starts[0]["resumed_from_step"] is None
    resumed = starts[-1]["resumed_from_step"]
    assert resumed is not None and resumed % INTERVAL == 0
    assert killed_at - resumed <= INTERVAL, f"lost {killed_at - resumed} steps, more than one interval"
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps[-1] == 150 and set(range(1, 151)) <= set(steps)
    assert records[-1]["event"] == "end"
