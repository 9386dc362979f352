"""The reaper's Slurm part against the real local cluster: an expired job counts as deleted only once it is gone, one of
another installation sharing the cluster is left for a day past its expiry, and the directories runs share go over ssh
once every run that leased them has expired."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dtp.hooks.shared_fs import ClusterCommandError
from dtp.hooks.slurm import SlurmHook
from dtp.naming import EXPIRES_TAG, expiry, slurm_comment
from dtp.pipeline.run_dirs import lease_shared_dir
from dtp.reaper.cluster import find_expired_on_cluster
from dtp.reaper.deletion import ReapIncomplete, reap
from dtp.reaper.expired import Expired

pytestmark = pytest.mark.stack
AWS, SLURM = "aws_default", "slurm_default"
# slurm_default's cluster reached through the stack's sshd (see test_ssh_transport).
SSH = "slurm_ssh"
INSTALLATION = "it-reaper"  # the reaper's


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
    found = find_expired_on_cluster(SLURM, active=no_run_active, installation=INSTALLATION)
    mine = [item for item in found if item.kind == "slurm_job" and item.name == job_id]
    assert len(mine) == 1, mine
    return name, mine[0]


def test_an_expired_job_of_a_run_still_running_is_left_running(stack) -> None:
    run_id = f"manual__{uuid.uuid4().hex}"
    name, job_id = _started_job(stack, "echo ready\nsleep 300\n", slurm_comment(expiry(-1), "it_reaper", run_id))
    try:

        def jobs_found(active: Callable[[str, str], bool]) -> list[str]:
            return [
                item.name
                for item in find_expired_on_cluster(SLURM, active=active, installation=INSTALLATION)
                if item.kind == "slurm_job"
            ]

        assert job_id in jobs_found(no_run_active)  # expired, and found by its comment
        assert job_id not in jobs_found(lambda dag_id, run: (dag_id, run) == ("it_reaper", run_id))
        assert [job.job_id for job in SlurmHook().find_jobs(name)] == [job_id]
    finally:
        SlurmHook().cancel_and_wait(name)


def test_another_installations_expired_job_is_left_running_for_a_day(stack) -> None:
    # Staging and prod share the cluster. The other's id holds a space, which its comment keeps.
    run_id, other = f"manual__{uuid.uuid4().hex}", f"staging {uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    jobs: dict[str, tuple[str, str]] = {}
    try:
        for installation in (INSTALLATION, other):
            comment = slurm_comment(expiry(-1), "it_reaper", run_id, installation)
            jobs[installation] = _started_job(stack, "echo ready\nsleep 300\n", comment)

        def found_at(hours_later: int) -> dict[str, tuple[str, str]]:
            found = find_expired_on_cluster(
                SLURM, now + timedelta(hours=hours_later), active=no_run_active, installation=INSTALLATION
            )
            return {item.name: (item.run_id, item.installation) for item in found if item.kind == "slurm_job"}

        (_, mine), (_, theirs) = jobs.values()
        assert found_at(0).get(mine) == (run_id, INSTALLATION) and theirs not in found_at(0)
        assert found_at(24).get(theirs) == (run_id, other)
    finally:
        for name, _ in jobs.values():
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
        find_expired_on_cluster(unreachable_slurm, active=no_run_active, installation=INSTALLATION)


def test_the_shared_directories_whose_leases_expired_go_over_ssh(stack, workdir: Path) -> None:
    # Through the Slurm connection over ssh, as the sweep of a cluster the worker does not run on: the leases are
    # written, listed and read there, and the directories deleted there.
    framework = f"it-reaper-{uuid.uuid4().hex[:8]}"
    shared = stack.shared_dir
    expired, leased = shared / "datasets" / framework / "expired", shared / "datasets" / framework / "leased"
    (workdir / "precious").write_text("x")
    try:
        for directory, hours_left in ((expired, {"it-a": -1}), (leased, {"it-b": -1, "it-c": 1})):
            (directory / "shards").mkdir(parents=True)
            (directory / "shards" / "a.bin").write_bytes(b"\x01")
            (directory / "shards" / "link").symlink_to(workdir / "precious")
            for run_key, hours in hours_left.items():
                spec = {"names": {"run_key": run_key}, "dag_id": "it_reaper", "run_id": f"manual__{run_key}"}
                lease_shared_dir(
                    {**spec, "tags": {EXPIRES_TAG: expiry(hours)}},
                    {"shared_dir": str(shared), "slurm_conn_id": SSH},
                    directory,
                )
        found = [
            item
            for item in find_expired_on_cluster(SSH, active=no_run_active, installation=INSTALLATION)
            if framework in item.name
        ]
        leases = shared / "leases" / "datasets" / framework
        assert sorted((item.kind, item.name, item.run_key) for item in found) == [
            ("dataset_mirror", str(expired), "it-a"),
            ("lease", str(leases / "leased" / "it-b.json"), "it-b"),
        ]
        deleted = reap(found, AWS, SSH, dry_run=False)["deleted"]
        assert sorted(item["name"] for item in deleted) == sorted(item.name for item in found)
        assert not expired.exists() and not (leases / "expired").exists()
        assert (leased / "shards" / "a.bin").exists()
        assert [path.name for path in (leases / "leased").iterdir()] == ["it-c.json"]
        assert (workdir / "precious").read_text() == "x"  # the link in the deleted mirror was not followed
    finally:
        shutil.rmtree(shared / "datasets" / framework, ignore_errors=True)
        shutil.rmtree(shared / "leases" / "datasets" / framework, ignore_errors=True)
