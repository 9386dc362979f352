"""Run an AWS Batch job once per name: the provider's ``BatchOperator``, idempotent across retries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.providers.amazon.aws.operators.batch import BatchOperator


class BatchJobOperator(BatchOperator):
    """
    Submit an AWS Batch job unless the queue holds one of that name already, then wait as ``BatchOperator`` does.

    A retry (or a cleared task) finds the job its first try submitted: it waits on it again while it is active,
    and returns at once when it succeeded. Only after a failure is a new job submitted, so the new one resumes
    from the newest checkpoint. Takes ``BatchOperator``'s parameters; ``submit_job_timeout`` is templated too,
    so a prepared job can carry its own time limit.
    """

    template_fields: Sequence[str] = (*BatchOperator.template_fields, "submit_job_timeout")

    def submit_job(self, context: Any) -> None:
        job = self.newest_job()
        if job is None or job["status"] == self.hook.FAILURE_STATE:
            super().submit_job(context)
            return
        self.job_id = job["jobId"]
        self.log.info("AWS Batch job %s (%s) is %s: not submitting another", self.job_id, self.job_name, job["status"])

    def newest_job(self) -> dict[str, Any] | None:
        """The queue's newest job named ``job_name``, in any state (None when it has none)."""
        client: Any = self.hook.client  # typed as the provider's BatchProtocol, which declares no paginators
        pages = client.get_paginator("list_jobs").paginate(
            jobQueue=self.job_queue, filters=[{"name": "JOB_NAME", "values": [self.job_name]}]
        )
        jobs = [job for page in pages for job in page["jobSummaryList"] if job["jobName"] == self.job_name]
        return max(jobs, key=lambda job: job["createdAt"], default=None)
