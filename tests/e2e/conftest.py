"""Fixtures shared by the end-to-end tests: what a run of the training pipeline left behind."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dtp.hooks.slurm import SlurmHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.local.api import AirflowApi
from dtp.naming import INSTALLATION_VARIABLE, RunNames


@pytest.fixture(scope="session")
def run_names(airflow_api: AirflowApi) -> Callable[[str, str], dict[str, str]]:
    """``run_names(dag_id, run_id)``: the names the run fixed in ``validate_params`` (for a run refused there,
    those it would have had)."""

    def names(dag_id: str, run_id: str) -> dict[str, str]:
        if spec := airflow_api.xcom(dag_id, run_id, "validate_params"):
            return spec["names"]
        return RunNames(dag_id, run_id, 0, airflow_api.variable(INSTALLATION_VARIABLE) or "").as_dict()

    return names


@pytest.fixture(scope="session")
def run_leftovers(aws, run_names) -> Callable[[str, str], dict[str, list[str]]]:
    """``leftovers(dag_id, run_id)``: every live resource of that run, by kind, in the emulator and on Slurm."""

    def leftovers(dag_id: str, run_id: str) -> dict[str, list[str]]:
        names = run_names(dag_id, run_id)
        found = RunResourceSweeper(aws_conn_id="aws_default").find(names["run_key"], (names["data_bucket"],))
        found["stacks"] = [
            s["StackName"]
            for s in aws("cloudformation").list_stacks()["StackSummaries"]
            if s["StackName"] == names["network_stack"] and s["StackStatus"] != "DELETE_COMPLETE"
        ]
        found["hyperpod_clusters"] = [
            c["ClusterName"]
            for c in aws("sagemaker").list_clusters()["ClusterSummaries"]
            if c["ClusterName"] == names["run_key"]
        ]
        found["slurm_jobs"] = [j.job_id for j in SlurmHook().find_jobs(names["slurm_job"], prefix=True)]
        return {kind: ids for kind, ids in found.items() if ids}

    return leftovers
