"""Wait for a Kubeflow PyTorchJob on EKS in the triggerer, streaming its first worker's log into the task log.

Like ``EksPodTrigger``, the trigger generates its own kubeconfig from the AWS connection (the operator's is gone
once it defers) and keeps it for the whole wait. Each poll it forwards the new log lines of worker 0 (torchrun's
rank 0) and reads the job's conditions. A job with no new log line for ``hang_timeout`` seconds while Running is
reported as hung, so a stuck collective fails the task instead of waiting forever. A poll the Kubernetes API fails
for a while (429, a 5xx from the API server or a kubelet, a lost connection) is tried again at the next one; a log
read that fails is skipped. A user who marks the task failed or succeeded or clears it while it waits suspends the
job (``on_kill``): its pods go, and the task's next try replaces it with what is left of its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from functools import cached_property
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from dtp.hooks.pytorchjob import (
    TERMINAL_CONDITIONS,
    PyTorchJobHook,
    job_state,
    past_deadline,
    suspended,
)

TAIL_LINES = 30


def transient(err: Exception) -> bool:
    """Whether a later call may succeed where this one failed: the API server or a kubelet answered 429 or 5xx, or
    the connection failed (urllib3's errors, socket errors)."""
    if isinstance(err, ApiException):
        return err.status == 429 or (err.status or 0) >= 500
    return isinstance(err, HTTPError | OSError)


class PyTorchJobTrigger(BaseTrigger):
    """Fires once the PyTorchJob succeeds, fails, disappears, is suspended or hangs, or once the Kubernetes API fails
    ``max_poll_failures`` polls in a row (``error``: the job is left as it is); the event of a job that failed at its
    ``runPolicy.activeDeadlineSeconds`` says so (``over_time``), so that the task is not retried.

    :param job_name: the PyTorchJob
    :param namespace: its namespace
    :param cluster_name: the EKS cluster it runs on
    :param aws_conn_id: the AWS connection with access to the cluster
    :param region_name: the cluster's region (default: the connection's)
    :param poll_interval: seconds between polls
    :param hang_timeout: seconds without a new log line while Running before the job counts as hung (0: never)
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
        self.last_log_time = last_log_time
        self.max_poll_failures = max_poll_failures
        self._last_progress = 0.0  # when worker 0 last logged a line (time.monotonic)
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
                "last_log_time": self.last_log_time,
                "max_poll_failures": self.max_poll_failures,
            },
        )

    @cached_property
    def hook(self) -> PyTorchJobHook:
        return PyTorchJobHook(self.cluster_name, self.namespace, self.aws_conn_id, self.region_name)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._last_progress = time.monotonic()
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
            if state in TERMINAL_CONDITIONS:
                status = "success" if state == "Succeeded" else "failed"
                return self._event(status, state, message, tail, over_time=past_deadline(job))
            if suspended(job):  # by the on_kill of the trigger this one replaced, say: its pods are going
                return self._event("failed", "Suspended", "the job was suspended: a retry replaces it", tail)
            if state != "Running":
                self._last_progress = time.monotonic()  # pending or restarting time is not a hang
            elif self.hang_timeout and time.monotonic() - self._last_progress > self.hang_timeout:
                return self._event("hung", state, f"no new log line for {self.hang_timeout:.0f} s", tail)
            self.log.info("PyTorchJob %s/%s is %s", self.namespace, self.job_name, state)
            await asyncio.sleep(self.poll_interval)

    async def on_kill(self) -> None:
        """Suspend the job when a user clears the deferred task or marks it failed or succeeded (Airflow 3.3+ calls
        this for user kills only): the training operator deletes its pods, and the job stays, recording how long it
        was active, so that the task's next try replaces it with what is left of its deadline. Nothing is waited on
        (the triggerer gives ``on_kill`` 30 s)."""
        await asyncio.to_thread(self._suspend_job)

    def _suspend_job(self) -> None:
        with self.hook.kubernetes() as kubernetes:
            self.hook.suspend_unless_ended(kubernetes, self.job_name)

    def _forward_log(self, kubernetes: Any, tail: deque[str]) -> bool:
        """Log worker 0's lines newer than ``last_log_time``; True when there were any."""
        pod = self.hook.leader_pod(kubernetes, self.job_name)
        if pod is None:
            return False
        # Ask for a window a little longer than the poll interval; lines already forwarded are skipped by time.
        since = int(self.poll_interval * 3 + 60) if self.last_log_time else None
        forwarded = False
        for line in self.hook.log_lines(kubernetes, pod, since):
            stamp, _, text = line.partition(" ")
            if _sortable(stamp) <= _sortable(self.last_log_time):
                continue
            self.log.info("[%s] %s", pod, text)
            tail.append(text)
            self.last_log_time, forwarded = stamp, True
        return forwarded

    def _event(
        self, status: str, state: str, message: str, tail: deque[str], *, over_time: bool = False
    ) -> TriggerEvent:
        """The event the task resumes with; ``over_time``: the job failed because it ran past its deadline."""
        return TriggerEvent(
            {
                "status": status,
                "job_name": self.job_name,
                "namespace": self.namespace,
                "state": state,
                "message": message,
                "over_time": over_time,
                "tail": list(tail),
            }
        )


def _sortable(stamp: str) -> str:
    """An RFC 3339 timestamp as Kubernetes writes it (UTC, trailing zeros of the fraction dropped) padded to
    nanoseconds, so that text order is time order; "" sorts first."""
    if not stamp:
        return ""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return f"{whole}.{fraction.ljust(9, '0')}"
