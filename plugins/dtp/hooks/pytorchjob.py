"""Kubeflow PyTorchJobs on an Amazon EKS cluster: create once per name, read their state, pods and logs, delete.

The cncf-kubernetes provider has no operator for the training operator's custom resources, so this hook builds
on its ``KubernetesHook`` the way the amazon provider's ``EksPodOperator`` does: the kubeconfig is generated
from an AWS connection (``EksHook.generate_config_file_with_credentials``), so no Kubernetes connection is needed.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from airflow.providers.amazon.aws.hooks.eks import EksHook
from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
from airflow.sdk import BaseHook
from kubernetes.client import Configuration, CoreV1Event, V1Pod, V1PodStatus
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
# Labels the training operator (kubeflow/common's constants) puts on a job's pods.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"
# The labels of a job's first worker pod: torchrun's rank 0 and the rendezvous host.
LEADER_LABELS = {REPLICA_TYPE_LABEL: "worker", REPLICA_INDEX_LABEL: "0"}
CONTAINER = "pytorch"  # the container the operator gives torchrun's PET_* settings
TERMINAL_CONDITIONS = ("Succeeded", "Failed")
LIST_PAGE = 500  # jobs per list request
# The API server and the operator's webhook fill in defaults, so a job's spec is compared through this annotation.
SPEC_DIGEST_ANNOTATION = "dtp.dev/spec-sha256"
# How a job stopped at runPolicy.activeDeadlineSeconds reads: training-operator v1.9's Failed condition says
# "Job <name> has failed because it was active longer than specified deadline" (reason PyTorchJobFailed, as for
# any failure); Kubernetes Jobs, and operators that follow them, give the reason DeadlineExceeded.
DEADLINE_MESSAGE = "active longer than specified deadline"
DEADLINE_REASON = "DeadlineExceeded"
# Suspending a job resets its status.startTime (training-operator's RunPolicy.suspend), so DTP records there how
# long a job it suspends was active: the job that replaces it gets only what is left of the deadline.
ACTIVE_SECONDS_ANNOTATION = "dtp.dev/active-seconds"
# Why a container waits that no wait mends: the image cannot be pulled or named, or the container cannot be made.
CANNOT_START_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError")
# Held while a kubeconfig is written: ``EksHook.generate_config_file`` sets AWS_STS_REGIONAL_ENDPOINTS in os.environ
# and then deletes it, so two threads writing at once (a trigger's polls and its on_kill, triggers in one triggerer)
# would have the second delete fail, or one read the STS endpoint without it.
_WRITING_KUBECONFIG = threading.Lock()


class PyTorchJobExists(RuntimeError):
    """A PyTorchJob of that name exists and was not created from the same manifest."""


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """The job's newest true condition (Created, Running, Restarting, Succeeded, Failed, Suspended) and its
    message; ("Pending", "") before the operator has written any."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    if not conditions:
        return "Pending", ""
    # A terminal condition wins over a Running one whose transition time ties with it.
    newest = max(conditions, key=lambda c: (c.get("lastTransitionTime") or "", c.get("type") in TERMINAL_CONDITIONS))
    return newest["type"], newest.get("message", "")


def _run_policy(job: dict[str, Any]) -> dict[str, Any]:
    return ((job.get("spec") or {}).get("runPolicy")) or {}


def deadline_seconds(job: dict[str, Any]) -> int:
    """The job's (or manifest's) ``runPolicy.activeDeadlineSeconds``; 0 when it has none."""
    return int(_run_policy(job).get("activeDeadlineSeconds") or 0)


def ran_seconds(job: dict[str, Any], until: datetime | None = None) -> float:
    """How long the job was active, as its deadline counts it: from ``status.startTime`` (the operator's first
    sync) to ``status.completionTime``, or to its terminal condition where that is missing, or to ``until`` for a
    job still active; what DTP recorded for a job it suspended; 0 before it started."""
    recorded = ((job.get("metadata") or {}).get("annotations") or {}).get(ACTIVE_SECONDS_ANNOTATION)
    if recorded is not None:
        return float(recorded)
    status = job.get("status") or {}
    start = _time(status.get("startTime"))
    ends = [c.get("lastTransitionTime") for c in status.get("conditions") or [] if c.get("type") in TERMINAL_CONDITIONS]
    end = _time(status.get("completionTime") or max(filter(None, ends), default=None)) or until
    return max(0.0, (end - start).total_seconds()) if start and end else 0.0


