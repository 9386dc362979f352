"""Batch's compute environment, job queue and multi-node job definition, checked offline against Batch's model;
BatchJobOperator's retries against botocore's Stubber and moto's Batch (in this process, without Docker)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from botocore.stub import Stubber
from moto import mock_aws
from moto.batch.models import batch_backends
from moto.core import DEFAULT_ACCOUNT_ID

from dtp.operators.batch import BatchJobOperator, BatchJobOverTime
from dtp.params import ParamsError, TrainParams, parse_params
from dtp.pipeline.spec import run_spec
from dtp.platforms import get_platform
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.batch import LAUNCH, BatchPlatform
from dtp.platforms.service_models import request_problems

SETTINGS = {"instance_role_arn": "arn:aws:iam::111122223333:instance-profile/ecsInstanceRole"}
NETWORK = {"SecurityGroup": "sg-0123456789abcdef0", "PrivateSubnet": "subnet-0123456789abcdef0"}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Any:
    def use(**extra: Any) -> None:
        conn = {"conn_type": "generic", "extra": {**SETTINGS, **extra}}
        monkeypatch.setenv("AIRFLOW_CONN_DTP_BATCH", json.dumps(conn))

    use()
    return use


def spec_for(**conf: Any) -> dict[str, Any]:
    params = parse_params(TrainParams, {"platform": "batch", "instance_type": "p5.48xlarge", **conf})
    return run_spec(params, "train_e2e", "manual__2026-12-02T10:00:00+00:00")


def requests(documents: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    names = ("compute-environment.json", "job-queue.json", "job-definition.json")
    environment, queue, definition = (json.loads(documents[name]) for name in names)
    return environment, queue, definition


def documents_of(environment: Any, queue: Any, definition: Any) -> dict[str, str]:
    return {
        "compute-environment.json": json.dumps(environment),
        "job-queue.json": json.dumps(queue),
        "job-definition.json": json.dumps(definition),
    }


@pytest.mark.parametrize(
    ("recipe", "instance_type", "num_nodes", "vcpus", "gpus", "efa"),
    [
        ("llama3_1_8b", "p5.48xlarge", 4, 192, "8", 32),
        ("llama3_1_70b", "p4de.24xlarge", 16, 96, "8", 4),
        ("llama3_2_1b", "g5.48xlarge", 2, 192, "8", 1),
        ("tiny", "m5.2xlarge", 2, 8, None, 0),
    ],
)
def test_shipped_recipes_render_requests_batch_accepts(
    settings, recipe, instance_type, num_nodes, vcpus, gpus, efa
) -> None:
    spec = spec_for(recipe=recipe, instance_type=instance_type, num_nodes=num_nodes)
    platform = get_platform("batch")
    documents = platform.render(spec, NETWORK)
    assert platform.check(documents) == []
    environment, queue, definition = requests(documents)
    run_key = spec["names"]["run_key"]

    assert (environment["computeEnvironmentName"], environment["type"]) == (f"{run_key}-ce", "MANAGED")
    compute = environment["computeResources"]
    assert (compute["type"], compute["minvCpus"], compute["maxvCpus"]) == ("EC2", 0, vcpus * num_nodes)
    assert compute["instanceTypes"] == [instance_type]
    assert (compute["subnets"], compute["securityGroupIds"]) == (["subnet-0123456789abcdef0"], ["sg-0123456789abcdef0"])
    assert compute["instanceRole"] == SETTINGS["instance_role_arn"]
    assert "serviceRole" not in environment and "placementGroup" not in compute
    assert environment["tags"]["dtp:run"] == compute["tags"]["dtp:run"] == run_key

    assert queue["jobQueueName"] == f"{run_key}-queue"
    assert queue["computeEnvironmentOrder"] == [{"order": 1, "computeEnvironment": f"{run_key}-ce"}]

    assert (definition["jobDefinitionName"], definition["type"]) == (f"{run_key}-train", "multinode")
    assert definition["retryStrategy"] == {"attempts": 1} and definition["propagateTags"] is True
    nodes = definition["nodeProperties"]
    assert (nodes["numNodes"], nodes["mainNode"]) == (num_nodes, 0)
    (node_range,) = nodes["nodeRangeProperties"]
    container = node_range["container"]
    assert node_range["targetNodes"] == "0:" and container["instanceType"] == instance_type
    resources = {r["type"]: r["value"] for r in container["resourceRequirements"]}
    assert resources.get("GPU") == gpus and resources["VCPU"] == str(vcpus)
    procs = spec["instance"]["accelerators_per_node"]
    programs = f"/fsx/runs/{run_key}/programs"
    assert container["command"][:4] == ["sh", "-c", LAUNCH, "torchrun"]
    assert container["command"][4:7] == ["--nproc_per_node", str(procs), f"{programs}/train.py"]
    assert container["command"][7:] == ["--config", f"/fsx/runs/{run_key}/train.json"]
    assert container["mountPoints"] == [{"sourceVolume": "fsx", "containerPath": "/fsx", "readOnly": False}]
    assert container["volumes"] == [{"name": "fsx", "host": {"sourcePath": "/fsx"}}]
    assert container["linuxParameters"]["sharedMemorySize"] > 64
    devices = container["linuxParameters"].get("devices", [])
    assert [d["hostPath"] for d in devices] == [f"/dev/infiniband/uverbs{i}" for i in range(efa)]
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert (env.get("FI_PROVIDER") == "efa") == bool(efa)
    limit = spec["training_time_limit_minutes"]
    assert limit > 0 and definition["timeout"] == {"attemptDurationSeconds": max(60, limit * 60)}


@pytest.mark.parametrize(
    ("node_env", "main"),
    [
        # Batch sets the main node's address on the other nodes only: node 0 takes its own first address.
        ({"AWS_BATCH_JOB_NODE_INDEX": "0"}, "10.0.0.5"),
        ({"AWS_BATCH_JOB_NODE_INDEX": "3", "AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS": "10.0.0.9"}, "10.0.0.9"),
    ],
)
def test_the_launch_script_finds_the_main_node_on_every_node(
    tmp_path: Path, node_env: dict[str, str], main: str
) -> None:
    """The job definition's command, run by sh as on a node, with stand-ins for torchrun and hostname."""
    for name, body in {"torchrun": 'printf "%s\\n" "$@"', "hostname": 'echo "10.0.0.5 172.17.0.1 "'}.items():
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "AWS_BATCH_JOB_NUM_NODES": "4", **node_env}
    argv = ["sh", "-c", LAUNCH, "torchrun", "--nproc_per_node", "8", "train.py", "--config", "a b.json"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.splitlines() == [
        *("--nnodes", "4", "--node_rank", node_env["AWS_BATCH_JOB_NODE_INDEX"]),
        *("--master_addr", main, "--master_port", "29500"),
        *("--nproc_per_node", "8", "train.py", "--config", "a b.json"),
    ]


def test_a_published_image_carries_the_programs(settings) -> None:
    spec = spec_for(recipe="tiny", instance_type="m5.2xlarge", num_nodes=2)
    platform = BatchPlatform()
    image = "111122223333.dkr.ecr.us-east-1.amazonaws.com/dtp/training@sha256:" + "0" * 64
    runtime = platform.runtime(image)
    assert runtime == {"source": f"image {image}", "image": image, "training_dir": "/opt/dtp/training"}
    _, _, definition = requests(platform.render(spec, NETWORK, runtime))
    container = definition["nodeProperties"]["nodeRangeProperties"][0]["container"]
    assert container["image"] == image and "/opt/dtp/training/train.py" in container["command"]
    assert platform.default_image()["image"].startswith("nvcr.io/nvidia/pytorch:")
    assert "training_dir" not in platform.default_image()


def test_optional_settings_reach_the_compute_environment(settings) -> None:
    settings(
        service_role_arn="arn:aws:iam::111122223333:role/AWSBatchServiceRole",
        launch_template_id="lt-0123456789abcdef0",
        image_uri="public.ecr.aws/example/pytorch:2.6",
        max_nodes=4,
    )
    platform = BatchPlatform()
    documents = platform.render(spec_for(num_nodes=2), NETWORK)
    assert platform.check(documents) == []
    environment, _, definition = requests(documents)
    assert environment["serviceRole"] == "arn:aws:iam::111122223333:role/AWSBatchServiceRole"
    assert environment["computeResources"]["launchTemplate"] == {
        "launchTemplateId": "lt-0123456789abcdef0",
        "version": "$Latest",
    }
    assert definition["nodeProperties"]["nodeRangeProperties"][0]["container"]["image"] == (
        "public.ecr.aws/example/pytorch:2.6"
    )
    assert platform.max_nodes() == 4


def test_check_names_what_batch_would_refuse(settings) -> None:
    platform = BatchPlatform()
    environment, queue, definition = requests(platform.render(spec_for(num_nodes=2), NETWORK))
    environment["computeEnvironmentName"] = "my compute environment"
    environment["computeResources"]["type"] = "EC3"
    environment["computeResources"]["Bogus"] = True
    queue["computeEnvironmentOrder"][0]["computeEnvironment"] = "someone-elses-ce"
    definition["type"] = "parallel"
    definition["nodeProperties"]["numNodes"] = 0
    problems = "\n".join(platform.check(documents_of(environment, queue, definition)))
    assert "CreateComputeEnvironment.computeEnvironmentName: 'my compute environment' is not a Batch name" in problems
    assert "CreateComputeEnvironment.computeResources.type: 'EC3' is not one of the allowed values" in problems
    assert 'Unknown parameter in computeResources: "Bogus"' in problems
    assert "computeEnvironmentOrder names 'someone-elses-ce', not the run's compute environment" in problems
    assert "RegisterJobDefinition.type: 'parallel' is not one of the allowed values" in problems
    assert "nodeProperties.numNodes: 0; a job needs at least 1 node" in problems


@pytest.mark.parametrize(
    ("nodes", "problem"),
    [
        ({"mainNode": 2}, "nodeProperties.mainNode: 2 is not one of the job's nodes 0..1"),
        ({"nodeRangeProperties": [{"targetNodes": "0:0"}]}, "the ranges cover nodes [0], not 0..1"),
        ({"nodeRangeProperties": [{"targetNodes": "0:"}, {"targetNodes": "1"}]}, "cover nodes [0, 1, 1], not 0..1"),
        ({"nodeRangeProperties": [{"targetNodes": "a:b"}]}, "targetNodes: not a range like '0:' or '1:3'"),
    ],
)
def test_check_refuses_node_ranges_that_do_not_cover_the_job(settings, nodes, problem) -> None:
    platform = BatchPlatform()
    environment, queue, definition = requests(platform.render(spec_for(num_nodes=2), NETWORK))
    container = definition["nodeProperties"]["nodeRangeProperties"][0]["container"]
    ranges = [{**r, "container": container} for r in nodes.pop("nodeRangeProperties", [])]
    definition["nodeProperties"] |= nodes | ({"nodeRangeProperties": ranges} if ranges else {})
    assert any(problem in p for p in platform.check(documents_of(environment, queue, definition)))


def test_hostile_extra_env_reaches_the_container_only_as_environment_values(settings) -> None:
    hostile = {
        "QUOTES": 'it\'s "quoted"',
        "SUBST": "$(rm -rf /)",
        "TICKS": "`reboot`; exit 1",
    }
    platform = BatchPlatform()
    spec = spec_for(num_nodes=2, extra_env=hostile)
    documents = platform.render(spec, NETWORK)
    assert platform.check(documents) == []
    container = requests(documents)[2]["nodeProperties"]["nodeRangeProperties"][0]["container"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    assert {name: env[name] for name in hostile} == hostile
    command = "\n".join(container["command"])
    assert container["command"][2] == LAUNCH
    for value in hostile.values():
        assert value not in command


def test_values_with_newlines_never_become_params() -> None:
    with pytest.raises(ParamsError, match="extra_env"):
        spec_for(extra_env={"EVIL": "line\nrm -rf /"})


def test_recipes_of_other_frameworks_are_refused(settings) -> None:
    with pytest.raises(PlatformNotReady, match="uses megatron-lm; on batch DTP launches its own FSDP trainer"):
        BatchPlatform().render(spec_for(recipe="llama3_1_70b_megatron", num_nodes=2), NETWORK)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"instance_role_arn": "arn:aws:iam::111122223333:role/ecsInstanceRole"}, "instance_role_arn"),
        ({"service_role_arn": "AWSBatchServiceRole"}, "service_role_arn"),
        ({"launch_template_id": "lt-1; rm -rf /"}, "launch_template_id"),
        ({"max_nodes": 0}, "max_nodes"),
        ({"instance_role": "ecsInstanceRole"}, "instance_role"),
    ],
)
def test_bad_settings_name_the_connection_and_field(settings, extra, field) -> None:
    settings(**extra)
    with pytest.raises(PlatformNotReady, match=rf"^connection 'dtp_batch' extra: {field}: "):
        BatchPlatform().max_nodes()


