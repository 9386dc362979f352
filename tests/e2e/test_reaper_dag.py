"""reaper through the real scheduler, triggered over REST: the AWS and the cluster sweeps run, a job of a DAG run still
running (here the reaper's own) is kept whatever its expiry, and a dry run deletes nothing."""

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
    run_id = f"manual__it-reaper-{uuid.uuid4().hex[:8]}"
    jobs = {}
    # One of a DAG run this Airflow does not know (finished and deleted), one of the reaper's run about to sweep: that
    # one is still running while it looks, and asks the API server so through the Task SDK.
    for label, dag_run in (("gone", ("it_reaper", f"manual__{uuid.uuid4().hex}")), ("running", (DAG_ID, run_id))):
        name = f"dtp-it-reaper-dag-{uuid.uuid4().hex[:6]}"
        comment = slurm_comment(expiry(-1), *dag_run)
        job_id = SlurmHook().submit(
            str(workdir / "job.sh"), job_name=name, output=str(workdir / "o-%j"), comment=comment
        )
        jobs[label] = (name, job_id)
    try:
        airflow_api.wait_for_dag(DAG_ID)
        assert airflow_api.trigger(DAG_ID, {"dry_run": True}, run_id=run_id) == run_id
        state = airflow_api.wait(DAG_ID, run_id, timeout=600)
        tasks = {ti["task_id"]: ti["state"] for ti in airflow_api.task_instances(DAG_ID, run_id)}
        assert state == "success", tasks
        assert set(tasks) == {
            "find_expired_in_aws",
            "delete_expired_in_aws",
            "find_expired_on_eks",
            "delete_expired_on_eks",
            "find_expired_on_pushgateway",
            "delete_expired_on_pushgateway",
            "find_expired_on_cluster",
            "delete_expired_on_cluster",
            "find_expired_on_worker_mount",
            "delete_expired_on_worker_mount",
        }
        # No dtp_eks connection, and dtp_hyperpod's clusters run Slurm: no EKS cluster to sweep.
        on_eks = airflow_api.xcom(DAG_ID, run_id, "delete_expired_on_eks")
        assert on_eks == {"dry_run": True, "found": [], "deleted": []}
        # No prometheus_pushgateway connection in the local stack: no Pushgateway to sweep.
        on_gateway = airflow_api.xcom(DAG_ID, run_id, "delete_expired_on_pushgateway")
        assert on_gateway == {"dry_run": True, "found": [], "deleted": []}
        # The worker's mount is slurm_default's shared directory here: the cluster's sweep covers it.
        assert airflow_api.xcom(DAG_ID, run_id, "find_expired_on_worker_mount") == []
        on_cluster = airflow_api.xcom(DAG_ID, run_id, "delete_expired_on_cluster")
        assert on_cluster["dry_run"] is True and on_cluster["deleted"] == []
        found = [(f["kind"], f["name"]) for f in on_cluster["found"]]
        assert ("slurm_job", jobs["gone"][1]) in found and ("slurm_job", jobs["running"][1]) not in found
        for name, job_id in jobs.values():
            assert [job.job_id for job in SlurmHook().find_jobs(name)] == [job_id]
    finally:
        for name, _ in jobs.values():
            SlurmHook().cancel_and_wait(name)
