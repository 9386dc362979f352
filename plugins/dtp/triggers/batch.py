"""Wait in the triggerer for a run's AWS Batch compute environment and the job queue on it to be VALID."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from dtp.triggers.deadline import DeadlineTrigger


class BatchJobQueueTrigger(DeadlineTrigger):
    """Fires once the compute environment and the job queue on it are VALID (success). Batch takes a queue only on
    a VALID compute environment, so one that ``provision`` could not create yet is not waited for: once the compute
    environment is VALID the event is a success with ``provision_again``, for ``provision`` to create the queue.
    Fires failed when either is INVALID (with Batch's statusReason), the compute environment is gone, or they are
    still settling ``timeout`` seconds after ``started_at`` (epoch seconds; default: when the task deferred).

    The client is the ``aws_conn_id`` connection's, as ``BatchPlatform`` makes it: its region and endpoint (the
    local profile's emulator) included.
    """

    def __init__(
        self,
        compute_environment: str,
        job_queue: str,
        aws_conn_id: str = "aws_default",
        poll_interval: float = 10.0,
        timeout: float = 1800.0,
        started_at: float | None = None,
    ) -> None:
        super().__init__(poll_interval=poll_interval, timeout=timeout, started_at=started_at)
        self.compute_environment = compute_environment
        self.job_queue = job_queue
        self.aws_conn_id = aws_conn_id

    def serialize_fields(self) -> dict[str, Any]:
        return {
            "compute_environment": self.compute_environment,
            "job_queue": self.job_queue,
            "aws_conn_id": self.aws_conn_id,
        }

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from dtp.platforms.batch import BatchPlatform, describe

        platform = BatchPlatform(aws_conn_id=self.aws_conn_id)
        client = await asyncio.to_thread(lambda: platform.client)  # it reads connections: off the loop
        names = {"compute environment": self.compute_environment, "job queue": self.job_queue}
        while True:
            found = {
                what: await self.poll(describe, client, what.replace(" ", "_"), name) for what, name in names.items()
            }
            statuses = {what: items[0]["status"] if items else "missing" for what, items in found.items()}
            invalid = [
                f"{what} {names[what]} is INVALID: {items[0].get('statusReason')}"
                for what, items in found.items()
                if statuses[what] == "INVALID"
            ]
            if invalid or statuses["compute environment"] == "missing":
                why = "; ".join(invalid) or f"compute environment {self.compute_environment} does not exist"
                yield TriggerEvent({"status": "failed", "message": f"Batch {why}"})
                return
            if statuses["compute environment"] == "VALID" and statuses["job queue"] in ("VALID", "missing"):
                yield TriggerEvent(self._ready_event(statuses["job queue"] == "missing"))
                return
            progress = ", ".join(f"{what} {names[what]} is {status}" for what, status in statuses.items())
            if self.past_deadline:
                message = f"Batch {progress} after {self.timeout:.0f} s"
                yield TriggerEvent({"status": "failed", "message": message})
                return
            self.log.info("Batch %s", progress)
            await asyncio.sleep(self.poll_interval)

    def _ready_event(self, queue_missing: bool) -> dict[str, Any]:
        if queue_missing:
            message = f"Batch compute environment {self.compute_environment} is VALID; job queue {self.job_queue} "
            return {"status": "success", "message": message + "is yet to be created on it", "provision_again": True}
        message = f"Batch compute environment {self.compute_environment} and job queue {self.job_queue} are VALID"
        return {"status": "success", "message": message}
