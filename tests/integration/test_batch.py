"""The Batch platform against the local emulator: one compute environment, queue and job definition per run,
a multi-node parallel job submitted to them, verified teardown.

The runs are single-node on an instance type without EFA interfaces: every job needs a launch template
(``BatchPlatform.check``), and the emulator creates no compute environment without securityGroupIds, which a compute
environment leaves to the launch template's network interfaces where the instance type has EFA ones."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from airflow.sdk.exceptions import TaskDeferred

from dtp.form_params import parse_params
from dtp.operators.batch import BatchJobOperator
from dtp.params import TrainParams
from dtp.pipeline import jobs
from dtp.pipeline.graph import submit_prepared_batch_job
from dtp.pipeline.spec import run_spec
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.batch import ACTIVE_JOB_STATES, BatchPlatform
from dtp.platforms.batch_requests import DIGEST_TAG, job_definition_request

pytestmark = pytest.mark.stack
AWS = "aws_default"
ASSUME_ECS = {
    "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
}


def _spec(num_nodes: int) -> dict:
    conf = {"platform": "batch", "recipe": "tiny", "instance_type": "m5.2xlarge", "num_nodes": num_nodes}
    return run_spec(parse_params(TrainParams, conf), "it_batch", f"manual__{uuid.uuid4().hex}")


@pytest.fixture
def spec(stack) -> dict:
    return _spec(num_nodes=1)


@pytest.fixture
def roles(spec, aws, monkeypatch) -> Iterator[None]:
    """The account's ECS instance profile, Batch service role (the emulator requires a service role) and launch
    template, and the ``dtp_batch`` connection naming them: the stack defines no such connection."""
    iam, ec2, name = aws("iam"), aws("ec2"), f"{spec['names']['run_key']}-ecs"
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(ASSUME_ECS))["Role"]
    profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    template = ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData={})["LaunchTemplate"]
    extra = {
        "instance_role_arn": profile["Arn"],
        "service_role_arn": role["Arn"],
        "launch_template_id": template["LaunchTemplateId"],
        "wait_timeout_minutes": 1,
    }
    monkeypatch.setenv("AIRFLOW_CONN_DTP_BATCH", json.dumps({"conn_type": "generic", "extra": extra}))
    yield
    ec2.delete_launch_template(LaunchTemplateId=template["LaunchTemplateId"])
    iam.delete_instance_profile(InstanceProfileName=name)
    iam.delete_role(RoleName=name)


def _batch_config(stack: Any, use_docker: bool) -> Iterator[None]:
    """The emulator's Batch jobs with ``use_docker`` set; its setting is restored afterwards."""
    url = f"{stack.moto_url}/moto-api/config"
    before = requests.get(url, timeout=10).json()["batch"]
    requests.post(url, json={"batch": {"use_docker": use_docker}}, timeout=10).raise_for_status()
    yield
    requests.post(url, json={"batch": before}, timeout=10).raise_for_status()


@pytest.fixture
def jobs_without_docker(stack) -> Iterator[None]:
    """The emulator runs Batch jobs in Docker unless told not to; there is no Docker engine here, so jobs then
    succeed at once without running anything."""
    yield from _batch_config(stack, use_docker=False)


@pytest.fixture
def jobs_in_docker(stack) -> Iterator[None]:
    """Jobs run as on Batch: through their states, a job waiting for its dependencies first (without Docker, a job
    that gets to run its container fails)."""
    yield from _batch_config(stack, use_docker=True)


