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
waiting; the clock starts again each time the job runs and is requeued. A job
pinned to nodes (``nodelist``) that is requeued (its node failed, say) while
some of them take no jobs is unpinned from those: it would otherwise wait for
them until the pending timeout (see ``_unpin_unusable_nodes``). A poll
that cannot reach the cluster (a dropped ssh connection, a restarting sshd) is
tried again on a new connection after a backoff, as the ssh provider's
``SSHRemoteJobTrigger`` does; so is one slurmctld does not answer (restarting,
say: the job is not lost for that). After ``max_reconnect_attempts`` such polls
in a row the trigger reports the cluster unreachable, leaving the job as it is.
A user who marks the deferred task failed or succeeded, or clears it, cancels
the job (``on_kill``); a trigger that merely moves to another triggerer does not.

Beside the last lines it keeps the lines that say what went wrong (a Python
exception, Slurm's, the kernel's, NCCL's and CUDA's errors), which a failed
rank's boilerplate, torchrun's some 20 lines of it, would push out of the tail.
It logs each change of the job's state and Slurm's reason, so a job waiting
for nodes says why in the task log. Each poll reads at most ``MAX_READ_BYTES``
of the log and yields to the event loop as it forwards the lines, so a trigger
that starts again (after a triggerer restart) on a day's log, which it reads
from the start, catches up over several polls without holding the triggerer.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from functools import cached_property
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from paramiko.ssh_exception import SSHException

from dtp.hooks.shared_fs import ClusterCommandError
from dtp.hooks.slurm import SlurmControllerUnreachable, SlurmHook, SlurmJob
from dtp.hostlist import compress_hostlist, expand_hostlist
from dtp.triggers.kill import task_still_deferred

# What a poll raises when the cluster is out of reach for a while; socket.timeout is an OSError. A slurmctld that
# does not answer is the same: the job goes on meanwhile.
CONNECTION_ERRORS = (SSHException, EOFError, OSError, SlurmControllerUnreachable)
# Lines of a job's log that say what went wrong: a Python exception as a traceback's last line shows it, srun's and
# slurmstepd's errors, the kernel's OOM killer, NCCL's warnings, CUDA's errors.
ERROR_LINE = re.compile(
    r"\w(?:Error|Exception): \S|srun: error|slurmstepd: error|oom_kill|(?i:out of memory)|NCCL WARN|CUDA error"
)
# The error lines an event carries (the last ones, each once) and how much of each.
MAX_ERROR_LINES = 10
MAX_ERROR_LINE_CHARS = 500
# The most of the job's log one poll reads (a line longer than this is forwarded in pieces).
MAX_READ_BYTES = 1 << 20
# Lines forwarded into the task log between two yields to the triggerer's event loop.
LINES_PER_YIELD = 500


