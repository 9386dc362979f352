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
        instances = airflow_api.task_instances(DAG_ID, run_id)
        tasks = {(ti["task_id"], ti["map_index"]): ti["state"] for ti in instances}
        assert state == "success", tasks
        # The stack's one cluster, slurm_default, whose shared directory is the one the worker mounts: one sweep.
        assert set(tasks) == {
            ("find_expired_in_aws", -1),
            ("delete_expired_in_aws", -1),
            ("swept_clusters", -1),
            ("sweep_cluster.find_expired_on_cluster", 0),
            ("sweep_cluster.delete_expired", 0),
        }
        [finding] = [ti for ti in instances if ti["task_id"] == "sweep_cluster.find_expired_on_cluster"]
        assert finding["rendered_map_index"] == "slurm_default"
        on_cluster = airflow_api.xcom(DAG_ID, run_id, "sweep_cluster.delete_expired", map_index=0)
        assert on_cluster["dry_run"] is True and on_cluster["deleted"] == []
        assert {"kind": "slurm_job", "name": job_id} in [
            {"kind": f["kind"], "name": f["name"]} for f in on_cluster["found"]
        ]
        assert [job.job_id for job in SlurmHook().find_jobs(name)] == [job_id]
    finally:
        SlurmHook().cancel_and_wait(name)