def _ended(aws: Any, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (job := aws("batch").describe_jobs(jobs=[job_id])["jobs"][0])["status"] not in ("SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline, f"job {job_id} is still {job['status']}"
        time.sleep(0.5)
    return job


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


def test_provision_twice_then_a_job_then_teardown_leaves_nothing(
    spec, outputs, roles, jobs_without_docker, aws, first_event
):
    platform = BatchPlatform(poll_seconds=1)
    run_key = spec["names"]["run_key"]
    message = f"Batch compute environment {run_key}-ce and job queue {run_key}-queue are VALID"
    ready = {"status": "success", "message": message}
    try:
        cluster = platform.provision(spec, outputs)
        # The trigger reaches the emulator through the connection's endpoint, as deploy_cluster defers to it.
        assert first_event(platform.ready_trigger(cluster)) == ready
        assert platform.provision(spec, outputs) == cluster
        # A teardown that stopped after disabling them: provision enables them again rather than reusing them so.
        aws("batch").update_job_queue(jobQueue=f"{run_key}-queue", state="DISABLED")
        aws("batch").update_compute_environment(computeEnvironment=f"{run_key}-ce", state="DISABLED")
        assert platform.provision(spec, outputs) == cluster
        assert first_event(platform.ready_trigger(cluster)) == ready
        assert cluster | {"job_definition": None} == {
            "platform": "batch",
            "compute_environment": f"{run_key}-ce",
            "job_queue": f"{run_key}-queue",
            "job_definition": None,
            "scheduler": "batch",
            "shared_dir": "/fsx",
            "nodes": 1,
        }
        left = _left(aws, run_key)
        assert [len(items) for items in left.values()] == [1, 1, 1]
        (environment,), (queue,), (definition,) = left.values()
        assert (environment["status"], environment["state"], queue["status"]) == ("VALID", "ENABLED", "VALID")
        resources = environment["computeResources"]
        assert (resources["subnets"], resources["maxvCpus"]) == ([outputs["PrivateSubnet"]], 8)
        assert resources["securityGroupIds"] == [outputs["SecurityGroup"]]
        assert resources["launchTemplate"]["launchTemplateId"].startswith("lt-")
        assert definition["jobDefinitionArn"] == cluster["job_definition"]
        assert (definition["type"], definition["revision"], definition["tags"]["dtp:run"]) == ("multinode", 1, run_key)

        job_id = aws("batch").submit_job(
            jobName=f"{run_key}-train", jobQueue=cluster["job_queue"], jobDefinition=cluster["job_definition"]
        )["jobId"]
        job = _ended(aws, job_id)
        assert (job["status"], job["jobName"], job["nodeProperties"]["numNodes"]) == (
            "SUCCEEDED",
            f"{run_key}-train",
            1,
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


@pytest.mark.parametrize("num_nodes", [1, 2])
def test_a_run_without_a_launch_template_creates_nothing(spec, outputs, roles, aws, monkeypatch, num_nodes) -> None:
    """Its hosts would get no /fsx to share the run's files through: refused before any request is sent."""
    conn = json.loads(os.environ["AIRFLOW_CONN_DTP_BATCH"])
    monkeypatch.setenv(
        "AIRFLOW_CONN_DTP_BATCH", json.dumps({**conn, "extra": {**conn["extra"], "launch_template_id": ""}})
    )
    run = _spec(num_nodes=num_nodes)
    with pytest.raises(PlatformNotReady, match=rf"no launchTemplate .* but the job runs on {num_nodes} node"):
        BatchPlatform(poll_seconds=1).provision(run, outputs)
    assert _left(aws, run["names"]["run_key"]) == {
        "compute_environments": [],
        "job_queues": [],
        "job_definitions": [],
    }


def test_teardown_terminates_the_runs_unfinished_jobs(spec, outputs, roles, jobs_in_docker, aws) -> None:
    """A job of the run that has not ended when the run is torn down is terminated with DTP's reason (Batch then
    fails it); one that ended is left alone. The emulator holds a job unfinished while it waits for a dependency it
    never sees end: here a job id it does not know (AWS would refuse that id; it stands for a job still running)."""
    platform = BatchPlatform(poll_seconds=1)
    run_key = spec["names"]["run_key"]
    batch = aws("batch")
    cluster = platform.provision(spec, outputs)
    submit = {"jobQueue": cluster["job_queue"], "jobDefinition": cluster["job_definition"]}
    try:
        ended = batch.submit_job(jobName=f"{run_key}-preflight", **submit)["jobId"]
        _ended(aws, ended)  # (it fails at its container: no Docker engine here)
        waiting = batch.submit_job(jobName=f"{run_key}-train", dependsOn=[{"jobId": str(uuid.uuid4())}], **submit)[
            "jobId"
        ]
        assert batch.describe_jobs(jobs=[waiting])["jobs"][0]["status"] in ACTIVE_JOB_STATES
    finally:
        result = platform.teardown(spec)

    try:
        assert result["terminated_jobs"] == [waiting]
        job = _ended(aws, waiting)
    finally:  # a job teardown left would wait in the emulator for good (a no-op on one that was terminated)
        batch.terminate_job(jobId=waiting, reason="test cleanup")
    assert (job["status"], job["statusReason"]) == ("FAILED", f"end of run {run_key}")
    assert _left(aws, run_key) == {"compute_environments": [], "job_queues": [], "job_definitions": []}


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
        result = platform.teardown(spec)
    assert len(result["deregistered_job_definitions"]) == 2
    assert _left(aws, run_key) == {"compute_environments": [], "job_queues": [], "job_definitions": []}


def test_the_pipelines_jobs_run_on_the_runs_queue_once_per_name(
    spec, outputs, roles, jobs_without_docker, aws, tmp_path, first_event
) -> None:
    platform = BatchPlatform(poll_seconds=1)
    run_key = spec["names"]["run_key"]
    batch = aws("batch")

    def operator(job: dict[str, Any]) -> BatchJobOperator:
        # As train_e2e submits it; no task instance here to hold the console links.
        return submit_prepared_batch_job("run_job_on_batch", job, poll_interval=1, do_xcom_push=False)

    def run(op: BatchJobOperator) -> str | None:
        try:
            return op.execute({})
        except TaskDeferred as deferred:
            return op.execute_complete({}, first_event(deferred.trigger))

    try:
        # tmp_path stands for the FSx mount of the training queue's worker.
        cluster = {**platform.provision(spec, outputs), "shared_dir": str(tmp_path)}
        images = platform.runtime("registry.example/dtp-training@sha256:" + "a" * 64, spec)
        preflight = jobs.prepare_preflight(spec, cluster, images)
        assert (preflight["job_name"], preflight["results_path"]) == (
            f"{run_key}-preflight",
            f"{tmp_path}/runs/{run_key}/preflight.json",
        )
        # The published image needs a definition of its own: a job cannot override a multi-node job's image.
        # (The emulator describes no nodeProperties; the content digest tag tells which definition it holds.)
        (definition,) = batch.describe_job_definitions(jobDefinitions=[preflight["job_definition"]])["jobDefinitions"]
        expected = job_definition_request(spec, images)
        assert expected["nodeProperties"]["nodeRangeProperties"][0]["container"]["image"] == images["image"]
        assert (definition["revision"], definition["tags"][DIGEST_TAG]) == (2, expected["tags"][DIGEST_TAG])

        first = operator(preflight)
        first.submit_job({})
        retried = operator(preflight)
        retried.submit_job({})
        assert first.job_id and retried.job_id == first.job_id  # a retry waits on its first try's job
        submitted = _ended(aws, first.job_id)
        assert submitted["status"] == "SUCCEEDED" and submitted["timeout"] == {"attemptDurationSeconds": 900}
        assert run(operator(preflight)) == first.job_id  # it succeeded: nothing is submitted again

        training = jobs.prepare_training(spec, cluster, images, {"train_bin": "/fsx/train.bin"})
        assert training["job_definition"] == preflight["job_definition"]
        assert run(operator(training)) != first.job_id
        assert json.loads((tmp_path / "runs" / run_key / "train.json").read_text())["data_path"] == "/fsx/train.bin"
        listed = batch.list_jobs(
            jobQueue=cluster["job_queue"], filters=[{"name": "JOB_NAME", "values": [run_key + "*"]}]
        )
        assert sorted(job["jobName"] for job in listed["jobSummaryList"]) == [
            f"{run_key}-preflight",
            f"{run_key}-train",
        ]
    finally:
        platform.teardown(spec)
    assert _left(aws, run_key) == {"compute_environments": [], "job_queues": [], "job_definitions": []}