class SlurmJobTrigger(BaseTrigger):
    """Fires once the Slurm job ends (success or failure), stops making progress, or never starts, or once the
    cluster stays out of reach (``error``).

    :param head_node: the host the Slurm connection's ssh reaches instead of its own (see ``SlurmHook``)
    :param head_node_host_keys: the host keys of ``head_node``, which its ssh checks (None, as a trigger deferred
        before DTP pinned them has: the SSH connection says how its host key is checked)
    :param pending_timeout: seconds the job may stay PENDING at a stretch before it is reported (0: no limit)
    :param max_reconnect_attempts: polls in a row that may fail to reach the cluster before the trigger gives up
    :param nodelist: the hostlist the job was pinned to when submitted (the nodes the run's preflight checked); a
        requeued job is unpinned from those of them that take no jobs ("": it was not pinned)
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
        nodelist: str = "",
        head_node_host_keys: list[str] | None = None,
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
        self.nodelist = nodelist
        self.head_node_host_keys = head_node_host_keys

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
                "nodelist": self.nodelist,
                "head_node_host_keys": self.head_node_host_keys,
            },
        )

    @cached_property
    def hook(self) -> SlurmHook:
        """The hook of the trigger's polls and of its ``on_kill``."""
        return SlurmHook(self.slurm_conn_id, self.head_node, self.head_node_host_keys or ())

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            async for event in self._follow(self.hook):
                yield event
        finally:  # here too, not only in cleanup: dag.test() runs a trigger in-process and never calls cleanup
            await asyncio.to_thread(self.hook.close)

    async def on_kill(self) -> None:
        """Cancel the job when a user marks the deferred task failed or succeeded, or clears it: it would otherwise
        hold its nodes until the run's teardown. Nothing is waited on (the triggerer gives ``on_kill`` 30 s): a
        cleared task's next try that still finds the job ending (COMPLETING) waits for it to end, then submits anew.

        The triggerer (Airflow 3.3) calls this too when the trigger moves to another triggerer (this one missed its
        heartbeats, say), where it runs on: the job is left then, the task instance still being deferred."""
        if await task_still_deferred(self):
            self.log.info(
                "The trigger moved to another triggerer, the task still waits: Slurm job %s goes on", self.job_id
            )
            return
        self.log.info("The task was killed: cancelling Slurm job %s", self.job_id)
        await asyncio.to_thread(self.hook.cancel_job, self.job_id)

    async def cleanup(self) -> None:
        """Close the ssh connection (paramiko's would live on), however the trigger ended: the triggerer calls this
        last, after ``on_kill``, whose scancel connects again once ``run`` has closed the polls' connection."""
        await asyncio.to_thread(self.hook.close)

    async def _follow(self, hook: SlurmHook) -> AsyncIterator[TriggerEvent]:
        log = JobLog(self.log_path, lambda line: self.log.info("[slurm %s] %s", self.job_id, line))
        last_progress = time.monotonic()
        unknown_since: float | None = None
        pending_since: float | None = None
        job = SlurmJob(job_id=self.job_id, name="", state="UNKNOWN")  # as the last poll found it
        logged: tuple[str, str] | None = None  # the state and reason last logged
        failures = 0  # polls in a row that could not reach the cluster
        while True:
            try:
                if await log.read(hook):
                    last_progress = time.monotonic()
                job = await asyncio.to_thread(hook.get_job, self.job_id)
                if job.finished:
                    await log.read_to_end(hook)  # what the job wrote since, and what earlier polls left unread
            except CONNECTION_ERRORS as err:
                failures += 1
                await asyncio.to_thread(hook.close)  # the next poll connects afresh
                if failures > self.max_reconnect_attempts:
                    message = (
                        f"could not reach the cluster in {failures} polls in a row ({err!r}); the job is left as it is"
                    )
                    yield self._event("error", job, log, message=message)
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
                status = "success" if job.succeeded else "failed"
                yield self._event(status, job, log, exit_code=job.exit_code, nodes=job.nodes)
                return
            if (job.state, job.reason) != logged:
                self._log_state(job)
                logged = (job.state, job.reason)
            if self.nodelist and job.state == "PENDING" and job.restarts and job.required_nodes:
                await self._unpin_unusable_nodes(hook, job)
            if job.state == "RUNNING" and time.monotonic() - last_progress > self.hang_timeout:
                yield self._event("hung", job, log, message=f"no new log line for {self.hang_timeout:.0f}s")
                return
            unknown_since = (unknown_since or time.monotonic()) if job.state == "UNKNOWN" else None
            if unknown_since is not None and time.monotonic() - unknown_since > self.lost_timeout:
                message = (
                    f"Slurm has had no record of the job for {self.lost_timeout:.0f}s: neither slurmctld nor sacct "
                    "(a job completion log, JobCompType, or slurmdbd accounting) knows it"
                )
                yield self._event("lost", job, log, message=message)
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
                unavailable = await self._unavailable_nodes(hook)
                yield self._event(
                    "pending",
                    job,
                    log,
                    reason=job.reason,
                    message=message,
                    unavailable_nodes=unavailable,
                    required_nodes=job.required_nodes,
                )
                return
            if job.state != "RUNNING":
                last_progress = time.monotonic()  # pending or requeued time is not a hang
            await asyncio.sleep(self.poll_interval)

    def _log_state(self, job: SlurmJob) -> None:
        """Log the job's state, with its nodes once it has some and Slurm's reason when it gives one."""
        nodes = f" on {job.nodes}" if job.nodes and job.nodes != "(null)" else ""
        reason = f", reason: {job.reason}" if job.reason and job.reason != "None" else ""
        self.log.info("Slurm job %s is %s%s%s", self.job_id, job.state, nodes, reason)

    async def _unpin_unusable_nodes(self, hook: SlurmHook, job: SlurmJob) -> None:
        """Unpin the requeued, pending ``job`` from those of its required nodes that take no jobs (down, drained,
        failing), which Slurm would wait for until the pending timeout: the run resumes from its checkpoint on the
        nodes it keeps and others of the partition, as a run on a cluster made for it does on a replaced node. Those
        others were not preflight-checked, which the warning says. A cluster that cannot be asked is asked again
        at the next poll."""
        try:
            dropped = await asyncio.to_thread(hook.unpin_unusable_nodes, job)
        except (*CONNECTION_ERRORS, ClusterCommandError) as err:
            self.log.warning("Could not unpin requeued Slurm job %s from nodes that take no jobs: %r", self.job_id, err)
            return
        if dropped:
            kept = [node for node in expand_hostlist(job.required_nodes) if node not in dropped]
            self.log.warning(
                "Slurm job %s was requeued, and of the nodes it was pinned to (%s) these take no jobs (down, drained "
                "or gone from the partition): %s. Unpinned it from them so that it does not wait for them: it "
                "will run on %sother nodes of the partition, which the run's preflight did not check",
                self.job_id,
                job.required_nodes,
                ", ".join(dropped),
                f"{compress_hostlist(kept)} and " if kept else "",
            )

    async def _unavailable_nodes(self, hook: SlurmHook) -> list[str]:
        """The partition's down and drained nodes with their reasons, for a job that never started; none when the
        cluster does not say (the pending timeout is reported all the same)."""
        try:
            return await asyncio.to_thread(hook.unavailable_nodes)
        except (*CONNECTION_ERRORS, ClusterCommandError) as err:
            self.log.warning("Could not list the partition's unavailable nodes: %r", err)
            return []

    @staticmethod
    def _reconnect_delay(attempt: int) -> float:
        """Exponential backoff with jitter, as ``SSHRemoteJobTrigger``'s, so reconnecting triggers spread out."""
        base = min(2 ** (attempt - 1), 30)
        return base + random.uniform(0, base)  # noqa: S311

    def _event(self, status: str, job: SlurmJob, log: JobLog, **fields: Any) -> TriggerEvent:
        """The event the task resumes with: ``status``, the job's state, its last log lines and error lines, and
        ``fields``."""
        return TriggerEvent(
            {
                "status": status,
                "job_id": self.job_id,
                "state": job.state,
                "tail": list(log.tail),
                "errors": list(log.errors),
                **fields,
            }
        )


