"""What the Slurm job tests share (test_slurm_job_reports.py, test_slurm_job_reuse.py, test_slurm_trigger_on_kill.py):
a ``SlurmHook`` stand-in for a cluster, put in place of the trigger's and the operator's, and the job, trigger and
operator under test."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from dtp.hooks.slurm import SlurmJob
from dtp.operators.slurm import SlurmSubmitJobOperator
from dtp.triggers.slurm import SlurmJobTrigger


class Cluster:
    """A ``SlurmHook`` stand-in: the job's log is ``log`` (its bytes as a poll finds them, ``reads`` by
    ``read_log``), ``states`` what successive polls of ``get_job`` find (the last one from then on), ``active`` what
    squeue lists, ``ended`` what sacct knows of ended jobs; it records the jobs it submits and cancels."""

    log = b""
    states: list[SlurmJob] = []
    active: list[SlurmJob] = []
    ended: list[SlurmJob] = []
    unavailable: list[str] = []
    made: list[Cluster] = []

    def __init__(
        self, slurm_conn_id: str = "", head_node: str | None = None, head_node_host_keys: Sequence[str] = ()
    ) -> None:
        self.head_node_host_keys = list(head_node_host_keys)
        self.reads: list[tuple[int, int]] = []  # (offset, bytes read) of each read
        self.polls = 0
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.made.append(self)

    def read_log(self, path: str, offset: int, max_bytes: int) -> tuple[str, int]:
        data = self.log[offset : offset + max_bytes]
        self.reads.append((offset, len(data)))
        return data.decode(), offset + len(data)

    def get_job(self, job_id: str) -> SlurmJob:
        self.polls += 1
        return self.states[min(self.polls, len(self.states)) - 1]

    def unavailable_nodes(self) -> list[str]:
        return self.unavailable

    def find_jobs(self, name: str) -> list[SlurmJob]:
        return self.active

    def ended_jobs(self, name: str) -> list[SlurmJob]:
        return self.ended

    def submit(self, script_path: str, **options: Any) -> str:
        self.submitted.append(options["job_name"])
        return "99"

    def cancel_job(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def close(self) -> None:
        pass


def use_cluster(monkeypatch: pytest.MonkeyPatch) -> type[Cluster]:
    """``Cluster``, with no log, job or node yet, in place of the trigger's and the operator's ``SlurmHook``."""
    monkeypatch.setattr("dtp.triggers.slurm.SlurmHook", Cluster)
    monkeypatch.setattr("dtp.operators.slurm.SlurmHook", Cluster)
    Cluster.log, Cluster.states, Cluster.active, Cluster.ended, Cluster.unavailable, Cluster.made = (
        b"",
        [],
        [],
        [],
        [],
        [],
    )
    return Cluster


def job(state: str, **fields: Any) -> SlurmJob:
    """Job 7 of the run (``run-train``) in ``state``."""
    return SlurmJob(job_id="7", name="run-train", state=state, **fields)


def trigger(**kwargs: Any) -> SlurmJobTrigger:
    """The trigger waiting on job 7, polling without a pause."""
    return SlurmJobTrigger(job_id="7", log_path="/fsx/o-7", poll_interval=0, **kwargs)


def operator(**kwargs: Any) -> SlurmSubmitJobOperator:
    """The operator that submits the run's ``run-train`` job."""
    return SlurmSubmitJobOperator(
        task_id="train", script_path="/s.sh", job_name="run-train", output_path="/o-%j", **kwargs
    )
