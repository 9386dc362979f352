"""Run an AWS Batch job once per name: the provider's ``BatchOperator``, idempotent across retries and held to one
time limit across them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from airflow.providers.amazon.aws.links.batch import BatchJobDetailsLink
from airflow.providers.amazon.aws.operators.batch import BatchOperator
from airflow.providers.amazon.aws.triggers.batch import BatchJobTrigger
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from dtp.operators.masking import ExtraEnvMaskingMixin
from dtp.operators.time_limit import time_left

# The statusReason Batch gives a job it stopped at its timeout: "Job attempt duration exceeded timeout".
TIMEOUT_REASON = "attempt duration exceeded timeout"
# The smallest attemptDurationSeconds Batch takes.
MIN_TIMEOUT_S = 60
# How long the trigger waits on a job beyond its time limit, for the job's wait in its queue (its time limit counts
# from RUNNING). A job still running when the trigger gives up is waited on again (``execute_complete``).
QUEUE_MARGIN_S = 3600
# A job in these is running within its own time limit, which Batch enforces: one the trigger gave up on is waited on.
RUNNING_STATES = ("STARTING", "RUNNING")
# A job in these has not started: one the trigger gave up on is still waiting for capacity (its statusReason says why).
WAITING_STATES = ("SUBMITTED", "PENDING", "RUNNABLE")
# The most job IDs one DescribeJobs call takes.
DESCRIBE_JOBS_MAX = 100


class BatchJobOverTime(AirflowFailException):
    """The Batch job ran past its time limit, or earlier jobs of its name used it up; a retry would run past it
    again, so the task is not retried."""


def timed_out(job: dict[str, Any]) -> bool:
    """Whether Batch stopped ``job`` (a ListJobs summary or a DescribeJobs detail) at its timeout."""
    reasons = [job.get("statusReason"), *(attempt.get("statusReason") for attempt in job.get("attempts") or [])]
    return job.get("status") == "FAILED" and any(TIMEOUT_REASON in (reason or "").lower() for reason in reasons)


def container_outcome(job: dict[str, Any]) -> str:
    """What the container of ``job``'s last attempt ended with: Batch's reason and its exit code ("" when there is
    no attempt: a job that never ran)."""
    attempts = job.get("attempts") or []
    container = (attempts[-1].get("container") if attempts else None) or {}
    outcome = [container["reason"]] if container.get("reason") else []
    if container.get("exitCode") is not None:
        outcome.append(f"exit code {container['exitCode']}")
    return ", ".join(outcome)


def ran_seconds(job: dict[str, Any]) -> float:
    """How long ``job`` ran: from RUNNING (``startedAt``) to its end (``stoppedAt``); 0 for a job that never ran."""
    started, stopped = job.get("startedAt"), job.get("stoppedAt")
    return max(0.0, (stopped - started) / 1000) if started and stopped else 0.0


class BatchJobOperator(ExtraEnvMaskingMixin, BatchOperator):
    """
    Submit an AWS Batch job unless the queue holds one of that name already, then wait as ``BatchOperator`` does.

    A retry (or a cleared task) finds the job its first try submitted: it waits on it again while it is active,
    and returns at once when it succeeded. Only after a failure is a new job submitted, so the new one resumes
    from the newest checkpoint, and it may run only what is left of the time limit (``submit_job_timeout``, else
    the job definition's timeout) once the earlier jobs of its name are counted. A job that Batch stopped at its
    timeout is not submitted again: the task fails without retries (``BatchJobOverTime``), as it does when less
    than Batch's smallest timeout is left. Deferred, the trigger waits as long as the job may run plus
    ``QUEUE_MARGIN_S`` (the provider's ``max_retries`` polls ``poll_interval`` apart, where that is longer); a job
    still running when it gives up is waited on again, one still waiting for capacity fails the task. A failed job
    fails the task with Batch's reasons: the job's statusReason, its container's reason and exit code (each failed
    node's, for a multi-node job). Takes ``BatchOperator``'s parameters; ``submit_job_timeout`` is templated too, so a
    prepared job can carry its own time limit.

    :param awslogs_enabled: copy the job's CloudWatch log into the task's log (on by default: its last lines say
        why a job failed; a multi-node job's main node's)
    """

    template_fields: Sequence[str] = (*BatchOperator.template_fields, "submit_job_timeout")

    def __init__(self, *, awslogs_enabled: bool = True, **kwargs: Any) -> None:
        super().__init__(awslogs_enabled=awslogs_enabled, **kwargs)

    def submit_job(self, context: Any) -> None:
        jobs = self.jobs()
        job = jobs[-1] if jobs else None
        if job is not None and job["status"] != self.hook.FAILURE_STATE:
            self.job_id = job["jobId"]
            self.log.info(
                "AWS Batch job %s (%s) is %s (%s): not submitting another",
                self.job_id,
                self.job_name,
                job["status"],
                job.get("statusReason") or "no statusReason",
            )
            BatchJobDetailsLink.persist(
                context=context,
                operator=self,
                region_name=self.hook.conn_region_name,
                aws_partition=self.hook.conn_partition,
                job_id=self.job_id,
            )
        else:
            if job is not None:
                if timed_out(job):
                    raise BatchJobOverTime(
                        f"AWS Batch job {job['jobId']} ({self.job_name}) was stopped at its time limit "
                        f"({job.get('statusReason')}); not submitting it again"
                    )
                self.submit_job_timeout = self._time_left(jobs)
            super().submit_job(context)
        if self.deferrable:
            self._cover_time_limit()

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> str:
        job = None
        if event and event.get("status") != "success" and event.get("job_id"):
            job = self._describe(event["job_id"])
            if job and job["status"] in RUNNING_STATES:
                # The trigger gave up (its waiter's attempts ran out) on a job that runs on: wait on it again. One
                # still waiting for capacity after all that fails the task (the teardown terminates it).
                self.log.warning(
                    "AWS Batch job %s (%s) is still %s (%s): waiting on it again",
                    job["jobId"],
                    self.job_name,
                    job["status"],
                    event.get("message"),
                )
                self._cover_time_limit()
                self.defer(
                    timeout=self.execution_timeout,
                    trigger=BatchJobTrigger(
                        job_id=job["jobId"],
                        waiter_max_attempts=self.max_retries,
                        aws_conn_id=self.aws_conn_id,
                        region_name=self.region_name,
                        waiter_delay=self.poll_interval,
                        verify=self.verify,
                        botocore_config=self.botocore_config,
                    ),
                    method_name="execute_complete",
                )
            self._fail_if_timed_out(job)
        try:
            # The provider's copies the job's log and persists its CloudWatch link, then fails with the event alone.
            return super().execute_complete(context, event)
        except AirflowException:
            if job is None or (why := self._why_failed(job, (event or {}).get("message"))) is None:
                raise
            raise AirflowException(why) from None

    def monitor_job(self, context: Any) -> None:
        try:
            super().monitor_job(context)
        except AirflowException:
            job = self._describe(self.job_id) if self.job_id else None
            self._fail_if_timed_out(job)
            if job is None or (why := self._why_failed(job)) is None:
                raise
            raise AirflowException(why) from None

    def jobs(self) -> list[dict[str, Any]]:
        """The queue's jobs named ``job_name``, in any state, oldest first."""
        client: Any = self.hook.client  # typed as the provider's BatchProtocol, which declares no paginators
        pages = client.get_paginator("list_jobs").paginate(
            jobQueue=self.job_queue, filters=[{"name": "JOB_NAME", "values": [self.job_name]}]
        )
        jobs = [job for page in pages for job in page["jobSummaryList"] if job["jobName"] == self.job_name]
        return sorted(jobs, key=lambda job: job["createdAt"])

    def time_limit(self) -> int:
        """The new job's time limit in seconds: ``submit_job_timeout``, else the job definition's (0: none)."""
        if self.submit_job_timeout:
            return int(self.submit_job_timeout)
        client: Any = self.hook.client
        identifier = str(self.job_definition)
        if identifier.startswith("arn:"):
            definitions = client.describe_job_definitions(jobDefinitions=[identifier])["jobDefinitions"]
        else:  # name:revision or name (its newest active revision)
            name, _, revision = identifier.partition(":")
            pages = client.get_paginator("describe_job_definitions").paginate(jobDefinitionName=name)
            found = [d for page in pages for d in page["jobDefinitions"] if d["jobDefinitionName"] == name]
            if revision:
                definitions = [d for d in found if str(d["revision"]) == revision]
            else:
                definitions = sorted((d for d in found if d.get("status") == "ACTIVE"), key=lambda d: d["revision"])
        if not definitions:
            raise AirflowException(f"AWS Batch job definition {identifier} does not exist")
        return int((definitions[-1].get("timeout") or {}).get("attemptDurationSeconds") or 0)

    def _time_left(self, jobs: list[dict[str, Any]]) -> int | None:
        """The timeout of a new job: the time limit less what the earlier jobs of this name ran (a retried task's
        job gets what is left, not the whole limit again); None where there is no limit."""
        return time_left(
            self.time_limit(),
            math.ceil(sum(ran_seconds(job) for job in jobs)),
            MIN_TIMEOUT_S,
            unit="s",
            used_by=f"earlier AWS Batch jobs named {self.job_name} ran",
            over_time=BatchJobOverTime,
            minimum_name="Batch's smallest timeout",
        )

    def _cover_time_limit(self) -> None:
        """Make the trigger wait as long as the job may run and wait in its queue: ``max_retries`` polls
        ``poll_interval`` apart cover its time limit plus ``QUEUE_MARGIN_S`` (the provider's default, 4200 polls 30 s
        apart, is 35 h)."""
        limit = self.time_limit()
        needed = math.ceil((limit + QUEUE_MARGIN_S) / max(self.poll_interval, 1))
        if limit and needed > self.max_retries:
            self.max_retries = needed

    def _describe(self, job_id: str) -> dict[str, Any] | None:
        """The job as DescribeJobs gives it; None when Batch no longer knows it."""
        found = self.hook.client.describe_jobs(jobs=[job_id])["jobs"]
        return found[0] if found else None

    def _why_failed(self, job: dict[str, Any], waiter_message: str | None = None) -> str | None:
        """Why ``job`` fails the task, as Batch says it: a failed job's statusReason and container outcome (each
        failed node's, for a multi-node job), or why a job the wait gave up on has not started (``waiter_message``:
        the trigger's); None for a job in another state."""
        name = f"AWS Batch job {job['jobId']} ({self.job_name})"
        reason = job.get("statusReason") or "no statusReason"
        if job["status"] in WAITING_STATES:
            self.log.warning("%s is still %s: %s", name, job["status"], reason)
            gave_up = f": {waiter_message}" if waiter_message else ""
            return f"{name} is still {job['status']} ({reason}) when the wait for it ran out{gave_up}"
        if job["status"] != self.hook.FAILURE_STATE:
            return None
        why = f"{name} failed: {reason}"
        if outcome := container_outcome(job):
            why += f"; container: {outcome}"
        if failed_nodes := self._failed_nodes(job):
            why += "; failed nodes: " + "; ".join(failed_nodes)
        return why

    def _failed_nodes(self, job: dict[str, Any]) -> list[str]:
        """``jobId#N: outcome`` of each failed node of a multi-node ``job`` (none for a single-node job)."""
        count = (job.get("nodeProperties") or {}).get("numNodes") or 0
        node_ids = [f"{job['jobId']}#{index}" for index in range(count)]
        nodes = [
            node
            for start in range(0, count, DESCRIBE_JOBS_MAX)
            for node in self.hook.client.describe_jobs(jobs=node_ids[start : start + DESCRIBE_JOBS_MAX])["jobs"]
        ]
        return [
            f"{node['jobId']}: {container_outcome(node) or node.get('statusReason') or 'no statusReason'}"
            for node in sorted(nodes, key=lambda node: int(node["jobId"].rpartition("#")[2]))
            if node["status"] == self.hook.FAILURE_STATE
        ]

    def _fail_if_timed_out(self, job: dict[str, Any] | None) -> None:
        if job and timed_out(job):
            raise BatchJobOverTime(
                f"AWS Batch job {job['jobId']} ({self.job_name}) ran past its time limit and was stopped by Batch "
                f"({job.get('statusReason')}); not retried"
            )