class JobLog:
    """What a trigger has read of a job's log: how far, its last lines, and the last of its lines that look like
    errors (``ERROR_LINE``). Each line it reads goes to ``forward`` (into the task log)."""

    def __init__(self, path: str, forward: Callable[[str], None]) -> None:
        self.path = path
        self.forward = forward
        self.offset = 0
        self.partial = ""  # the unfinished last line read
        self.tail: deque[str] = deque(maxlen=30)
        self.errors: deque[str] = deque(maxlen=MAX_ERROR_LINES)

    async def read(self, hook: SlurmHook) -> bool:
        """Read up to ``MAX_READ_BYTES`` more of the log and forward its complete lines; whether there was more."""
        text, self.offset = await asyncio.to_thread(hook.read_log, self.path, self.offset, MAX_READ_BYTES)
        if not text:
            return False
        *lines, self.partial = (self.partial + text).split("\n")
        if len(self.partial) >= MAX_READ_BYTES:  # a line with no end in sight: forwarded as it is
            lines.append(self.partial)
            self.partial = ""
        for count, line in enumerate(lines, 1):
            self._forward(line)
            if count % LINES_PER_YIELD == 0:
                await asyncio.sleep(0)
        return True

    async def read_to_end(self, hook: SlurmHook) -> None:
        """Read and forward the rest of the log of a job that ended, its unfinished last line too."""
        while await self.read(hook):
            pass
        if self.partial:
            self._forward(self.partial)
            self.partial = ""

    def _forward(self, line: str) -> None:
        self.forward(line)
        self.tail.append(line)
        if ERROR_LINE.search(line) and (error := line.strip()[:MAX_ERROR_LINE_CHARS]) not in self.errors:
            self.errors.append(error)
