"""deploy_cluster on Batch: provision creates what is missing and the task waits in the triggerer until the compute
environment and the job queue on it are VALID, creating the queue once the compute environment is; Batch's
statusReason fails the task (the Batch requests: test_batch_requests.py)."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred
from batch_support import NETWORK, spec_for, use_settings

from dtp.operators import cluster as cluster_operator
from dtp.operators.cluster import DeployClusterOperator
from dtp.platforms.batch import BatchPlatform
from dtp.triggers.batch import BatchJobQueueTrigger


class FakeBatch:
    """Batch's compute environments, job queues and job definitions, as DTP asks for them; a test sets their
    statuses. Like Batch, it takes a job queue only on a VALID compute environment."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, dict[str, Any]]] = {"computeEnvironment": {}, "jobQueue": {}}
        self.definitions: list[dict[str, Any]] = []
        self.calls: list[str] = []

    def set(self, key: str, name: str, status: str, reason: str = "") -> None:
        self.items[key][name].update(status=status, statusReason=reason)

    def _describe(self, key: str, names: list[str]) -> dict[str, list[dict[str, Any]]]:
        return {f"{key}s": [dict(item) for name, item in self.items[key].items() if name in names]}

    def describe_compute_environments(self, computeEnvironments: list[str]) -> dict[str, Any]:
        return self._describe("computeEnvironment", computeEnvironments)

    def describe_job_queues(self, jobQueues: list[str]) -> dict[str, Any]:
        return self._describe("jobQueue", jobQueues)

    def _create(self, key: str, request: dict[str, Any]) -> None:
        name = request[f"{key}Name"]
        self.calls.append(f"create {name}")
        self.items[key][name] = {f"{key}Name": name, "state": "ENABLED", "status": "CREATING"}

    def create_compute_environment(self, **request: Any) -> None:
        self._create("computeEnvironment", request)

    def create_job_queue(self, **request: Any) -> None:
        (order,) = request["computeEnvironmentOrder"]
        assert self.items["computeEnvironment"][order["computeEnvironment"]]["status"] == "VALID"
        self._create("jobQueue", request)

    def update_compute_environment(self, computeEnvironment: str, state: str) -> None:
        self.calls.append(f"{state.lower()} {computeEnvironment}")
        self.items["computeEnvironment"][computeEnvironment].update(state=state, status="UPDATING")

    def update_job_queue(self, jobQueue: str, state: str) -> None:
        self.calls.append(f"{state.lower()} {jobQueue}")
        self.items["jobQueue"][jobQueue].update(state=state, status="UPDATING")

    def get_paginator(self, operation: str) -> Any:
        assert operation == "describe_job_definitions"
        definitions = self.definitions

        class Pages:
            def paginate(self, jobDefinitionName: str, status: str) -> list[dict[str, Any]]:
                return [{"jobDefinitions": [d for d in definitions if d["jobDefinitionName"] == jobDefinitionName]}]

        return Pages()

    def register_job_definition(self, **definition: Any) -> dict[str, str]:
        self.calls.append(f"register {definition['jobDefinitionName']}")
        arn = f"arn:aws:batch:us-east-1:111122223333:job-definition/{definition['jobDefinitionName']}:1"
        self.definitions.append({**definition, "revision": 1, "jobDefinitionArn": arn})
        return {"jobDefinitionArn": arn}


@pytest.fixture
def batch(monkeypatch: pytest.MonkeyPatch) -> FakeBatch:
    """The fake Batch behind every BatchPlatform, deploy_cluster's and the trigger's."""
    use_settings(monkeypatch)
    fake = FakeBatch()
    monkeypatch.setattr(BatchPlatform, "client", property(lambda _: fake))
    monkeypatch.setattr(cluster_operator, "get_platform", lambda name: BatchPlatform(poll_seconds=0.01))
    return fake


@pytest.fixture
def operator() -> DeployClusterOperator:
    spec = spec_for(recipe="tiny", instance_type="m5.2xlarge", num_nodes=1)
    return DeployClusterOperator(task_id="deploy_cluster", spec=spec, network=NETWORK)


def deferred_by(call: Any, *args: Any, **kwargs: Any) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as deferred:
        call(*args, **kwargs)
    assert isinstance(deferred.value.trigger, BatchJobQueueTrigger)
    assert deferred.value.method_name == "execute_complete"
    return deferred.value


