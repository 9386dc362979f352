"""reaper through the real scheduler, triggered over REST: the AWS and the cluster sweeps run, and a dry run deletes
nothing."""

from __future__ import annotations

import uuid

import pytest

from dtp.hooks.slurm import SlurmHook
from dtp.naming import expiry, slurm_comment

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(900)]
DAG_ID = "reaper"


def test_a_dry_run_finds_an_expired_job_and_leaves_it_running(airflow_api, stack) -> None:
    workdir = stack.shared_dir / "it" / uuid.uuid4().hex[:8]
    workdir.mkdir(parents=True)
    (workdir / "job.sh").write_text("#!/bin/bash\nsleep 300\n")
    name = f"dtp-it-reaper-dag-{uuid.uuid4().hex[:6]}"
    job_id = SlurmHook().submit(
        str(workdir / "job.sh"), job_name=name, output=str(workdir / "o-%j"), comment=slurm_comment(expiry(-1))
    )
    try:
        airflow_api.wait_for_dag(DAG_ID)
        run_id = airflow_api.trigger(DAG_ID, {"dry_run": True})
        state = airflow_api.wait(DAG_ID, run_id, timeout=600)
        tasks = {ti["task_id"]: ti["state"] for ti in airflow_api.task_instances(DAG_ID, run_id)}
        assert state == "success", tasks
        assert set(tasks) == {
            "find_expired_in_aws",
            "delete_expired_in_aws",
            "find_expired_on_cluster",
            "delete_expired_on_cluster",
            "find_expired_on_worker_mount",
            "delete_expired_on_worker_mount",
        }
        # The worker's mount is slurm_default's shared directory here: the cluster's sweep covers it.
        assert airflow_api.xcom(DAG_ID, run_id, "find_expired_on_worker_mount") == []
        on_cluster = airflow_api.xcom(DAG_ID, run_id, "delete_expired_on_cluster")
        assert on_cluster["dry_run"] is True and on_cluster["deleted"] == []
        assert {"kind": "slurm_job", "name": job_id} in [
            {"kind": f["kind"], "name": f["name"]} for f in on_cluster["found"]
        ]
        assert [job.job_id for job in SlurmHook().find_jobs(name)] == [job_id]
    finally:
        SlurmHook().cancel_and_wait(name)
