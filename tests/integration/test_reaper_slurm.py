"""The reaper's Slurm part against the real local cluster: an expired job counts as deleted only once it is gone."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict

import pytest

from dtp.hooks.shared_fs import ClusterCommandError
from dtp.hooks.slurm import SlurmHook
from dtp.naming import expiry, slurm_comment
from dtp.reaper.cluster import find_expired_on_cluster
from dtp.reaper.deletion import ReapIncomplete, reap
from dtp.reaper.expired import Expired

pytestmark = pytest.mark.stack
AWS, SLURM = "aws_default", "slurm_default"


def no_run_active(dag_id: str, run_id: str) -> bool:
    return False


def _started_job(stack, body: str, comment: str) -> tuple[str, str]:
    """Submit ``body`` with ``comment`` and wait until it printed ``ready``; return its name and id."""
    workdir = stack.shared_dir / "it" / uuid.uuid4().hex[:8]
    workdir.mkdir(parents=True)
    (workdir / "job.sh").write_text(f"#!/bin/bash\n{body}")
    name = f"dtp-it-reap-{uuid.uuid4().hex[:6]}"
    job_id = SlurmHook().submit(str(workdir / "job.sh"), job_name=name, output=str(workdir / "o-%j"), comment=comment)
    output = workdir / f"o-{job_id}"
    deadline = time.monotonic() + 60
    while not (output.exists() and "ready" in output.read_text()):
        assert time.monotonic() < deadline, f"job {job_id} did not start"
        time.sleep(0.5)
    return name, job_id


def _expired_job(stack, body: str) -> tuple[str, Expired]:
    """Submit ``body`` with an expiry an hour ago in its comment and wait until it printed ``ready``; return its
    name, and what ``find_expired_on_cluster`` makes of it."""
    name, job_id = _started_job(stack, body, slurm_comment(expiry(-1), "it_reaper", f"manual__{uuid.uuid4().hex}"))
    found = find_expired_on_cluster(SLURM, active=no_run_active)
    mine = [item for item in found if item.kind == "slurm_job" and item.name == job_id]
    assert len(mine) == 1, mine
    return name, mine[0]


def test_an_expired_job_of_a_run_still_running_is_left_running(stack) -> None:
    run_id = f"manual__{uuid.uuid4().hex}"
    name, job_id = _started_job(stack, "echo ready\nsleep 300\n", slurm_comment(expiry(-1), "it_reaper", run_id))
    try:

        def jobs_found(active: Callable[[str, str], bool]) -> list[str]:
            return [item.name for item in find_expired_on_cluster(SLURM, active=active) if item.kind == "slurm_job"]

        assert job_id in jobs_found(no_run_active)  # expired, and found by its comment
        assert job_id not in jobs_found(lambda dag_id, run: (dag_id, run) == ("it_reaper", run_id))
        assert [job.job_id for job in SlurmHook().find_jobs(name)] == [job_id]
    finally:
        SlurmHook().cancel_and_wait(name)


def test_a_reaped_job_is_gone_when_the_reaper_says_so(stack) -> None:
    # The job ignores SIGTERM: after scancel Slurm lists it COMPLETING until KillWait passes and SIGKILL ends it.
    name, job = _expired_job(stack, "trap '' TERM\necho ready\nsleep 300\n")
    try:
        result = reap([job], AWS, SLURM, dry_run=False)
        assert result["deleted"] == [asdict(job)]
        assert SlurmHook().find_jobs(name) == []
    finally:
        SlurmHook().cancel_and_wait(name)


def test_a_scancel_slurmctld_never_heard_is_not_counted_as_deleted(stack, unreachable_slurm: str) -> None:
    # scancel fails, and the job runs on.
    name, job = _expired_job(stack, "echo ready\nsleep 300\n")
    try:
        with pytest.raises(ReapIncomplete, match=rf"slurm_job {job.name}: scancel {job.name} exited \d+: .*slurm"):
            reap([job], AWS, unreachable_slurm, dry_run=False)
        assert [j.job_id for j in SlurmHook().find_jobs(name)] == [job.name]
    finally:
        SlurmHook().cancel_and_wait(name)


def test_a_cluster_that_cannot_be_asked_is_an_error_not_an_empty_sweep(unreachable_slurm: str) -> None:
    with pytest.raises(ClusterCommandError, match=r"squeue -h exited \d+: .*slurm"):
        find_expired_on_cluster(unreachable_slurm, active=no_run_active)