def past_deadline(job: dict[str, Any]) -> bool:
    """Whether the job failed because it ran past ``runPolicy.activeDeadlineSeconds``."""
    conditions = (job.get("status") or {}).get("conditions") or []
    failed = [c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"]
    if not failed:
        return False
    if any(c.get("reason") == DEADLINE_REASON or DEADLINE_MESSAGE in (c.get("message") or "") for c in failed):
        return True
    limit = deadline_seconds(job)
    return bool(limit) and ran_seconds(job) >= limit


def suspended(job: dict[str, Any]) -> bool:
    """Whether the job was suspended (``runPolicy.suspend``), whether or not the operator has deleted its pods yet."""
    return bool(_run_policy(job).get("suspend"))


def gang_wait(job: dict[str, Any]) -> str:
    """What the gang scheduler of a job with ``runPolicy.schedulingPolicy`` waits for before it places any of its
    pods (all ``minAvailable`` of them fitting at once), as a reason the job has not started; "" for a job the
    default scheduler places pod by pod."""
    minimum = (_run_policy(job).get("schedulingPolicy") or {}).get("minAvailable")
    if not minimum:
        return ""
    replicas = ((job.get("spec") or {}).get("pytorchReplicaSpecs") or {}).values()
    names = {((replica.get("template") or {}).get("spec") or {}).get("schedulerName") for replica in replicas}
    scheduler = " ".join(sorted(filter(None, names)))
    return f"the gang scheduler{' ' + scheduler if scheduler else ''} is waiting until all {minimum} pods fit at once"


def pod_status(pod: V1Pod, why_unscheduled: dict[str, str]) -> str:
    """How a pod of a job that is not running stands: its phase, why the scheduler placed it nowhere (the message of
    its latest FailedScheduling event, in ``why_unscheduled`` by pod name) and why each waiting container waits."""
    status = pod.status or V1PodStatus()
    parts = [status.phase or "Pending"]
    if why := why_unscheduled.get(pod.metadata.name):
        parts.append(f"not scheduled: {why}")
    for container in status.container_statuses or []:
        if (waiting := container.state and container.state.waiting) and waiting.reason:
            parts.append(f"{container.name} {waiting.reason}" + (f": {waiting.message}" if waiting.message else ""))
    return ", ".join(parts)


def waiting_reasons(pod: V1Pod) -> set[str]:
    """Why the pod's containers wait (ContainerCreating, ImagePullBackOff, ...)."""
    statuses = (pod.status.container_statuses if pod.status else None) or []
    return {s.state.waiting.reason for s in statuses if s.state and s.state.waiting and s.state.waiting.reason}


def pod_failure(pod: V1Pod) -> str | None:
    """Why a pod of a failed job failed, with the node it ran on: its eviction, or the last end of a container that
    exited non-zero (its reason, such as OOMKilled, and exit code); None for a pod that did not fail."""
    status = pod.status or V1PodStatus()
    node = (pod.spec.node_name if pod.spec else None) or "no node"
    if status.reason:  # the kubelet failed the whole pod: Evicted, say
        return f"{pod.metadata.name} {status.reason} on {node}" + (f": {status.message}" if status.message else "")
    for container in status.container_statuses or []:
        ended = (container.state and container.state.terminated) or (
            container.last_state and container.last_state.terminated
        )
        if ended and ended.exit_code:
            return f"{pod.metadata.name} {ended.reason or 'Error'} (exit code {ended.exit_code}) on {node}"
    return None


def is_leader(pod: V1Pod) -> bool:
    """Whether the pod is its job's first worker (``PyTorchJobHook.leader_pod``)."""
    return LEADER_LABELS.items() <= (pod.metadata.labels or {}).items()


def restarted(pod: V1Pod) -> bool:
    """Whether a container of the pod was restarted (its previous container's log is still there to read)."""
    statuses = (pod.status.container_statuses if pod.status else None) or []
    return any(status.restart_count for status in statuses)


def _time(stamp: str | None) -> datetime | None:
    """A Kubernetes RFC 3339 timestamp (``2026-12-03T10:00:00Z``) as a datetime; None for none."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None


class PyTorchJobHook(BaseHook):
    """
    Create, read, log and delete Kubeflow PyTorchJobs in a namespace of an EKS cluster.

    Its connection is an AWS connection, which ``EksHook`` turns into a kubeconfig (``kubernetes``).

    :param cluster_name: the EKS cluster
    :param namespace: the namespace of the jobs
    :param aws_conn_id: the AWS connection whose identity has an access entry on the cluster
    :param region_name: the cluster's region (default: the connection's)
    """

    conn_name_attr = "aws_conn_id"
    default_conn_name = "aws_default"
    conn_type = "aws"
    hook_name = "Kubeflow PyTorchJobs on Amazon EKS"

    def __init__(
        self,
        cluster_name: str,
        namespace: str,
        aws_conn_id: str | None = default_conn_name,
        region_name: str | None = None,
    ) -> None:
        super().__init__()
        self.cluster_name = cluster_name
        self.namespace = namespace
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name

    @cached_property
    def eks_hook(self) -> EksHook:
        return EksHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name)

    @contextmanager
    def kubernetes(self) -> Iterator[KubernetesHook]:
        """A Kubernetes hook on the cluster; its kubeconfig (and the credentials it reads) live until exit.

        The hook loads the kubeconfig into a configuration of its own, not the process-wide default that hooks on
        other clusters (other triggers in the triggerer) would load theirs into."""
        with ExitStack() as stack:
            with _WRITING_KUBECONFIG:
                config_file, _ = stack.enter_context(
                    self.eks_hook.generate_config_file_with_credentials(
                        eks_cluster_name=self.cluster_name, pod_namespace=self.namespace
                    )
                )
            yield KubernetesHook(conn_id=None, config_file=config_file, client_configuration=Configuration())

    def ensure_job(
        self, kubernetes: KubernetesHook, manifest: dict[str, Any], deadline: int | None = None
    ) -> dict[str, Any]:
        """Create the job ``manifest`` describes unless it exists; return the job as the API holds it.

        A retried task finds its first try's job again; a job of the same name with another spec is refused. A job
        of that name being deleted (its pods still going) is waited on until it is gone, then created anew.
        ``deadline``, when given, replaces the manifest's ``runPolicy.activeDeadlineSeconds`` in the job it creates
        (what is left of the time limit); the job still counts as made from ``manifest``.
        """
        name = manifest["metadata"]["name"]
        digest = hashlib.sha256(json.dumps(manifest["spec"], sort_keys=True).encode()).hexdigest()
        metadata, spec = manifest["metadata"], manifest["spec"]
        annotations = {**(metadata.get("annotations") or {}), SPEC_DIGEST_ANNOTATION: digest}
        if deadline is not None:
            spec = {**spec, "runPolicy": {**(spec.get("runPolicy") or {}), "activeDeadlineSeconds": deadline}}
        body = {**manifest, "metadata": {**metadata, "annotations": annotations}, "spec": spec}
        try:
            job: dict[str, Any] = kubernetes.create_custom_object(GROUP, VERSION, PLURAL, body, self.namespace)
            self.log.info("Created PyTorchJob %s/%s", self.namespace, name)
            return job
        except ApiException as err:
            if err.status != 409:
                raise
        existing = self.get_job(kubernetes, name)
        if existing is None:  # deleted between the two calls: create it now
            return self.ensure_job(kubernetes, manifest, deadline)
        if existing["metadata"].get("deletionTimestamp"):  # not one to re-attach to: it goes once its pods do
            self.log.info("PyTorchJob %s/%s is being deleted: creating it anew once it is gone", self.namespace, name)
            self.wait_gone(kubernetes, name)
            return self.ensure_job(kubernetes, manifest, deadline)
        if (existing["metadata"].get("annotations") or {}).get(SPEC_DIGEST_ANNOTATION) != digest:
            raise PyTorchJobExists(
                f"PyTorchJob {self.namespace}/{name} exists with another spec; delete it or use another run"
            )
        self.log.info("PyTorchJob %s/%s exists already (%s)", self.namespace, name, job_state(existing)[0])
        return existing

    def get_job(self, kubernetes: KubernetesHook, name: str) -> dict[str, Any] | None:
        try:
            job: dict[str, Any] = kubernetes.get_custom_object(GROUP, VERSION, PLURAL, name, self.namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return job

    def labelled_jobs(self, kubernetes: KubernetesHook, label: str) -> list[dict[str, Any]]:
        """The namespace's jobs that carry the label ``label``, whatever its value (read a page at a time)."""
        jobs: list[dict[str, Any]] = []
        token = None
        while True:
            page = kubernetes.custom_object_client.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, label_selector=label, limit=LIST_PAGE, _continue=token
            )
            jobs += page.get("items") or []
            if not (token := (page.get("metadata") or {}).get("continue")):
                return jobs

    def suspend_job(self, kubernetes: KubernetesHook, name: str, active_seconds: float) -> None:
        """Suspend the job (the training operator deletes its pods and keeps the job) and record how long it was
        active, which its suspension would otherwise erase."""
        body = {
            "metadata": {"annotations": {ACTIVE_SECONDS_ANNOTATION: str(round(active_seconds))}},
            "spec": {"runPolicy": {"suspend": True}},
        }
        kubernetes.custom_object_client.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, body
        )
        self.log.info("Suspended PyTorchJob %s/%s after %d s active", self.namespace, name, round(active_seconds))

    def suspend_unless_ended(self, kubernetes: KubernetesHook, name: str) -> str | None:
        """Suspend the job unless it has ended, recording how long it was active (``suspend_job``): the condition it
        ended with, else "Suspended"; None when there is no such job."""
        job = self.get_job(kubernetes, name)
        if job is None:
            return None
        if (state := job_state(job)[0]) in TERMINAL_CONDITIONS:
            return state
        self.suspend_job(kubernetes, name, ran_seconds(job, until=datetime.now(UTC)))
        return "Suspended"

    def delete_job(self, kubernetes: KubernetesHook, name: str, timeout: float = 600, poll: float = 5) -> bool:
        """Delete the job in the foreground (it stays visible until its pods are gone) and wait until it is gone.

        False when there was no such job; raises when it is still there after ``timeout`` seconds.
        """
        try:
            kubernetes.delete_custom_object(
                GROUP, VERSION, PLURAL, name, self.namespace, propagation_policy="Foreground"
            )
        except ApiException as err:
            if err.status != 404:
                raise
            return False
        self.wait_gone(kubernetes, name, timeout, poll)
        return True

    def wait_gone(self, kubernetes: KubernetesHook, name: str, timeout: float = 600, poll: float = 5) -> None:
        """Wait until the job, deleted, is gone; raise when it is still there after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.get_job(kubernetes, name) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PyTorchJob {self.namespace}/{name} is still there {timeout:.0f} s after delete")
            time.sleep(poll)

    def leader_pod(self, kubernetes: KubernetesHook, name: str) -> str | None:
        """The name of the job's first worker pod (torchrun's rank 0 and the rendezvous host), None before it exists."""
        selector = ",".join(f"{key}={value}" for key, value in {JOB_NAME_LABEL: name, **LEADER_LABELS}.items())
        pods = kubernetes.core_v1_client.list_namespaced_pod(self.namespace, label_selector=selector).items
        return pods[0].metadata.name if pods else None

    def job_pods(self, kubernetes: KubernetesHook, name: str) -> list[V1Pod]:
        """The job's pods (all its replicas), in name order."""
        pods = kubernetes.core_v1_client.list_namespaced_pod(self.namespace, label_selector=f"{JOB_NAME_LABEL}={name}")
        return sorted(pods.items, key=lambda pod: pod.metadata.name)

    def scheduling_failures(self, kubernetes: KubernetesHook, pods: list[str]) -> dict[str, str]:
        """The message of the latest FailedScheduling event of each of ``pods`` that has one, by pod name: why the
        scheduler found no node for it ("0/4 nodes are available: 4 Insufficient nvidia.com/gpu")."""
        events = kubernetes.core_v1_client.list_namespaced_event(
            self.namespace, field_selector="involvedObject.kind=Pod,reason=FailedScheduling"
        ).items
        return {
            event.involved_object.name: event.message
            for event in sorted(events, key=_event_time)
            if event.involved_object.name in pods
        }

    def log_lines(
        self,
        kubernetes: KubernetesHook,
        pod: str,
        since_seconds: int | None = None,
        *,
        previous: bool = False,
        tail_lines: int | None = None,
        limit_bytes: int | None = None,
    ) -> list[str]:
        """The pod's training container's log lines (``previous``: those of the container before its last restart;
        ``tail_lines``: only the last so many; ``limit_bytes``: only the first so many bytes of them, less a last line
        cut short there), each prefixed with its RFC 3339 timestamp; none before it has started."""
        try:
            # Raw bytes, decoded here: a log may hold bytes that are not UTF-8 (as the provider's get_pod_logs).
            response = kubernetes.core_v1_client.read_namespaced_pod_log(
                pod,
                self.namespace,
                container=CONTAINER,
                timestamps=True,
                since_seconds=since_seconds,
                previous=previous,
                tail_lines=tail_lines,
                limit_bytes=limit_bytes,
                _preload_content=False,
            )
        except ApiException as err:
            if err.status in (400, 404):  # the container is still being created, or the pod is gone
                return []
            raise
        data = response.data
        if limit_bytes is not None and len(data) >= limit_bytes:
            data = data[: data.rfind(b"\n") + 1]  # the kubelet stopped at limit_bytes, likely within a line
        return [line for line in data.decode("utf-8", "replace").splitlines() if line]


def _event_time(event: CoreV1Event) -> datetime:
    """When the event last happened: its series' last observation, its last timestamp, or its creation."""
    series = event.series.last_observed_time if event.series else None
    return series or event.last_timestamp or event.event_time or event.metadata.creation_timestamp
