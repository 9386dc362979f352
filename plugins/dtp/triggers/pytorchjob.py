"""Wait for a Kubeflow PyTorchJob on EKS in the triggerer, streaming its first worker's log into the task log.

Like ``EksPodTrigger``, the trigger generates its own kubeconfig from the AWS connection (the operator's is gone
once it defers) and keeps it for the whole wait. Each poll it forwards the new log lines of worker 0 (torchrun's
rank 0) and reads the job's conditions. A job with no new log line for ``hang_timeout`` seconds while Running is
reported as hung, so a stuck collective fails the task instead of waiting forever. While the job is not Running
(the training operator says Running only once its pods run), each poll logs how its pods stand as that changes (a
container waiting for its image, a pod no node has room for); a job whose container cannot start is reported at
once, and one not Running for ``pending_timeout`` seconds at a stretch is reported with its pods' reasons, instead
of using up its deadline waiting. A failed job is reported with why its pods failed. A poll the Kubernetes API fails
for a while (429, a 5xx from the API server or a kubelet, a lost connection) is tried again at the next one; a log
read that fails is skipped. A user who marks the task failed or succeeded or clears it while it waits suspends the
job (``on_kill``): its pods go, and the task's next try replaces it with what is left of its deadline. A trigger that
merely moves to another triggerer leaves the job as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from functools import cached_property
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from dtp.hooks.pytorchjob import (
    CANNOT_START_REASONS,
    PyTorchJobHook,
    is_leader,
    job_state,
    past_deadline,
    pod_failure,
    pod_status,
    restarted,
    suspended,
    waiting_reasons,
)
from dtp.triggers.kill import task_still_deferred

TAIL_LINES = 30
# The most of worker 0's log a trigger's first read takes, from its container's start: a trigger that starts on a long
# log (again, after a triggerer restart, or on the job of a retried task's earlier try) forwards its first so many
# bytes, then what worker 0 logs from then on.
MAX_FIRST_READ_BYTES = 1 << 20
# Seconds each later read of worker 0's log reaches back beyond the previous read that answered: the kubelet counts
# ``sinceSeconds`` back from when it gets the request, and the previous read's answer took a while to come.
LOG_WINDOW_MARGIN = 60


def transient(err: Exception) -> bool:
    """Whether a later call may succeed where this one failed: the API server or a kubelet answered 429 or 5xx, or
    the connection failed (urllib3's errors, socket errors)."""
    if isinstance(err, ApiException):
        return err.status == 429 or (err.status or 0) >= 500
    return isinstance(err, HTTPError | OSError)


class PyTorchJobTrigger(BaseTrigger):
    """Fires once the PyTorchJob succeeds, fails, disappears, is suspended or hangs, once it cannot start or has not
    started in time (``not_started``), or once the Kubernetes API fails ``max_poll_failures`` polls in a row
    (``error``: the job is left as it is); the event of a job that failed at its
    ``runPolicy.activeDeadlineSeconds`` says so (``over_time``), so that the task is not retried. Its ``pods`` say
    how the pods of a job that did not start stand, or why those of a failed job failed; ``previous_tail`` holds the
    last lines of worker 0's container before its restart, when a failed job's worker 0 restarted.

    :param job_name: the PyTorchJob
    :param namespace: its namespace
    :param cluster_name: the EKS cluster it runs on
    :param aws_conn_id: the AWS connection with access to the cluster
    :param region_name: the cluster's region (default: the connection's)
    :param poll_interval: seconds between polls
    :param hang_timeout: seconds without a new log line while Running before the job counts as hung (0: never)
    :param pending_timeout: seconds the job may be not Running at a stretch (its pods unscheduled, their images
        pulling) before it counts as not started (0: no limit)
    :param last_log_time: the timestamp of the last log line already forwarded: older lines are skipped. The
        trigger advances it as it forwards, but Airflow keeps a trigger's arguments as they were when the task
        deferred, so a restarted triggerer forwards worker 0's log again from there
    :param max_poll_failures: polls in a row the Kubernetes API may fail (``transient`` errors) before the trigger
        gives up
    """

    def __init__(
        self,
        job_name: str,
        namespace: str,
        cluster_name: str,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        poll_interval: float = 30.0,
        hang_timeout: float = 0.0,
        pending_timeout: float = 3600.0,
        last_log_time: str = "",
        max_poll_failures: int = 10,
    ) -> None:
        super().__init__()
        self.job_name = job_name
        self.namespace = namespace
        self.cluster_name = cluster_name
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.poll_interval = poll_interval
        self.hang_timeout = hang_timeout
        self.pending_timeout = pending_timeout
        self.last_log_time = last_log_time
        self.max_poll_failures = max_poll_failures
        self._last_progress = 0.0  # when worker 0 last logged a line (time.monotonic)
        self._waiting_since: float | None = None  # since when the job has not been Running (None: it is)
        self._log_read_at: float | None = None  # when the last read of worker 0's log that answered was sent
        self._pods: dict[str, str] = {}  # how each pod stood at the last poll that read them (pod_status)
        self._served = False  # whether the current kubeconfig has served a poll

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_name": self.job_name,
                "namespace": self.namespace,
                "cluster_name": self.cluster_name,
                "aws_conn_id": self.aws_conn_id,
                "region_name": self.region_name,
                "poll_interval": self.poll_interval,
                "hang_timeout": self.hang_timeout,
                "pending_timeout": self.pending_timeout,
                "last_log_time": self.last_log_time,
                "max_poll_failures": self.max_poll_failures,
            },
        )

    @cached_property
    def hook(self) -> PyTorchJobHook:
        return PyTorchJobHook(self.cluster_name, self.namespace, self.aws_conn_id, self.region_name)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._last_progress = self._waiting_since = time.monotonic()
        while True:
            # The kubeconfig carries the connection's credentials as they were when it was written. When the API
            # refuses them (temporary credentials expiring during a long run), write a new one and go on waiting;
            # a refusal before the new one served a single poll is not a matter of expiry, and fails the trigger.
            self._served = False
            # Writing the kubeconfig calls EKS and reads the connection: in a thread, off the triggerer's loop.
            with contextlib.ExitStack() as stack:
                kubernetes = await asyncio.to_thread(stack.enter_context, self.hook.kubernetes())
                try:
                    event = await self._wait(kubernetes, tail)
                except ApiException as err:
                    if err.status != 401 or not self._served:
                        raise
                    self.log.info("The Kubernetes API refused the kubeconfig's credentials: renewing them")
                    continue
            yield event
            return

    async def _wait(self, kubernetes: Any, tail: deque[str]) -> TriggerEvent:
        state, failures = "Pending", 0  # the job's state as the last poll found it; polls failed in a row since
        while True:
            try:
                job = await asyncio.to_thread(self.hook.get_job, kubernetes, self.job_name)
            except (ApiException, HTTPError, OSError) as err:
                if not transient(err):
                    raise
                failures += 1
                if failures > self.max_poll_failures:
                    what = f"{err.status} {err.reason}" if isinstance(err, ApiException) else repr(err)
                    message = f"the Kubernetes API failed {failures} polls in a row ({what}); the job is left as it is"
                    return self._event("error", state, message, tail)
                self.log.warning(
                    "Could not read PyTorchJob %s (%d/%d): %s", self.job_name, failures, self.max_poll_failures, err
                )
                await asyncio.sleep(self.poll_interval)
                continue
            self._served, failures = True, 0
            if job is None:
                return self._event("failed", "Deleted", "the job was deleted before it finished", tail)
            state, message = job_state(job)
            try:
                if await asyncio.to_thread(self._forward_log, kubernetes, tail):
                    self._last_progress = time.monotonic()
            except (ApiException, HTTPError, OSError) as err:
                if not transient(err):
                    raise
                self.log.warning("Could not read worker 0's log, skipping it this poll: %s", err)
                self._last_progress = time.monotonic()  # time its log cannot be read is not a hang
            if state == "Succeeded":
                return self._event("success", state, message, tail)
            if state == "Failed":
                pods, previous_tail = await asyncio.to_thread(self._failure_report, kubernetes)
                return self._event(
                    "failed", state, message, tail, over_time=past_deadline(job), pods=pods, previous_tail=previous_tail
                )
            if suspended(job):  # by the on_kill of the trigger this one replaced, say: its pods are going
                return self._event("failed", "Suspended", "the job was suspended: a retry replaces it", tail)
            if state != "Running":
                self._last_progress = time.monotonic()  # pending or restarting time is not a hang
                if self._waiting_since is None:
                    self._waiting_since = time.monotonic()
                if event := await self._check_pods(kubernetes, state, self._waiting_since, tail):
                    return event
            else:
                self._waiting_since = None
                if self.hang_timeout and time.monotonic() - self._last_progress > self.hang_timeout:
                    return self._event("hung", state, f"no new log line for {self.hang_timeout:.0f} s", tail)
            self.log.info("PyTorchJob %s/%s is %s", self.namespace, self.job_name, state)
            await asyncio.sleep(self.poll_interval)

    async def _check_pods(
        self, kubernetes: Any, state: str, waiting_since: float, tail: deque[str]
    ) -> TriggerEvent | None:
        """Read how the pods of the job, not Running, stand, logging each change; the event of a job that cannot
        start (a container waits for a reason no wait mends, such as an image that cannot be pulled) or that has not
        been Running for ``pending_timeout`` seconds, None while it may yet start."""
        try:
            cannot_start = await asyncio.to_thread(self._read_pods, kubernetes)
        except (ApiException, HTTPError, OSError) as err:
            if not transient(err):
                raise
            self.log.warning("Could not read the job's pods, skipping them this poll: %s", err)
            cannot_start = {}
        if cannot_start:
            reasons = ", ".join(sorted(set().union(*cannot_start.values())))
            pods = [f"{name}: {self._pods[name]}" for name in cannot_start]
            return self._event("not_started", state, f"a container cannot start ({reasons})", tail, pods=pods)
        if self.pending_timeout and time.monotonic() - waiting_since > self.pending_timeout:
            pods = [f"{name}: {status}" for name, status in self._pods.items()] or ["(the job has no pods)"]
            message = f"not Running within {self.pending_timeout:.0f} s, still {state}"
            return self._event("not_started", state, message, tail, pods=pods)
        return None

    def _read_pods(self, kubernetes: Any) -> dict[str, set[str]]:
        """Read how the job's pods stand, logging each pod whose status changed since the last read; the pods with a
        container that cannot start, and its reasons (``CANNOT_START_REASONS``)."""
        pods = self.hook.job_pods(kubernetes, self.job_name)
        unscheduled = [pod.metadata.name for pod in pods if not (pod.spec and pod.spec.node_name)]
        try:
            why_unscheduled = self.hook.scheduling_failures(kubernetes, unscheduled) if unscheduled else {}
        except ApiException as err:
            if err.status != 403:
                raise
            self.log.warning(
                "May not list events in %s, so the scheduler's reasons are unknown: %s", self.namespace, err
            )
            why_unscheduled = {}
        statuses = {pod.metadata.name: pod_status(pod, why_unscheduled) for pod in pods}
        for name, status in statuses.items():
            if self._pods.get(name) != status:
                self.log.info("Pod %s/%s: %s", self.namespace, name, status)
        self._pods = statuses
        cannot_start = {pod.metadata.name: waiting_reasons(pod) & set(CANNOT_START_REASONS) for pod in pods}
        return {name: reasons for name, reasons in cannot_start.items() if reasons}

    def _failure_report(self, kubernetes: Any) -> tuple[list[str], list[str]]:
        """Why the failed job's pods failed (``pod_failure``), and the last lines of worker 0's container before its
        restart where it restarted; nothing where the pods cannot be read (the job's failure is reported all the
        same)."""
        try:
            pods = self.hook.job_pods(kubernetes, self.job_name)
            leader = next((pod for pod in pods if is_leader(pod) and restarted(pod)), None)
            previous = (
                self.hook.log_lines(kubernetes, leader.metadata.name, previous=True, tail_lines=TAIL_LINES)
                if leader
                else []
            )
        except (ApiException, HTTPError, OSError) as err:
            self.log.warning("Could not read the failed job's pods: %s", err)
            return [], []
        return [failure for pod in pods if (failure := pod_failure(pod))], [line.partition(" ")[2] for line in previous]

    async def on_kill(self) -> None:
        """Suspend the job when a user clears the deferred task or marks it failed or succeeded: the training
        operator deletes its pods, and the job stays, recording how long it was active, so that the task's next try
        replaces it with what is left of its deadline. Nothing is waited on (the triggerer gives ``on_kill`` 30 s).

        The triggerer (Airflow 3.3) calls this too when the trigger moves to another triggerer (this one missed its
        heartbeats, say), where it runs on: the job is left then, the task instance still being deferred."""
        if await task_still_deferred(self):
            self.log.info(
                "The trigger moved to another triggerer, the task still waits: PyTorchJob %s goes on", self.job_name
            )
            return
        self.log.info("The task was killed: suspending PyTorchJob %s/%s", self.namespace, self.job_name)
        await asyncio.to_thread(self._suspend_job)

    def _suspend_job(self) -> None:
        with self.hook.kubernetes() as kubernetes:
            self.hook.suspend_unless_ended(kubernetes, self.job_name)

    def _forward_log(self, kubernetes: Any, tail: deque[str]) -> bool:
        """Log worker 0's lines newer than ``last_log_time``; True when there were any.

        The first read takes the log from its start (``MAX_FIRST_READ_BYTES`` of it at most); each later one what was
        logged since the previous read that answered, however many polls ago that was, and ``LOG_WINDOW_MARGIN``
        seconds more. Lines already forwarded are skipped by time."""
        pod = self.hook.leader_pod(kubernetes, self.job_name)
        if pod is None:
            return False
        read_at = time.monotonic()
        if self._log_read_at is None:
            lines = self.hook.log_lines(kubernetes, pod, limit_bytes=MAX_FIRST_READ_BYTES)
        else:
            lines = self.hook.log_lines(kubernetes, pod, math.ceil(read_at - self._log_read_at) + LOG_WINDOW_MARGIN)
        self._log_read_at = read_at
        forwarded = False
        for line in lines:
            stamp, _, text = line.partition(" ")
            if _sortable(stamp) <= _sortable(self.last_log_time):
                continue
            self.log.info("[%s] %s", pod, text)
            tail.append(text)
            self.last_log_time, forwarded = stamp, True
        return forwarded

    def _event(
        self,
        status: str,
        state: str,
        message: str,
        tail: deque[str],
        *,
        over_time: bool = False,
        pods: list[str] | None = None,
        previous_tail: list[str] | None = None,
    ) -> TriggerEvent:
        """The event the task resumes with; ``over_time``: the job failed because it ran past its deadline; ``pods``:
        how its pods stand or why they failed; ``previous_tail``: worker 0's last lines before its restart."""
        return TriggerEvent(
            {
                "status": status,
                "job_name": self.job_name,
                "namespace": self.namespace,
                "state": state,
                "message": message,
                "over_time": over_time,
                "tail": list(tail),
                "pods": pods or [],
                "previous_tail": previous_tail or [],
            }
        )


def _sortable(stamp: str) -> str:
    """An RFC 3339 timestamp as Kubernetes writes it (UTC, trailing zeros of the fraction dropped) padded to
    nanoseconds, so that text order is time order; "" sorts first."""
    if not stamp:
        return ""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return f"{whole}.{fraction.ljust(9, '0')}"
