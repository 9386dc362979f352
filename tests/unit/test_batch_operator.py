"""BatchJobOperator's retries: a retry after a failed job submits a new one, and one time limit holds across the
task's retries (a job Batch stopped at its timeout is not run again; a job run again gets what is left); the trigger
waits as long as the job may run; a failed job fails the task with Batch's reasons. Against botocore's Stubber and
moto's Batch (in this process, without Docker)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import boto3
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
from botocore.stub import Stubber
from moto import mock_aws
from moto.batch.models import batch_backends
from moto.core import DEFAULT_ACCOUNT_ID

from dtp.operators.batch import QUEUE_MARGIN_S, BatchJobOperator, BatchJobOverTime


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


def ended(job_id: str | None, ran_s: int, reason: str) -> None:
    """Make the job moto ran look as one Batch stopped after ``ran_s`` seconds for ``reason``."""
    assert job_id is not None
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
    with pytest.raises(AirflowException, match=rf"{op.job_id} \(run-train\) failed: {CRASHED}$") as failed:
        op.execute_complete({}, event)
    assert not isinstance(failed.value, AirflowFailException)


# What DescribeJobs says of a multi-node job whose second node ran out of memory: the main node's training exits 1
# when its peer goes.
OUT_OF_MEMORY = "OutOfMemoryError: Container killed due to memory usage"
NODE_PROPERTIES = {"numNodes": 2, "mainNode": 0, "nodeRangeProperties": [{"targetNodes": "0:", "container": {}}]}


def failed_node(index: int, reason: str | None, exit_code: int) -> dict[str, Any]:
    """Node ``index`` of the failed job ``job-1``, as DescribeJobs gives it."""
    container = {"exitCode": exit_code, **({"reason": reason} if reason else {})}
    return {"jobId": f"job-1#{index}", "jobName": "run-train", "status": "FAILED", "statusReason": CRASHED,
            "jobQueue": "run-queue", "jobDefinition": "run-train:2", "startedAt": 1,
            "attempts": [{"container": container}]}  # fmt: skip


def test_a_failed_job_fails_the_task_with_the_reasons_of_its_failed_nodes(offline_aws: None) -> None:
    op = batch_operator("run-train:2", deferrable=True)
    job = {**running_job("FAILED"), "statusReason": CRASHED, "nodeProperties": NODE_PROPERTIES,
           "attempts": [{"container": {"exitCode": 1}}]}  # fmt: skip
    event = {"status": "error", "message": "Waiter batch_job_complete failed", "job_id": "job-1"}
    expected = (
        rf"job-1 \(run-train\) failed: {CRASHED}; container: exit code 1; failed nodes: job-1#0: exit code 1; "
        rf"job-1#1: {OUT_OF_MEMORY}, exit code 137$"
    )
    with Stubber(op.hook.client) as batch, pytest.raises(AirflowException, match=expected):
        batch.add_response("describe_jobs", {"jobs": [job]}, {"jobs": ["job-1"]})
        batch.add_response("describe_jobs", {"jobs": [job]}, {"jobs": ["job-1"]})  # the provider's, for its log
        nodes = [failed_node(0, None, 1), failed_node(1, OUT_OF_MEMORY, 137)]
        batch.add_response("describe_jobs", {"jobs": nodes}, {"jobs": ["job-1#0", "job-1#1"]})
        op.execute_complete({}, event)


def test_a_task_that_waits_in_its_worker_fails_without_retries_too(
    batch_queue: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    op = batch_operator(batch_queue["definition"], deferrable=False)
    op.submit_job({})
    ended(op.job_id, 3600, TIMED_OUT)
    monkeypatch.setattr(op.hook, "delay", lambda *_: None)  # the provider's jittered sleeps between polls
    with pytest.raises(BatchJobOverTime, match=rf"{op.job_id} \(run-train\) ran past its time limit"):
        op.monitor_job({})


# A training job's time limit (the job definition's timeout, from training_time_limit_minutes) far past the 35 h the
# provider's BatchJobTrigger waits by default (4200 polls 30 s apart).
WEEK_S = 7 * 24 * 3600
LISTED = {"jobQueue": "run-queue", "filters": [{"name": "JOB_NAME", "values": ["run-train"]}]}


def running_job(status: str = "RUNNING") -> dict[str, Any]:
    """The job ``job-1`` as DescribeJobs gives it."""
    return {"jobId": "job-1", "jobName": "run-train", "status": status, "startedAt": 1, "jobQueue": "run-queue",
            "jobDefinition": "arn:aws:batch:us-east-1:1:job-definition/run-train:2",
            "nodeProperties": NODE_PROPERTIES}  # fmt: skip


def waits_s(deferred: TaskDeferred) -> int:
    """How long the trigger ``deferred`` carries waits before it gives up."""
    trigger: Any = deferred.trigger
    assert deferred.method_name == "execute_complete" and trigger.serialize()[1]["job_id"] == "job-1"
    return trigger.attempts * trigger.waiter_delay


def test_the_trigger_waits_as_long_as_the_job_may_run(offline_aws: None) -> None:
    op = batch_operator("run-train:2", deferrable=True, submit_job_timeout=WEEK_S)
    summary = {"jobId": "job-1", "jobName": "run-train", "status": "RUNNING", "createdAt": 1}
    with Stubber(op.hook.client) as batch, pytest.raises(TaskDeferred) as deferred:
        batch.add_response("list_jobs", {"jobSummaryList": [summary]}, LISTED)
        batch.add_response("describe_jobs", {"jobs": [running_job()]}, {"jobs": ["job-1"]})
        op.execute({})
    assert waits_s(deferred.value) >= WEEK_S + QUEUE_MARGIN_S


def test_a_job_still_waiting_for_capacity_when_the_trigger_gives_up_fails_the_task(offline_aws: None) -> None:
    op = batch_operator("run-train:2", deferrable=True, submit_job_timeout=WEEK_S)
    event = {"status": "error", "message": "Waiter error: max attempts reached", "job_id": "job-1"}
    # What Batch says of a job its compute environment cannot place.
    waiting = {**running_job("RUNNABLE"), "statusReason": "CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"}
    expected = r"job-1 \(run-train\) is still RUNNABLE \(CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY\).*max attempts"
    with Stubber(op.hook.client) as batch, pytest.raises(AirflowException, match=expected):
        batch.add_response("describe_jobs", {"jobs": [waiting]}, {"jobs": ["job-1"]})
        batch.add_response("describe_jobs", {"jobs": [waiting]}, {"jobs": ["job-1"]})  # the provider's, for its log
        op.execute_complete({}, event)


class RecordedXCom:
    """A task instance that records what is pushed to XCom."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def test_a_retry_that_finds_its_job_links_to_it(offline_aws: None) -> None:
    op = BatchJobOperator(
        task_id="run_job_on_batch", job_name="run-train", job_queue="run-queue", job_definition="run-train:2",
        aws_conn_id=None, region_name="us-east-1",
    )  # fmt: skip
    summary = {"jobId": "job-1", "jobName": "run-train", "status": "RUNNABLE", "createdAt": 1}
    ti = RecordedXCom()
    with Stubber(op.hook.client) as batch:
        batch.add_response("list_jobs", {"jobSummaryList": [summary]}, LISTED)
        op.submit_job({"ti": ti})
    assert ti.pushed["batch_job_details"] == {"region_name": "us-east-1", "aws_domain": "aws.amazon.com",
                                              "job_id": "job-1"}  # fmt: skip


def test_the_jobs_log_is_copied_into_the_tasks() -> None:
    assert batch_operator("run-train:2").awslogs_enabled


@pytest.mark.parametrize("status", ["STARTING", "RUNNING"])
def test_a_job_that_goes_on_when_the_trigger_gives_up_is_waited_on_again(offline_aws: None, status: str) -> None:
    op = batch_operator("run-train:2", deferrable=True, submit_job_timeout=WEEK_S)
    # The event BatchJobTrigger fires when its waiter runs out of attempts.
    event = {"status": "error", "message": "Waiter error: max attempts reached", "job_id": "job-1"}
    with Stubber(op.hook.client) as batch, pytest.raises(TaskDeferred) as deferred:
        batch.add_response("describe_jobs", {"jobs": [running_job(status)]}, {"jobs": ["job-1"]})
        op.execute_complete({}, event)
    assert waits_s(deferred.value) >= WEEK_S + QUEUE_MARGIN_S
