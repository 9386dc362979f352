"""AWS Batch multi-node parallel jobs: one compute environment, job queue and job definition per run.

``provision`` creates (or finds again) the run's compute environment, job queue and ``multinode`` job definition
(their requests: ``dtp.platforms.batch_requests``); ``ready_trigger`` waits in the triggerer until the compute
environment and the queue are VALID. ``teardown`` terminates the run's jobs, deregisters its job definitions and
disables then deletes the queue and the compute environment, waiting until each is gone. The shared filesystem is the
host's ``/fsx``: ECS cannot mount FSx for Lustre itself, so the ``dtp_batch`` connection's launch template mounts it
on every host (and attaches the EFA interfaces); ``check`` refuses every job without one, since the Airflow workers
and the job's nodes share the run's files through it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from airflow.providers.amazon.aws.hooks.batch_client import BatchClientHook

from dtp.connections import AWS_CONN_ID
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.batch_checks import batch_request_problems
from dtp.platforms.batch_requests import (
    DIGEST_TAG,
    DOCUMENTS,
    job_definition_request,
    preflight_node_overrides,
    render_requests,
)
from dtp.platforms.batch_settings import BatchSettings
from dtp.platforms.containers import FSX_MOUNT, image_runtime
from dtp.triggers.batch import BatchJobQueueTrigger

CONN_ID = "dtp_batch"
ACTIVE_JOB_STATES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")


class BatchPlatform:
    """Multi-node parallel jobs on AWS Batch in the account of the ``aws_default`` connection."""

    name = "batch"
    scheduler = "batch"

    def __init__(
        self,
        conn_id: str = CONN_ID,
        aws_conn_id: str = AWS_CONN_ID,
        poll_seconds: float = 10,
        wait_timeout_minutes: int | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.aws_conn_id = aws_conn_id
        self.poll_seconds = poll_seconds
        # None: the connection's; the reaper sets it, so teardown works where no dtp_batch connection is left.
        self.wait_timeout_minutes = wait_timeout_minutes

    @property
    def settings(self) -> BatchSettings:
        return BatchSettings.from_connection(self.conn_id)

    @property
    def client(self) -> Any:
        return BatchClientHook(aws_conn_id=self.aws_conn_id).client

    def max_nodes(self) -> int:
        return self.settings.max_nodes

    def existing_file_system(self) -> str:
        template = self.settings.launch_template_id
        return f"the FSx for Lustre file system launch template {template} mounts" if template else ""

    def ami_family(self, instance: dict[str, Any]) -> None:
        return None  # Batch picks the ECS-optimized AMI of ec2Configuration's image type; DTP bakes none for it

    def default_image(self) -> dict[str, str]:
        # Without training_dir the pipeline stages the programs in the run's directory on FSx (dtp.pipeline.jobs).
        image = self.settings.image_uri
        return {"source": f"image {image}, programs on FSx", "image": image}

    def runtime(self, image: str, spec: dict[str, Any]) -> dict[str, str]:
        return image_runtime(image)

    # --- documents ------------------------------------------------------------------------------------------------
    def render(
        self, spec: dict[str, Any], network: dict[str, str], runtime: dict[str, str] | None = None
    ) -> dict[str, str]:
        """The run's compute environment, job queue and job definition, running ``runtime``'s image (default:
        ``default_image()``); refused (``PlatformNotReady``) where the settings may not create a compute environment
        (``BatchSettings.creation_problems``)."""
        settings = self.settings.for_creation(self.conn_id)
        return render_requests(spec, network, settings, runtime or self.default_image())

    def preflight_overrides(self, spec: dict[str, Any], runtime: dict[str, str] | None = None) -> dict[str, Any]:
        """SubmitJob's ``nodeOverrides`` that turn the run's job definition into its preflight (default image:
        ``default_image()``)."""
        return preflight_node_overrides(spec, runtime or self.default_image())

    def check(self, documents: dict[str, str]) -> list[str]:
        """What Batch would refuse, or the run would fail on, in the rendered requests."""
        environment, queue, definition = (json.loads(documents[name]) for name in DOCUMENTS)
        return batch_request_problems(environment, queue, definition, self.conn_id)

    # --- lifecycle --------------------------------------------------------------------------------------------------
    def provision(self, spec: dict[str, Any], network: dict[str, str], ami: str | None = None) -> dict[str, Any]:
        """Create what is missing of the run's compute environment, job queue and job definition, enabling a compute
        environment or queue a half-finished teardown disabled (VALID, but it would take no job). Batch takes a queue
        only on a VALID compute environment: while the compute environment is being created the queue is left to the
        next ``provision``, which deploy_cluster runs once ``ready_trigger`` saw the compute environment VALID."""
        documents = self.render(spec, network)
        if problems := self.check(documents):
            raise PlatformNotReady("the Batch requests are invalid:\n" + "\n".join(problems))
        environment, queue, definition = (json.loads(documents[name]) for name in DOCUMENTS)
        client, environment_name = self.client, environment["computeEnvironmentName"]
        _create_or_enable(client, "compute_environment", environment, client.create_compute_environment)
        # A queue is created only on a VALID compute environment; one that exists is enabled all the same.
        if (
            describe(client, "job_queue", queue["jobQueueName"])
            or _status(client, "compute_environment", environment_name) == "VALID"
        ):
            _create_or_enable(client, "job_queue", queue, client.create_job_queue)
        return {
            "platform": self.name,
            "compute_environment": environment_name,
            "job_queue": queue["jobQueueName"],
            "job_definition": self._register(client, definition),
            "scheduler": self.scheduler,
            "shared_dir": FSX_MOUNT,
            "nodes": spec["params"]["num_nodes"],
        }

    def ready_trigger(self, cluster: dict[str, Any]) -> BatchJobQueueTrigger:
        """Waits in the triggerer until the cluster's compute environment and job queue are VALID, for the
        connection's ``wait_timeout_minutes``."""
        minutes = self.wait_timeout_minutes or self.settings.wait_timeout_minutes
        return BatchJobQueueTrigger(
            cluster["compute_environment"],
            cluster["job_queue"],
            aws_conn_id=self.aws_conn_id,
            poll_interval=self.poll_seconds,
            timeout=minutes * 60,
        )

    def register_job_definition(self, spec: dict[str, Any], runtime: dict[str, str]) -> str:
        """The ARN of the run's job definition running ``runtime``'s image: its active revision when that has the
        same content, else a new revision (a job's image is fixed by its definition, not overridable)."""
        return self._register(self.client, job_definition_request(spec, runtime))

    @staticmethod
    def _register(client: Any, definition: dict[str, Any]) -> str:
        active = _job_definitions(client, definition["jobDefinitionName"])
        latest = max(active, key=lambda d: d["revision"], default=None)
        if latest is not None and latest.get("tags", {}).get(DIGEST_TAG) == definition["tags"][DIGEST_TAG]:
            arn: str = latest["jobDefinitionArn"]
            return arn
        arn = client.register_job_definition(**definition)["jobDefinitionArn"]
        return arn

    def stop_jobs(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Terminate the run's unfinished jobs (none while its queue does not exist); Batch stops them on its own."""
        run_key, client = spec["names"]["run_key"], self.client
        queue = f"{run_key}-queue"
        terminated: list[str] = []
        if describe(client, "job_queue", queue):
            for status in ACTIVE_JOB_STATES:
                for page in client.get_paginator("list_jobs").paginate(jobQueue=queue, jobStatus=status):
                    for job in page["jobSummaryList"]:
                        client.terminate_job(jobId=job["jobId"], reason=f"end of run {run_key}")
                        terminated.append(job["jobId"])
        return {"terminated_jobs": terminated}

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Terminate the run's unfinished jobs, deregister its job definitions, delete its queue and compute
        environment (in that order: Batch deletes no compute environment a queue still uses)."""
        run_key, client = spec["names"]["run_key"], self.client
        queue = f"{run_key}-queue"
        terminated = self.stop_jobs(spec)["terminated_jobs"]
        deregistered = [d["jobDefinitionArn"] for d in _job_definitions(client, f"{run_key}-train")]
        for arn in deregistered:
            client.deregister_job_definition(jobDefinition=arn)
        return {
            "terminated_jobs": terminated,
            "deregistered_job_definitions": deregistered,
            "deleted_job_queue": self._disable_and_delete(client, "job_queue", queue),
            "deleted_compute_environment": self._disable_and_delete(client, "compute_environment", f"{run_key}-ce"),
        }

    def _disable_and_delete(self, client: Any, kind: str, name: str) -> bool:
        """Batch deletes a queue or compute environment only once it is DISABLED and settled; False when gone."""
        found = describe(client, kind, name)
        if not found:
            return False
        if found[0]["state"] != "DISABLED":
            getattr(client, f"update_{kind}")(**{_camel(kind): name, "state": "DISABLED"})
        self._wait(client, kind, name, lambda items: not items or items[0]["status"] not in ("CREATING", "UPDATING"))
        if describe(client, kind, name):
            getattr(client, f"delete_{kind}")(**{_camel(kind): name})
        self._wait(client, kind, name, lambda items: not items)
        return True

    def _wait(self, client: Any, kind: str, name: str, done: Callable[[list[dict[str, Any]]], bool]) -> None:
        minutes = self.wait_timeout_minutes or self.settings.wait_timeout_minutes
        deadline = time.monotonic() + minutes * 60
        while not done(items := describe(client, kind, name)):
            what = f"Batch {kind.replace('_', ' ')} {name}"
            if items and items[0]["status"] == "INVALID":
                raise RuntimeError(f"{what} is INVALID: {items[0].get('statusReason')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} is still {items[0]['status'] if items else 'missing'}")
            time.sleep(self.poll_seconds)


def _camel(kind: str) -> str:
    """``job_queue`` -> ``jobQueue``: how Batch's parameters name a job queue or compute environment."""
    first, rest = kind.split("_", 1)
    return first + rest.title().replace("_", "")


def describe(client: Any, kind: str, name: str) -> list[dict[str, Any]]:
    """The job queue or compute environment ``name`` unless deleted (Batch lists a deleted one for a while)."""
    key = _camel(kind)
    found = getattr(client, f"describe_{kind}s")(**{f"{key}s": [name]})[f"{key}s"]
    return [item for item in found if item[f"{key}Name"] == name and item.get("status") != "DELETED"]


def _status(client: Any, kind: str, name: str) -> str | None:
    """The status of the job queue or compute environment ``name``; None while Batch does not list it."""
    found = describe(client, kind, name)
    return found[0]["status"] if found else None


def _create_or_enable(client: Any, kind: str, request: dict[str, Any], create: Callable[..., Any]) -> None:
    """Create the job queue or compute environment of ``request`` with ``create`` unless it exists; enable it
    where it is DISABLED."""
    name = request[f"{_camel(kind)}Name"]
    found = describe(client, kind, name)
    if not found:
        create(**request)
    elif found[0]["state"] == "DISABLED":
        getattr(client, f"update_{kind}")(**{_camel(kind): name, "state": "ENABLED"})


def _job_definitions(client: Any, name: str) -> list[dict[str, Any]]:
    pages = client.get_paginator("describe_job_definitions").paginate(jobDefinitionName=name, status="ACTIVE")
    return [d for page in pages for d in page["jobDefinitions"]]