def test_a_missing_instance_role_and_connection_say_what_to_set(settings, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_DTP_BATCH", json.dumps({"conn_type": "generic", "extra": {}}))
    with pytest.raises(PlatformNotReady, match=r"^connection 'dtp_batch' extra: instance_role_arn: Field required"):
        BatchPlatform().max_nodes()
    monkeypatch.delenv("AIRFLOW_CONN_DTP_BATCH")
    with pytest.raises(PlatformNotReady, match=r"^connection 'dtp_batch' is not defined; it holds the account's"):
        BatchPlatform().max_nodes()


def test_the_preflight_runs_on_the_jobs_nodes_as_a_submit_batch_accepts(settings) -> None:
    spec = spec_for(recipe="llama3_1_8b", num_nodes=4)
    runtime = BatchPlatform().runtime("registry.example/dtp-training@sha256:" + "a" * 64)
    overrides = BatchPlatform().preflight_overrides(spec, runtime)
    run_dir = f"/fsx/runs/{spec['names']['run_key']}"
    (node_range,) = overrides["nodePropertyOverrides"]
    assert node_range["targetNodes"] == "0:"
    assert node_range["containerOverrides"]["command"] == [
        *("sh", "-c", LAUNCH, "torchrun", "--nproc_per_node", "8", "/opt/dtp/training/preflight.py"),
        *("--results", f"{run_dir}/preflight.json", "--max-bytes", str(spec["instance"]["busbw_at_bytes"])),
    ]
    submit = {
        "jobName": f"{spec['names']['run_key']}-preflight",
        "jobQueue": f"{spec['names']['run_key']}-queue",
        "jobDefinition": "arn:aws:batch:us-east-1:111122223333:job-definition/x:2",
        "nodeOverrides": overrides,
        "timeout": {"attemptDurationSeconds": 900},
        "tags": spec["tags"],
    }
    assert request_problems("batch", "SubmitJob", submit) == []


def test_a_retry_after_a_failed_job_submits_a_new_one(offline_aws: None) -> None:
    op = BatchJobOperator(
        task_id="run_job_on_batch",
        job_name="run-train",
        job_queue="run-queue",
        job_definition="run-train:2",
        aws_conn_id=None,
        do_xcom_push=False,
    )
    listed = {"jobQueue": "run-queue", "filters": [{"name": "JOB_NAME", "values": ["run-train"]}]}
    summaries = [
        {"jobId": "old", "jobName": "run-train", "status": "SUCCEEDED", "createdAt": 1},
        {"jobId": "newest", "jobName": "run-train", "status": "FAILED", "createdAt": 3},
        {"jobId": "other", "jobName": "run-train-preflight", "status": "RUNNING", "createdAt": 4},
    ]
    definition = {
        "jobDefinitionName": "run-train",
        "jobDefinitionArn": "arn:aws:batch:us-east-1:1:job-definition/run-train:2",
        "revision": 2,
        "status": "ACTIVE",
        "type": "multinode",
    }
    with Stubber(op.hook.client) as batch:
        batch.add_response("list_jobs", {"jobSummaryList": summaries}, listed)
        # The failed job ran under the definition's time limit: it has none, and neither does the new one.
        batch.add_response(
            "describe_job_definitions", {"jobDefinitions": [definition]}, {"jobDefinitionName": "run-train"}
        )
        batch.add_response(
            "submit_job",
            {"jobId": "fresh", "jobName": "run-train", "jobArn": "arn:aws:batch:us-east-1:1:job/fresh"},
            {
                "jobName": "run-train",
                "jobQueue": "run-queue",
                "jobDefinition": "run-train:2",
                "parameters": {},
                "tags": {},
            },
        )
        op.submit_job({})
        batch.assert_no_pending_responses()
    assert op.job_id == "fresh"


# --- BatchJobOperator: one time limit across the task's retries ------------------------------------------------------
# What Batch says of a job it stopped at its timeout (DescribeJobs/ListJobs statusReason), and of one whose
# container failed.
TIMED_OUT = "Job attempt duration exceeded timeout"
CRASHED = "Essential container in task exited"


@pytest.fixture
def batch_queue(offline_aws: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """moto's Batch in this process, without Docker: the queue ``run-queue`` and the job definition ``run-train``
    with a one-hour timeout, as a run's training job has (budget_usd). A submitted job fails at once; ``ended``
    says how long it ran and why Batch stopped it."""
    monkeypatch.setenv("MOTO_SIMPLE_BATCH_FAIL_AFTER", "0")
    with mock_aws(config={"batch": {"use_docker": False}}):
        role = boto3.client("iam").create_role(RoleName="batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        batch = boto3.client("batch")
        batch.create_compute_environment(
            computeEnvironmentName="run-ce", type="UNMANAGED", state="ENABLED", serviceRole=role
        )
        batch.create_job_queue(
            jobQueueName="run-queue",
            state="ENABLED",
            priority=1,
            computeEnvironmentOrder=[{"order": 1, "computeEnvironment": "run-ce"}],
        )
        definition = batch.register_job_definition(
            jobDefinitionName="run-train",
            type="container",
            containerProperties={"image": "dtp-training", "vcpus": 1, "memory": 512},
            timeout={"attemptDurationSeconds": 3600},
        )["jobDefinitionArn"]
        yield {"client": batch, "definition": definition}


def batch_operator(definition: str, **kwargs: Any) -> BatchJobOperator:
    return BatchJobOperator(
        task_id="run_job_on_batch",
        job_name="run-train",
        job_queue="run-queue",
        job_definition=definition,
        aws_conn_id=None,
        do_xcom_push=False,
        **kwargs,
    )


def ended(job_id: str, ran_s: int, reason: str) -> None:
    """Make the job moto ran look as one Batch stopped after ``ran_s`` seconds for ``reason``."""
    job = batch_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].get_job_by_id(job_id)
    assert job is not None and job.status == "FAILED"
    job.job_stopped_at = datetime.now()
    job.job_started_at = job.job_stopped_at - timedelta(seconds=ran_s)
    boto3.client("batch").terminate_job(jobId=job_id, reason=reason)  # moto keeps it as the job's statusReason


def submitted(batch: Any, definition: str, **kwargs: Any) -> dict[str, Any]:
    """Run a try's submit_job; the job it submitted, as DescribeJobs gives it."""
    op = batch_operator(definition, **kwargs)
    op.submit_job({})
    (job,) = batch["client"].describe_jobs(jobs=[op.job_id])["jobs"]
    return job


def failed_job_ids(batch: Any) -> list[str]:
    return [
        job["jobId"] for job in batch["client"].list_jobs(jobQueue="run-queue", jobStatus="FAILED")["jobSummaryList"]
    ]


def test_a_job_batch_stopped_at_its_timeout_is_not_submitted_again(batch_queue: dict[str, Any]) -> None:
    first = submitted(batch_queue, batch_queue["definition"])
    ended(first["jobId"], 3600, TIMED_OUT)
    with pytest.raises(BatchJobOverTime, match=r"stopped at its time limit \(Job attempt duration exceeded timeout\)"):
        batch_operator(batch_queue["definition"]).submit_job({})
    assert issubclass(BatchJobOverTime, AirflowFailException)  # the task fails without its retries
    assert failed_job_ids(batch_queue) == [first["jobId"]]  # nothing was submitted


def test_a_retry_after_another_failure_runs_for_what_is_left_of_the_time_limit(batch_queue: dict[str, Any]) -> None:
    definition = batch_queue["definition"]
    first = submitted(batch_queue, definition)
    assert "timeout" not in first  # the first job runs under the definition's: the whole hour
    ended(first["jobId"], 1000, CRASHED)
    second = submitted(batch_queue, definition)
    assert second["timeout"] == {"attemptDurationSeconds": 2600}
    ended(second["jobId"], 2000, CRASHED)
    third = submitted(batch_queue, definition)
    assert third["timeout"] == {"attemptDurationSeconds": 600}
    ended(third["jobId"], 550, CRASHED)
    # 50 s are left: less than the smallest timeout Batch takes.
    with pytest.raises(BatchJobOverTime, match=r"ran 3550 s of the 3600 s time limit, leaving less than"):
        batch_operator(definition).submit_job({})
    assert len(failed_job_ids(batch_queue)) == 3


@pytest.mark.parametrize(
    ("definition", "timeout", "expected"),
    [
        # The preflight's own limit (submit_job_timeout) is held across its retries as well.
        (None, 900, {"attemptDurationSeconds": 600}),
        # The definition named by name:revision, or by name (its newest active revision).
        ("run-train:1", None, {"attemptDurationSeconds": 3300}),
        ("run-train", None, {"attemptDurationSeconds": 3300}),
    ],
)
def test_the_time_limit_is_the_jobs_own_or_its_definitions(
    batch_queue: dict[str, Any], definition: str | None, timeout: int | None, expected: dict[str, int]
) -> None:
    definition = definition or batch_queue["definition"]
    first = submitted(batch_queue, definition, submit_job_timeout=timeout)
    ended(first["jobId"], 300, CRASHED)
    assert submitted(batch_queue, definition, submit_job_timeout=timeout)["timeout"] == expected


def test_a_job_without_a_time_limit_is_resubmitted_without_one(batch_queue: dict[str, Any]) -> None:
    definition = batch_queue["client"].register_job_definition(
        jobDefinitionName="run-preflight",
        type="container",
        containerProperties={"image": "dtp-training", "vcpus": 1, "memory": 512},
    )["jobDefinitionArn"]
    ended(submitted(batch_queue, definition)["jobId"], 5000, CRASHED)
    assert "timeout" not in submitted(batch_queue, definition)


def test_a_job_stopped_at_its_timeout_fails_the_task_without_retries(batch_queue: dict[str, Any]) -> None:
    op = batch_operator(batch_queue["definition"])
    op.submit_job({})
    ended(op.job_id, 3600, TIMED_OUT)
    # The event BatchJobTrigger fires when its waiter sees the job FAILED.
    event = {"status": "error", "message": "Waiter batch_job_complete failed", "job_id": op.job_id}
    with pytest.raises(BatchJobOverTime, match=rf"{op.job_id} \(run-train\) ran past its time limit"):
        op.execute_complete({}, event)


def test_a_job_that_failed_otherwise_fails_the_task_for_a_retry(batch_queue: dict[str, Any]) -> None:
    op = batch_operator(batch_queue["definition"])
    op.submit_job({})
    ended(op.job_id, 100, CRASHED)
    event = {"status": "error", "message": "Waiter batch_job_complete failed", "job_id": op.job_id}
    with pytest.raises(AirflowException, match="Error while running job") as failed:
        op.execute_complete({}, event)
    assert not isinstance(failed.value, AirflowFailException)


def test_a_task_that_waits_in_its_worker_fails_without_retries_too(
    batch_queue: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    op = batch_operator(batch_queue["definition"], deferrable=False)
    op.submit_job({})
    ended(op.job_id, 3600, TIMED_OUT)
    monkeypatch.setattr(op.hook, "delay", lambda *_: None)  # the provider's jittered sleeps between polls
    with pytest.raises(BatchJobOverTime, match=rf"{op.job_id} \(run-train\) ran past its time limit"):
        op.monitor_job({})
