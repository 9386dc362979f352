"""validate_cluster through the real scheduler against the local Slurm cluster, triggered over REST."""

from __future__ import annotations

import json
import sys

import pytest
from report_links import report_through_link

from dtp.hooks.slurm import SlurmHook

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(2700)]
DAG_ID = "validate_cluster"


def _run(api, conf: dict) -> tuple[str, str, dict[str, str]]:
    api.wait_for_dag(DAG_ID)
    run_id = api.trigger(DAG_ID, conf)
    state = api.wait(DAG_ID, run_id, timeout=600)
    return run_id, state, {ti["task_id"]: ti["state"] for ti in api.task_instances(DAG_ID, run_id)}


def _report(api, run_id: str) -> str:
    return report_through_link(api, DAG_ID, run_id, "Validation report")


def test_local_cluster_passes_with_a_report(airflow_api) -> None:
    run_id, state, tasks = _run(airflow_api, {})
    assert state == "success", tasks
    assert all(s == "success" for s in tasks.values()), tasks
    html = _report(airflow_api, run_id)
    assert '<b class="PASSED">PASSED</b>' in html
    assert '<img alt="busbw" src="data:image/png;base64,' in html
    assert "<th>n1</th>" in html and "<th>n2</th>" in html and "<th>efa_installer</th>" in html
    spec = airflow_api.xcom(DAG_ID, run_id, "validate_params")
    assert SlurmHook().find_jobs(spec["names"]["slurm_job"], prefix=True) == []


def test_failing_cluster_still_gets_its_report_and_fails_the_run(airflow_api) -> None:
    run_id, state, tasks = _run(airflow_api, {"expected_busbw_gbps": 500.0})
    assert state == "failed"
    assert tasks["report"] == "success" and tasks["verdict"] == "failed" and tasks["cancel_jobs"] == "success"
    html = _report(airflow_api, run_id)
    assert '<b class="FAILED">FAILED</b>' in html and "TOO LOW" in html


def test_a_cluster_reached_over_ssh_passes(airflow_api, stack) -> None:
    # The local cluster as a real one is reached: through the stack's sshd (slurm_ssh), its nodes' interpreter
    # named, and an AWS CPU instance type for the checks. Every step (the job's files, sbatch, the wait in the
    # triggerer, the results, the cancel) goes over ssh.
    conf = {"slurm_conn_id": "slurm_ssh", "python": sys.executable, "instance_type": "m5.2xlarge"}
    run_id, state, tasks = _run(airflow_api, conf)
    assert state == "success", tasks
    assert '<b class="PASSED">PASSED</b>' in _report(airflow_api, run_id)
    spec = airflow_api.xcom(DAG_ID, run_id, "validate_params")
    assert (spec["params"]["slurm_conn_id"], spec["params"]["instance_type"]) == ("slurm_ssh", "m5.2xlarge")
    results = stack.shared_dir / "runs" / spec["names"]["run_key"] / "preflight.json"
    assert json.loads(results.read_text())["world_size"] == 2  # written by the job, read back over ssh
