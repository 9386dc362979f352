"""Wait for a Slurm job in the triggerer, streaming its log into the task log.

The trigger holds no worker slot. Each poll it forwards new lines of the job's
output file (the triggerer's log lines appear in the task's log in the UI) and
checks the job's state. If no new line arrives for ``hang_timeout`` seconds
while the job runs, it reports a hang with the last lines, so a stuck
collective fails the task instead of waiting forever. A job Slurm has no record
of for ``lost_timeout`` seconds (slurmctld forgot it, and the cluster keeps no
completion log or accounting) is reported lost rather than waited on forever. A
job that stays PENDING for ``pending_timeout`` seconds (nodes down, a request
the partition cannot meet) is reported with Slurm's reason for keeping it
waiting; the clock starts again each time the job runs and is requeued. A poll
that cannot reach the cluster (a dropped ssh connection, a restarting sshd) is
tried again on a new connection after a backoff, as the ssh provider's
``SSHRemoteJobTrigger`` does; so is one slurmctld does not answer (restarting,
say: the job is not lost for that). After ``max_reconnect_attempts`` such polls
in a row the trigger reports the cluster unreachable, leaving the job as it is.
A user who marks the deferred task failed or succeeded, or clears it, cancels
the job (``on_kill``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from functools import cached_property
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from paramiko.ssh_exception import SSHException

from dtp.hooks.slurm import SlurmControllerUnreachable, SlurmHook, SlurmJob

# What a poll raises when the cluster is out of reach for a while; socket.timeout is an OSError. A slurmctld that
# does not answer is the same: the job goes on meanwhile.
CONNECTION_ERRORS = (SSHException, EOFError, OSError, SlurmControllerUnreachable)


class SlurmJobTrigger(BaseTrigger):
    """Fires once the Slurm job ends (success or failure), stops making progress, or never starts, or once the
    cluster stays out of reach (``error``).

    :param head_node: the host the Slurm connection's ssh reaches instead of its own (see ``SlurmHook``)
    :param pending_timeout: seconds the job may stay PENDING at a stretch before it is reported (0: no limit)
    :param max_reconnect_attempts: polls in a row that may fail to reach the cluster before the trigger gives up
    """

    def __init__(
        self,
        job_id: str,
        log_path: str,
        slurm_conn_id: str = SlurmHook.default_conn_name,
        poll_interval: float = 5.0,
        hang_timeout: float = 600.0,
        head_node: str | None = None,
        lost_timeout: float = 300.0,
        pending_timeout: float = 3600.0,
        # Serialized by earlier versions (always 0): the triggerer rebuilds a trigger deferred then from its stored
        # kwargs, and an unknown one would fail it, and the task. Ignored: reading starts at 0 anyway.
        log_offset: int = 0,
        max_reconnect_attempts: int = 10,
    ) -> None:
        super().__init__()
        self.job_id = job_id
        self.log_path = log_path
        self.slurm_conn_id = slurm_conn_id
        self.poll_interval = poll_interval
        self.hang_timeout = hang_timeout
        self.head_node = head_node
        self.lost_timeout = lost_timeout
        self.pending_timeout = pending_timeout
        self.max_reconnect_attempts = max_reconnect_attempts

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "log_path": self.log_path,
                "slurm_conn_id": self.slurm_conn_id,
                "poll_interval": self.poll_interval,
                "hang_timeout": self.hang_timeout,
                "head_node": self.head_node,
                "lost_timeout": self.lost_timeout,
                "pending_timeout": self.pending_timeout,
                "max_reconnect_attempts": self.max_reconnect_attempts,
            },
        )

    @cached_property
    def hook(self) -> SlurmHook:
        """The hook of the trigger's polls and of its ``on_kill``."""
        return SlurmHook(self.slurm_conn_id, self.head_node)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            async for event in self._follow(self.hook):
                yield event
        finally:  # here too, not only in cleanup: dag.test() runs a trigger in-process and never calls cleanup
            await asyncio.to_thread(self.hook.close)

    async def on_kill(self) -> None:
        """Cancel the job when a user marks the deferred task failed or succeeded, or clears it (Airflow 3.3+ calls
        this for user kills only, not when the triggerer stops): it would otherwise hold its nodes until the run's
        teardown. Nothing is waited on (the triggerer gives ``on_kill`` 30 s): a cleared task's next try that still
        finds the job ending (COMPLETING) waits for it to end, then submits anew."""
        self.log.info("The task was killed: cancelling Slurm job %s", self.job_id)
        await asyncio.to_thread(self.hook.cancel_job, self.job_id)

    async def cleanup(self) -> None:
        """Close the ssh connection (paramiko's would live on), however the trigger ended: the triggerer calls this
        last, after ``on_kill``, whose scancel connects again once ``run`` has closed the polls' connection."""
        await asyncio.to_thread(self.hook.close)

    async def _follow(self, hook: SlurmHook) -> AsyncIterator[TriggerEvent]:
        tail: deque[str] = deque(maxlen=30)
        offset, partial = 0, ""
        last_progress = time.monotonic()
        unknown_since: float | None = None
        pending_since: float | None = None
        job = SlurmJob(job_id=self.job_id, name="", state="UNKNOWN")  # as the last poll found it
        failures = 0  # polls in a row that could not reach the cluster
        while True:
            try:
                text, offset = await asyncio.to_thread(hook.read_file, self.log_path, offset)
                if text:
                    partial = self._forward(partial + text, tail)
                    last_progress = time.monotonic()
                job = await asyncio.to_thread(hook.get_job, self.job_id)
                if job.finished:
                    # What the job wrote between that read and its end.
                    text, offset = await asyncio.to_thread(hook.read_file, self.log_path, offset)
            except CONNECTION_ERRORS as err:
                failures += 1
                await asyncio.to_thread(hook.close)  # the next poll connects afresh
                if failures > self.max_reconnect_attempts:
                    message = (
                        f"could not reach the cluster in {failures} polls in a row ({err!r}); the job is left as it is"
                    )
                    yield self._event("error", job, tail, message=message)
                    return
                delay = self._reconnect_delay(failures)
                self.log.warning(
                    "Could not reach the cluster (%d/%d), trying again in %.1f s: %r",
                    failures,
                    self.max_reconnect_attempts,
                    delay,
                    err,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            if job.finished:
                partial = self._forward(partial + text, tail)
                if partial:
                    tail.append(partial)
                    self.log.info("[slurm %s] %s", self.job_id, partial)
                yield self._event("success" if job.succeeded else "failed", job, tail, exit_code=job.exit_code)
                return
            if job.state == "RUNNING" and time.monotonic() - last_progress > self.hang_timeout:
                yield self._event("hung", job, tail, message=f"no new log line for {self.hang_timeout:.0f}s")
                return
            unknown_since = (unknown_since or time.monotonic()) if job.state == "UNKNOWN" else None
            if unknown_since is not None and time.monotonic() - unknown_since > self.lost_timeout:
                message = (
                    f"Slurm has had no record of the job for {self.lost_timeout:.0f}s: neither slurmctld nor sacct "
                    "(a job completion log, JobCompType, or slurmdbd accounting) knows it"
                )
                yield self._event("lost", job, tail, message=message)
                return
            pending_since = (pending_since or time.monotonic()) if job.state == "PENDING" else None
            if (
                pending_since is not None
                and self.pending_timeout
                and time.monotonic() - pending_since > self.pending_timeout
            ):
                message = (
                    f"Slurm has not started it in {self.pending_timeout:.0f}s: still {job.state}, "
                    f"reason {job.reason or '(none given)'}"
                )
                yield self._event("pending", job, tail, reason=job.reason, message=message)
                return
            if job.state != "RUNNING":
                last_progress = time.monotonic()  # pending or requeued time is not a hang
            await asyncio.sleep(self.poll_interval)

    @staticmethod
    def _reconnect_delay(attempt: int) -> float:
        """Exponential backoff with jitter, as ``SSHRemoteJobTrigger``'s, so reconnecting triggers spread out."""
        base = min(2 ** (attempt - 1), 30)
        return base + random.uniform(0, base)  # noqa: S311

    def _event(self, status: str, job: SlurmJob, tail: deque[str], **fields: str) -> TriggerEvent:
        """The event the task resumes with: ``status``, the job's state, its last log lines, and ``fields``."""
        return TriggerEvent({"status": status, "job_id": self.job_id, "state": job.state, "tail": list(tail), **fields})

    def _forward(self, text: str, tail: deque[str]) -> str:
        """Log ``text``'s complete lines into the task log and ``tail``; the unfinished last line, to prepend next."""
        *lines, partial = text.split("\n")
        for line in lines:
            self.log.info("[slurm %s] %s", self.job_id, line)
            tail.append(line)
        return partial
