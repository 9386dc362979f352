"""The Batch platform against the local emulator: one compute environment, queue and job definition per run,
a multi-node job submitted to them, verified teardown."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from dtp.params import TrainParams, parse_params
from dtp.pipeline import network
from dtp.pipeline.spec import run_spec
from dtp.platforms.batch import BatchPlatform

pytestmark = pytest.mark.stack
AWS = "aws_default"
ASSUME_ECS = {
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
}


@pytest.fixture
def spec(stack) -> dict:
    params = parse_params(
        TrainParams, {"platform": "batch", "recipe": "tiny", "instance_type": "m5.2xlarge", "num_nodes": 2}
    )
    return run_spec(params, "it_batch", f"manual__{uuid.uuid4().hex}")


@pytest.fixture
def outputs(spec) -> Iterator[dict]:
    network.create_network_stack(spec, AWS)
    yield network.network_outputs(spec, AWS)
    network.teardown_network(spec, AWS)


@pytest.fixture
def roles(spec, aws, monkeypatch) -> Iterator[None]:
    """The account's ECS instance profile and Batch service role (the emulator requires a service role), and the
    ``dtp_batch`` connection naming them: the stack defines no such connection."""
    iam, name = aws("iam"), f"{spec['names']['run_key']}-ecs"
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(ASSUME_ECS))["Role"]
    profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    extra = {"instance_role_arn": profile["Arn"], "service_role_arn": role["Arn"], "wait_timeout_minutes": 1}
    monkeypatch.setenv("AIRFLOW_CONN_DTP_BATCH", json.dumps({"conn_type": "generic", "extra": extra}))
    yield
    iam.delete_instance_profile(InstanceProfileName=name)
    iam.delete_role(RoleName=name)


@pytest.fixture
def jobs_without_docker(stack) -> Iterator[None]:
    """The emulator runs Batch jobs in Docker unless told not to; there is no Docker engine here, so jobs then
    succeed at once without running anything. The emulator's setting is restored afterwards."""
    url = f"{stack.moto_url}/moto-api/config"
    before = requests.get(url, timeout=10).json()["batch"]
    requests.post(url, json={"batch": {"use_docker": False}}, timeout=10).raise_for_status()
    yield
    requests.post(url, json={"batch": before}, timeout=10).raise_for_status()


def _left(aws: Any, run_key: str) -> dict[str, list[Any]]:
    batch = aws("batch")
    return {
        "compute_environments": batch.describe_compute_environments(computeEnvironments=[f"{run_key}-ce"])[
            "computeEnvironments"
        ],
        "job_queues": batch.describe_job_queues(jobQueues=[f"{run_key}-queue"])["jobQueues"],
        "job_definitions": batch.describe_job_definitions(jobDefinitionName=f"{run_key}-train", status="ACTIVE")[
            "jobDefinitions"
        ],
    }


def test_provision_twice_then_a_job_then_teardown_leaves_nothing(spec, outputs, roles, jobs_without_docker, aws):
    platform = BatchPlatform(poll_seconds=1)
    run_key = spec["names"]["run_key"]
    try:
        cluster = platform.provision(spec, outputs)
        assert platform.provision(spec, outputs) == cluster
        assert cluster | {"job_definition": None} == {
            "platform": "batch",
            "compute_environment": f"{run_key}-ce",
            "job_queue": f"{run_key}-queue",
            "job_definition": None,
            "scheduler": "batch",
            "shared_dir": "/fsx",
            "nodes": 2,
        }
        left = _left(aws, run_key)
        assert [len(items) for items in left.values()] == [1, 1, 1]
        (environment,), (queue,), (definition,) = left.values()
        assert (environment["status"], environment["state"], queue["status"]) == ("VALID", "ENABLED", "VALID")
        resources = environment["computeResources"]
        assert (resources["subnets"], resources["maxvCpus"]) == ([outputs["PrivateSubnet"]], 16)
        assert definition["jobDefinitionArn"] == cluster["job_definition"]
        assert (definition["type"], definition["revision"], definition["tags"]["dtp:run"]) == ("multinode", 1, run_key)

        job_id = platform.submit_training(spec, cluster)
        batch = aws("batch")
        deadline = time.monotonic() + 30
        while (job := batch.describe_jobs(jobs=[job_id])["jobs"][0])["status"] not in ("SUCCEEDED", "FAILED"):
            assert time.monotonic() < deadline, f"job {job_id} is still {job['status']}"
            time.sleep(0.5)
        assert (job["status"], job["jobName"], job["nodeProperties"]["numNodes"]) == (
            "SUCCEEDED",
            f"{run_key}-train",
            2,
        )
    finally:
        result = platform.teardown(spec)

    assert result == {
        "terminated_jobs": [],
        "deregistered_job_definitions": [cluster["job_definition"]],
        "deleted_job_queue": True,
        "deleted_compute_environment": True,
    }
    assert _left(aws, run_key) == {"compute_environments": [], "job_queues": [], "job_definitions": []}
    # A retried teardown finds nothing left and still succeeds.
    assert platform.teardown(spec) == {
        "terminated_jobs": [],
        "deregistered_job_definitions": [],
        "deleted_job_queue": False,
        "deleted_compute_environment": False,
    }


def test_a_changed_job_definition_is_registered_as_a_new_revision(spec, outputs, roles, aws, monkeypatch) -> None:
    platform = BatchPlatform(poll_seconds=1)
    run_key = spec["names"]["run_key"]
    try:
        first = platform.provision(spec, outputs)["job_definition"]
        changed = {**spec, "params": {**spec["params"], "extra_env": {"NCCL_DEBUG": "INFO"}}}
        second = platform.provision(changed, outputs)["job_definition"]
        assert (first.rsplit(":", 1)[1], second.rsplit(":", 1)[1]) == ("1", "2")
        assert platform.provision(changed, outputs)["job_definition"] == second
    finally:
        assert len(platform.teardown(spec)["deregistered_job_definitions"]) == 2
    assert _left(aws, run_key) == {"compute_environments": [], "job_queues": [], "job_definitions": []}
