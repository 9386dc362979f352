"""Run a Kubeflow PyTorchJob on EKS and wait for it without holding a worker slot.

The Kubernetes clients are imported when the task runs, not when a DAG that holds the operator is parsed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import yaml
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from dtp.operators.masking import ExtraEnvMaskingMixin
from dtp.operators.time_limit import time_left

if TYPE_CHECKING:
    import jinja2

    from dtp.hooks.pytorchjob import PyTorchJobHook


# The shortest deadline worth a new job: less is no time to schedule its pods and resume from a checkpoint.
MIN_DEADLINE_S = 60


class PyTorchJobFailed(AirflowException):
    """The PyTorchJob failed, was deleted while it ran, hung, or did not start."""


class PyTorchJobOverTime(AirflowFailException):
    """The PyTorchJob ran past its deadline, or earlier jobs of its name used it up; a retry would run past it
    again, so the task is not retried."""


class EksPyTorchJobOperator(ExtraEnvMaskingMixin, BaseOperator):
    """
    Create a PyTorchJob on an EKS cluster, defer to ``PyTorchJobTrigger``, fail with its last log lines.

    Idempotent: a retry (or a cleared task) finds the job its first try created and waits on it again, or returns
    at once when it already succeeded. A job that failed, or that hung and was suspended, is deleted and created
    afresh, so the new pods resume from the newest checkpoint, with only what is left of the manifest's
    ``runPolicy.activeDeadlineSeconds`` once the old job's active time is counted; a job of the same name made
    from another manifest is refused.
    A job that ran past its deadline is not created again: the task fails without retries (``PyTorchJobOverTime``),
    as it does when less than a minute of the deadline is left.
    A job that does not start is suspended, and the task fails with its pods' reasons: at once when a container
    cannot start (an image that cannot be pulled: a wrong image never heals, but a registry that refused pulls for a
    while may serve a retry's fresh job), else once it has not been Running for ``pending_timeout`` seconds (pods no
    node has room for), rather than once its deadline, which counts while its pods wait, has passed.

    :param manifest: the PyTorchJob, as YAML text or a mapping (its namespace is the job's namespace)
    :param cluster_name: the EKS cluster
    :param aws_conn_id: the AWS connection with an access entry on the cluster
    :param region_name: the cluster's region (default: the connection's)
    :param poll_interval: seconds between the trigger's polls
    :param hang_timeout: seconds without a new log line from worker 0 while Running before the job is suspended
        as hung (0: never): its pods go, and the job stays to say how long it was active
    :param pending_timeout: seconds the job may be not Running at a stretch (before its pods run, or while they are
        replaced) before it is suspended as not started (0: no limit)
    :param delete_timeout: seconds to wait for a deleted job's pods to go
    """

    template_fields: Sequence[str] = ("manifest", "cluster_name", "hang_timeout", "pending_timeout")

    def __init__(
        self,
        *,
        manifest: str | dict[str, Any],
        cluster_name: str,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        poll_interval: float = 30.0,
        hang_timeout: float | str = 0.0,
        pending_timeout: float | str = 3600.0,
        delete_timeout: float = 600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.manifest = manifest
        self.cluster_name = cluster_name
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.poll_interval = poll_interval
        self.hang_timeout = hang_timeout
        self.pending_timeout = pending_timeout
        self.delete_timeout = delete_timeout

    def render_template_fields(self, context: Any, jinja_env: jinja2.Environment | None = None) -> None:
        """Render the templated fields, the run's ``extra_env`` values masked (``ExtraEnvMaskingMixin``), and keep a
        mapping manifest as YAML text, which the masker reads whole: it stops five levels into a mapping, above the
        containers' env lists."""
        super().render_template_fields(context, jinja_env)
        if isinstance(self.manifest, dict):
            self.manifest = yaml.safe_dump(self.manifest, sort_keys=False)

    @cached_property
    def job(self) -> dict[str, Any]:
        """The rendered manifest as a mapping (parsed once)."""
        job = yaml.safe_load(self.manifest) if isinstance(self.manifest, str) else self.manifest
        metadata = job.get("metadata") if isinstance(job, dict) else None
        if not isinstance(metadata, dict) or not metadata.get("name") or not metadata.get("namespace"):
            raise ValueError("manifest: expected one PyTorchJob mapping with metadata.name and metadata.namespace")
        return job

    @cached_property
    def hook(self) -> PyTorchJobHook:
        from dtp.hooks.pytorchjob import PyTorchJobHook

        namespace = self.job["metadata"]["namespace"]
        return PyTorchJobHook(self.cluster_name, namespace, self.aws_conn_id, self.region_name)

    def execute(self, context: Any) -> dict[str, Any] | None:
        from dtp.hooks.pytorchjob import job_state, past_deadline, suspended
        from dtp.triggers.pytorchjob import PyTorchJobTrigger

        manifest = self.job
        name, namespace, hook = manifest["metadata"]["name"], manifest["metadata"]["namespace"], self.hook
        with hook.kubernetes() as kubernetes:
            job = hook.ensure_job(kubernetes, manifest)
            state, message = job_state(job)
            was_suspended = state != "Succeeded" and suspended(job)
            if state == "Failed" or was_suspended:
                if state == "Failed" and past_deadline(job):
                    raise PyTorchJobOverTime(
                        f"PyTorchJob {namespace}/{name} was stopped at its deadline ({message}); not running it again"
                    )
                deadline = self._deadline_left(job)
                why = "was suspended" if was_suspended else f"failed before ({message})"
                self.log.info("PyTorchJob %s/%s %s: running it afresh", namespace, name, why)
                hook.delete_job(kubernetes, name, timeout=self.delete_timeout)
                state, _ = job_state(hook.ensure_job(kubernetes, manifest, deadline))
        if state == "Succeeded":
            self.log.info("PyTorchJob %s/%s already succeeded: reusing it, not running it again", namespace, name)
            return {"job_name": name, "namespace": namespace, "state": state}
        self.defer(
            trigger=PyTorchJobTrigger(
                job_name=name,
                namespace=namespace,
                cluster_name=self.cluster_name,
                aws_conn_id=self.aws_conn_id,
                region_name=self.region_name,
                poll_interval=self.poll_interval,
                hang_timeout=float(self.hang_timeout),
                pending_timeout=float(self.pending_timeout),
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        name, namespace = event["job_name"], event["namespace"]
        tail = "\n".join(event["tail"][-20:]) or "(no log lines from worker 0)"
        pods = "".join(f"\n  {pod}" for pod in event.get("pods", []))
        if previous := event.get("previous_tail"):
            tail += "\nWorker 0's container before its restart, last lines:\n" + "\n".join(previous[-20:])
        if event["status"] == "hung":
            raise PyTorchJobFailed(
                f"PyTorchJob {namespace}/{name} hung ({event['message']}); {self._suspend(name)}. Last lines:\n{tail}"
            )
        if event["status"] == "not_started":
            from dtp.hooks.pytorchjob import CANNOT_START_REASONS, gang_wait

            # A container that cannot start is in a placed pod; pods not Running in time may be the gang's.
            placed = any(reason in event["message"] for reason in CANNOT_START_REASONS)
            why = "; ".join(filter(None, (event["message"], None if placed else gang_wait(self.job))))
            raise PyTorchJobFailed(
                f"PyTorchJob {namespace}/{name} did not start ({why}); {self._suspend(name)}. Its pods:{pods}"
            )
        if event["status"] == "error":  # the API out of reach: the job may well be running, a retry re-attaches
            raise PyTorchJobFailed(
                f"PyTorchJob {namespace}/{name}, last seen {event['state']}: {event['message']}. Last lines:\n{tail}"
            )
        if event["status"] == "failed" and event.get("over_time"):
            raise PyTorchJobOverTime(
                f"PyTorchJob {namespace}/{name} ran past its deadline and was stopped ({event['message']}); not "
                f"retried.{_failed_pods(pods)}Last lines:\n{tail}"
            )
        if event["status"] != "success":
            raise PyTorchJobFailed(
                f"PyTorchJob {namespace}/{name} ended {event['state']}: {event['message']}.{_failed_pods(pods)}"
                f"Last lines:\n{tail}"
            )
        self.log.info("PyTorchJob %s/%s succeeded", namespace, name)
        return {"job_name": name, "namespace": namespace, "state": event["state"]}

    def _suspend(self, name: str) -> str:
        """Suspend a hung job or one that did not start, recording how long it was active; say what became of it."""
        with self.hook.kubernetes() as kubernetes:
            state = self.hook.suspend_unless_ended(kubernetes, name)
        if state is None:
            return "it is gone"
        if state != "Suspended":
            return f"it has {state.lower()} since; a retry takes it as it is"
        return "suspended it (its pods are deleted; a retry replaces it with what is left of its deadline)"

    def _deadline_left(self, failed: dict[str, Any]) -> int | None:
        """The deadline of the job that replaces ``failed`` (or a suspended job): its own deadline (what was left
        of the time limit when it was created) less the time it was active, so that a retried task's job gets what
        is left, not the whole limit again; None where it had no deadline."""
        from dtp.hooks.pytorchjob import deadline_seconds, ran_seconds

        return time_left(
            deadline_seconds(failed),
            math.ceil(ran_seconds(failed)),
            MIN_DEADLINE_S,
            unit="s",
            used_by=f"PyTorchJob {failed['metadata']['name']} was active",
            over_time=PyTorchJobOverTime,
            limit_name="left of its deadline",
            refused="not creating another",
        )

    def on_kill(self) -> None:
        """Delete the job when the task is killed while it is still creating it (the trigger handles the wait)."""
        with self.hook.kubernetes() as kubernetes:
            self.hook.delete_job(kubernetes, self.job["metadata"]["name"], timeout=self.delete_timeout)


def _failed_pods(pods: str) -> str:
    """What goes between a failed job's message and its last lines: its failed pods, one a line, where it has any."""
    return f" Failed pods:{pods}\n" if pods else " "
