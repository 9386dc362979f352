"""Failure recovery on the real local Slurm cluster: a killed rank, or a failed node, resumes from the newest
checkpoint."""

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


class TrainingJob:
    """A 150-step, 2-node training job on the local cluster, checkpointing every INTERVAL steps."""

    def __init__(self, stack, name: str) -> None:
        self.workdir = stack.shared_dir / "it" / f"{name}-{uuid.uuid4().hex[:6]}"
        (self.workdir / "logs").mkdir(parents=True)
        (self.workdir / "train.bin").write_bytes(SAMPLE_CORPUS.read_bytes())
        self.metrics = self.workdir / "metrics.jsonl"
        config = {
            "model": "tiny",
            "data_path": str(self.workdir / "train.bin"),
            "checkpoint_dir": str(self.workdir / "checkpoints"),
            "metrics_path": str(self.metrics),
            "max_steps": 150,
            "checkpoint_interval": INTERVAL,
            "log_interval": 1,
        }
        (self.workdir / "train.json").write_text(json.dumps(config))
        script = render(
            "slurm/train.sbatch.j2",
            num_nodes=2,
            procs_per_node=1,
            python=sys.executable,
            omp_threads=1,
            env={},
            program=TRAINING_DIR / "train.py",
            config_path=self.workdir / "train.json",
            max_restarts=3,
            exclude_nodes="",
            nsys_dir="",
            container=[],
            enroot_login=None,
            stop_signal_s=0,
            stop_file="",
        )
        (self.workdir / "train.sbatch").write_text(script)
        self.hook = SlurmHook()
        self.job_id = self.hook.submit(
            str(self.workdir / "train.sbatch"),
            job_name=f"it-{name}-{self.workdir.name}",
            output=str(self.workdir / "logs/%j.out"),
        )

    def records(self) -> list[dict]:
        return _records(self.metrics)

    def last_step(self) -> int:
        return max((r["step"] for r in self.records() if r["event"] == "step"), default=0)

    def wait_past_second_checkpoint(self) -> int:
        """Wait until a checkpoint at step 2*INTERVAL exists and a few more steps ran; return the step reached."""
        _wait_for(
            lambda: any(r["event"] == "checkpoint" and r["step"] >= 2 * INTERVAL for r in self.records()),
            240,
            "no checkpoint at step 40",
        )
        _wait_for(lambda: self.last_step() >= 2 * INTERVAL + 5, 60, "no step 45")
        return self.last_step()

    def wait_completed(self, timeout: float = 300) -> None:
        _wait_for(lambda: self.hook.get_job(self.job_id).finished, timeout, f"job {self.job_id} did not finish")
        log = (self.workdir / f"logs/{self.job_id}.out").read_text()[-3000:]
        assert self.hook.get_job(self.job_id).state == "COMPLETED", log

    def assert_resumed_and_finished(self, interrupted_at: int) -> None:
        """Training restarted from a checkpoint at most one interval back and ran every step to the end."""
        records = self.records()
        starts = [r for r in records if r["event"] == "start"]
        assert len(starts) >= 2 and starts[0]["resumed_from_step"] is None
        resumed = starts[-1]["resumed_from_step"]
        # From an interval's checkpoint, or (where Slurm's SIGTERM reached the ranks) the one saved as they stopped.
        preempted = {r["step"] for r in records if r["event"] == "preempted"}
        assert resumed is not None and (resumed % INTERVAL == 0 or resumed in preempted)
        assert interrupted_at - resumed <= INTERVAL, f"lost {interrupted_at - resumed} steps, more than one interval"
        steps = [r["step"] for r in records if r["event"] == "step"]
        assert steps[-1] == 150 and set(range(1, 151)) <= set(steps)
        assert records[-1]["event"] == "end"


def test_killed_rank_resumes_from_newest_checkpoint(stack) -> None:
    job = TrainingJob(stack, "recovery")
    try:
        killed_at = job.wait_past_second_checkpoint()
        # The workers torchrun starts (python -u train.py ...), not srun or torchrun, whose argv look alike.
        workers = subprocess.run(
            ["pgrep", "-f", "--", f"-u [^ ]*train\\.py --config {job.workdir}/train.json"],
            capture_output=True,
            text=True,
        )
        pids = workers.stdout.split()
        assert len(pids) == 2, pids
        os.kill(int(max(pids, key=int)), signal.SIGKILL)
        job.wait_completed()
    finally:
        job.hook.cancel_job_and_wait(job.job_id)
    job.assert_resumed_and_finished(killed_at)


def _return_to_service(hook: SlurmHook, node: str) -> None:
    """Bring ``node`` back: its slurmd still answers, so ReturnToService=2 may already have done it."""
    if "DOWN" in hook.run(["scontrol", "show", "node", node]):
        hook.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"])


def test_job_on_a_failed_node_is_requeued_and_resumes(stack) -> None:
    # The controller declares n2 dead (what it does when slurmd stops answering): Slurm kills the job's steps
    # and requeues it (#SBATCH --requeue); once the node is back, the job runs again and resumes.
    job = TrainingJob(stack, "requeue")
    node = "n2"
    try:
        failed_at = job.wait_past_second_checkpoint()
        job.hook.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=dtp-node-failure-test"])
        _wait_for(lambda: job.hook.get_job(job.job_id).state == "PENDING", 120, "job was not requeued")
        _return_to_service(job.hook, node)
        job.wait_completed(timeout=600)
    finally:
        _return_to_service(job.hook, node)
        job.hook.cancel_job_and_wait(job.job_id)
    assert "Restarts=1" in job.hook.run(["scontrol", "show", "job", job.job_id])
    job.assert_resumed_and_finished(failed_at)