def test_the_task_waits_in_the_triggerer_and_creates_the_queue_once_the_compute_environment_is_valid(
    batch: FakeBatch, operator: DeployClusterOperator, first_event: Any
) -> None:
    run_key = operator.spec["names"]["run_key"]
    environment, queue = f"{run_key}-ce", f"{run_key}-queue"
    deferred = deferred_by(operator.execute, {})
    # Batch takes no queue on a compute environment still being created: the queue waits for the next provision.
    assert batch.calls == [f"create {environment}", f"register {run_key}-train"]
    trigger = deferred.trigger
    assert (trigger.compute_environment, trigger.job_queue, trigger.timeout) == (environment, queue, 30 * 60)
    cluster = (deferred.kwargs or {})["cluster"]

    batch.set("computeEnvironment", environment, "VALID")
    event = first_event(trigger)
    assert event == {
        "status": "success",
        "message": f"Batch compute environment {environment} is VALID; job queue {queue} is yet to be created on it",
        "provision_again": True,
    }
    deferred = deferred_by(operator.execute_complete, {}, event, cluster)
    assert batch.calls[2:] == [f"create {queue}"]  # the job definition's revision is reused
    assert (deferred.kwargs or {})["cluster"] == cluster

    batch.set("jobQueue", queue, "VALID")
    event = first_event(deferred.trigger)
    assert event["message"] == f"Batch compute environment {environment} and job queue {queue} are VALID"
    assert operator.execute_complete({}, event, cluster) == cluster
    assert cluster["job_queue"] == queue and cluster["compute_environment"] == environment

    # A retried task finds everything and defers again; the trigger fires at once.
    deferred = deferred_by(operator.execute, {})
    assert batch.calls[3:] == [] and (deferred.kwargs or {})["cluster"] == cluster
    assert first_event(deferred.trigger)["status"] == "success"


def test_a_half_finished_teardowns_disabled_compute_environment_and_queue_are_enabled_again(
    batch: FakeBatch, operator: DeployClusterOperator, first_event: Any
) -> None:
    """The queue is enabled while the compute environment is still UPDATING: the trigger then sees both VALID."""
    run_key = operator.spec["names"]["run_key"]
    environment, queue = f"{run_key}-ce", f"{run_key}-queue"
    for key, name in (("computeEnvironment", environment), ("jobQueue", queue)):
        batch.items[key][name] = {f"{key}Name": name, "state": "DISABLED", "status": "VALID"}
    deferred = deferred_by(operator.execute, {})
    assert batch.calls == [f"enabled {environment}", f"enabled {queue}", f"register {run_key}-train"]
    batch.set("computeEnvironment", environment, "VALID")
    batch.set("jobQueue", queue, "VALID")
    assert first_event(deferred.trigger)["message"].endswith("are VALID")


@pytest.mark.parametrize("key", ["computeEnvironment", "jobQueue"])
def test_an_invalid_compute_environment_or_queue_fails_the_task_with_batchs_reason(
    batch: FakeBatch, operator: DeployClusterOperator, first_event: Any, key: str
) -> None:
    run_key = operator.spec["names"]["run_key"]
    deferred = deferred_by(operator.execute, {})
    batch.set("computeEnvironment", f"{run_key}-ce", "VALID")
    if key == "jobQueue":
        deferred = deferred_by(operator.execute_complete, {}, first_event(deferred.trigger), **(deferred.kwargs or {}))
    name = f"{run_key}-ce" if key == "computeEnvironment" else f"{run_key}-queue"
    batch.set(key, name, "INVALID", "CLIENT_ERROR - not authorized to perform: iam:PassRole")
    event = first_event(deferred.trigger)
    what = "compute environment" if key == "computeEnvironment" else "job queue"
    message = f"Batch {what} {name} is INVALID: CLIENT_ERROR - not authorized to perform: iam:PassRole"
    assert event == {"status": "failed", "message": message}
    with pytest.raises(AirflowException, match=r"^Batch .* is INVALID: CLIENT_ERROR"):
        operator.execute_complete({}, event, **(deferred.kwargs or {}))


def test_the_trigger_gives_up_at_its_deadline_and_on_a_missing_compute_environment(
    batch: FakeBatch, first_event: Any
) -> None:
    trigger = BatchJobQueueTrigger("run-ce", "run-queue", poll_interval=0.01, timeout=3600)
    assert first_event(trigger) == {"status": "failed", "message": "Batch compute environment run-ce does not exist"}
    batch.create_compute_environment(computeEnvironmentName="run-ce")
    late = BatchJobQueueTrigger("run-ce", "run-queue", poll_interval=0.01, timeout=60, started_at=0)
    assert first_event(late) == {
        "status": "failed",
        "message": "Batch compute environment run-ce is CREATING, job queue run-queue is missing after 60 s",
    }


def test_the_trigger_serializes_its_arguments_and_deadline() -> None:
    trigger = BatchJobQueueTrigger("run-ce", "run-queue", aws_conn_id="aws_other", timeout=60, started_at=5.0)
    path, kwargs = trigger.serialize()
    assert path == "dtp.triggers.batch.BatchJobQueueTrigger"
    assert kwargs == {
        "compute_environment": "run-ce",
        "job_queue": "run-queue",
        "aws_conn_id": "aws_other",
        "poll_interval": 10.0,
        "timeout": 60,
        "started_at": 5.0,
    }
    assert BatchJobQueueTrigger(**kwargs).serialize() == (path, kwargs)
