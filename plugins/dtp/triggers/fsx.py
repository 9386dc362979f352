"""Wait for an FSx for Lustre data repository task in the triggerer, logging its progress."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from dtp.hooks.fsx import TERMINAL_TASK_STATES, FsxHook
from dtp.triggers.deadline import DeadlineTrigger
from dtp.triggers.kill import task_still_deferred


def task_outcome(task: dict[str, Any]) -> dict[str, Any]:
    """A task's end state, counts and report, as the trigger's event carries them."""
    status = task.get("Status", {})
    return {
        "task_id": task["TaskId"],
        "lifecycle": task["Lifecycle"],
        "total": status.get("TotalCount", 0),
        "succeeded": status.get("SucceededCount", 0),
        "failed": status.get("FailedCount", 0),
        "released_bytes": status.get("ReleasedCapacity", 0),
        "failure": task.get("FailureDetails", {}).get("Message", ""),
        "report_path": task.get("Report", {}).get("Path", ""),
    }


class FsxDataRepositoryTaskTrigger(DeadlineTrigger):
    """Fires once the data repository task ends (SUCCEEDED, FAILED or CANCELED), is gone, or is still running
    ``timeout`` seconds after ``started_at`` (epoch seconds; default: when the task deferred). A user who marks
    the waiting task failed or succeeded, or clears it, cancels the FSx task (``on_kill``); a trigger that merely
    moves to another triggerer does not."""

    def __init__(
        self,
        repository_task_id: str,
        aws_conn_id: str | None = "aws_default",
        poll_interval: float = 30.0,
        timeout: float = 12 * 3600.0,
        started_at: float | None = None,
    ) -> None:
        super().__init__(poll_interval=poll_interval, timeout=timeout, started_at=started_at)
        self.repository_task_id = repository_task_id
        self.aws_conn_id = aws_conn_id

    def serialize_fields(self) -> dict[str, Any]:
        return {"repository_task_id": self.repository_task_id, "aws_conn_id": self.aws_conn_id}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = FsxHook(aws_conn_id=self.aws_conn_id)
        while True:
            task = await self.poll(hook.get_data_repository_task, self.repository_task_id)
            if task is None:
                gone = {"TaskId": self.repository_task_id, "Lifecycle": "GONE"}
                failure = {"failure": "FSx no longer knows the task (deleted with its file system?)"}
                yield TriggerEvent({"status": "failed", **task_outcome(gone), **failure})
                return
            outcome = task_outcome(task)
            if task["Lifecycle"] in TERMINAL_TASK_STATES:
                yield TriggerEvent({"status": "success" if task["Lifecycle"] == "SUCCEEDED" else "failed", **outcome})
                return
            if self.past_deadline:
                failure = {"failure": f"still {task['Lifecycle']} after {self.timeout:.0f} s; left running"}
                yield TriggerEvent({"status": "failed", **outcome, **failure})
                return
            self.log.info(
                "FSx task %s %s: %d of %d files done, %d failed",
                self.repository_task_id,
                task["Lifecycle"],
                outcome["succeeded"],
                outcome["total"],
                outcome["failed"],
            )
            await asyncio.sleep(self.poll_interval)

    async def on_kill(self) -> None:
        """Cancel the FSx task when a user marks the deferred task failed or succeeded, or clears it.

        The triggerer (Airflow 3.3) calls this too when the trigger moves to another triggerer (this one missed its
        heartbeats, say), where it runs on: the FSx task is left then, the task instance still being deferred."""
        if await task_still_deferred(self):
            self.log.info(
                "The trigger moved to another triggerer, the task still waits: FSx task %s goes on",
                self.repository_task_id,
            )
            return
        self.log.info("The task was killed: cancelling FSx task %s", self.repository_task_id)
        hook = FsxHook(aws_conn_id=self.aws_conn_id)
        await asyncio.to_thread(hook.cancel_data_repository_task, self.repository_task_id)
