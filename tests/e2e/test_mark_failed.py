"""A run marked failed (the UI's "Mark run as failed", a PATCH of its state) ends failed once its teardowns ran.

Airflow fails the tasks running then, skips those yet to run and lets the teardowns finish, then judges the run by
its leaves, where a skipped task counts as a success: judge_run, a last teardown, is what fails it. validate_cluster,
the quickest DAG with teardowns, marked failed while its checks run on the local Slurm cluster.
"""

from __future__ import annotations

import time
import urllib.parse

import pytest

from dtp.hooks.slurm import SlurmHook

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(900)]
DAG_ID = "validate_cluster"


def _states(api, run_id: str) -> dict[str, str]:
    return {ti["task_id"]: ti["state"] for ti in api.task_instances(DAG_ID, run_id)}


def test_a_run_marked_failed_while_its_checks_run_ends_failed_with_nothing_left(airflow_api) -> None:
    airflow_api.wait_for_dag(DAG_ID)
    run_id = airflow_api.trigger(DAG_ID, {})
    deadline = time.monotonic() + 300
    while _states(airflow_api, run_id).get("run_checks") not in ("running", "deferred"):
        assert time.monotonic() < deadline, "run_checks did not start within 300 s"
        time.sleep(1)
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
    status, body = airflow_api.request("PATCH", path, {"state": "failed"})
    assert status == 200, body
    state = airflow_api.wait(DAG_ID, run_id, timeout=600)
    tasks = _states(airflow_api, run_id)
    assert state == "failed", tasks
    assert tasks["run_checks"] == "failed" and tasks["evaluate"] == tasks["verdict"] == "skipped", tasks
    assert tasks["cancel_jobs"] == "success" and tasks["judge_run"] == "failed", tasks
    spec = airflow_api.xcom(DAG_ID, run_id, "validate_params")
    assert SlurmHook().find_jobs(spec["names"]["slurm_job"], prefix=True) == []
