"""The one interface every compute platform implements.

Modeled on SkyPilot's provision API: a few plain operations, one module per
platform, chosen by the ``platform`` param. The pipeline's graph is the same
for every platform; only these calls differ.

A platform's account settings (execution role, file system, key pair, ...)
live in the extra of an Airflow connection named ``dtp_<platform>``, never in
code: the local profile writes its own, a real account gets its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from airflow.triggers.base import BaseTrigger

Scheduler = Literal["slurm", "kubernetes", "batch"]
# The whole time of a preflight job off Slurm (PyTorchJob, Batch job): image pulls, the screen, the sweep.
PREFLIGHT_DEADLINE_S = 900
# How long the CloudWatch log group a run's cluster leaves behind (ParallelCluster's, HyperPod's) keeps its events:
# long enough for a post-mortem of a failed run, short enough that nothing accumulates (a value CloudWatch allows).
CLUSTER_LOG_RETENTION_DAYS = 14
S = TypeVar("S", bound="PlatformSettings")
log = logging.getLogger(__name__)


class PlatformNotReady(RuntimeError):
    """A platform cannot be used as configured; the message names the connection and field to fix."""


class ReservationUnavailable(RuntimeError):
    """The capacity reservation the platform's settings name cannot take the run's nodes now (too few of its
    instances available, or it is not active yet); unlike ``PlatformNotReady``, this may pass: deploy_cluster waits
    and tries again."""


class PlatformSettings(BaseModel):
    """A platform's account settings, read from the extra of its ``dtp_<platform>`` connection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_connection(cls: type[S], conn_id: str) -> S:
        from airflow.sdk.bases.hook import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            extra = BaseHook.get_connection(conn_id).extra_dejson
        except AirflowNotFoundException as err:
            raise PlatformNotReady(f"connection {conn_id!r} is not defined; it holds {cls.__doc__}") from err
        try:
            return cls.model_validate(extra)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise PlatformNotReady(f"connection {conn_id!r} extra: {problems}") from None

    def creation_problems(self) -> list[str]:
        """What these settings may not create a cluster with (``<field>: <why>``): rules that connections written
        before them may break, which teardown must still read. None by default."""
        return []

    def for_creation(self: S, conn_id: str) -> S:
        """These settings, refused (``PlatformNotReady``) where they may not create a cluster."""
        if problems := self.creation_problems():
            raise PlatformNotReady(f"connection {conn_id!r} extra: {'; '.join(problems)}")
        return self


class ComputePlatform(Protocol):
    """Provision a cluster for a run, report its capacity, tear it down."""

    name: str
    # How jobs reach the nodes: sbatch on a Slurm controller, a Kubernetes API, or AWS Batch.
    scheduler: Scheduler

    def max_nodes(self) -> int:
        """How many compute nodes a run may ask for (a read, safe before anything exists)."""

    def existing_file_system(self) -> str:
        """The file system that outlives runs which the nodes mount (an existing FSx for Lustre), named for a
        message; empty where the run's cluster brings its own or mounts none."""

    def ami_family(self, instance: dict[str, Any]) -> str | None:
        """The AMI family (images/packer/families) nodes of ``instance``'s type boot; None where they boot none of
        DTP's AMIs."""

    def default_image(self) -> dict[str, str]:
        """The training runtime to use when no baked image is published for this platform."""

    def runtime(self, image: str, spec: dict[str, Any]) -> dict[str, str]:
        """How the jobs of the run ``spec`` run the published training image ``image`` (``registry/repo@digest``)."""

    def render(self, spec: dict[str, Any], network: dict[str, str]) -> dict[str, str]:
        """Every document the platform sends to create the run's cluster and jobs: file name -> text."""

    def check(self, documents: dict[str, str]) -> list[str]:
        """Validate rendered documents offline against the service's own schema; each problem as a message."""

    def provision(self, spec: dict[str, Any], network: dict[str, str], ami: str | None = None) -> dict[str, Any]:
        """Create (or find again) the run's cluster, its nodes booting ``ami`` (the newest AMI of their
        ``ami_family``, where one is published); return how to reach it."""

    def ready_trigger(self, cluster: dict[str, Any]) -> BaseTrigger | None:
        """A trigger that fires once ``provision``'s cluster is ready; None when it is ready already. A success
        event with ``provision_again`` (a cluster made in stages) has deploy_cluster provision again and defer to the
        next trigger."""

    def stop_jobs(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Stop the run's jobs (training, preflight, ...), waiting until they are gone where the scheduler tells
        (Slurm, Kubernetes; AWS Batch stops terminated jobs on its own); the cluster stays (what a run with
        ``keep_cluster`` does at its end)."""

    def teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Stop the run's jobs and delete its cluster; verify nothing is left."""


@runtime_checkable
class DeferrableTeardownPlatform(Protocol):
    """A platform whose cluster takes long to delete (ParallelCluster, HyperPod): its ``teardown`` is
    ``start_teardown`` and then a wait until the cluster is gone, which ``deleted_trigger`` does in the triggerer
    instead, holding no worker slot."""

    def start_teardown(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Stop the run's jobs and start deleting its cluster (a cluster already being deleted is left to it);
        return what ``teardown`` returns, without waiting until the cluster is gone."""

    def deleted_trigger(self, specs: list[dict[str, Any]]) -> BaseTrigger:
        """A trigger that fires once the clusters of ``specs`` (runs whose ``start_teardown`` ran) are all gone,
        or one of them cannot be deleted, or the platform's deletion deadline passed."""


@runtime_checkable
class PinnedHeadNodePlatform(Protocol):
    """A platform that creates its Slurm cluster's head node per run and reaches it over ssh (ParallelCluster): the
    head node's host keys, known only once it is up, are recorded beside its address, and every ssh connection to
    it checks them (``dtp.hooks.head_node_ssh``)."""

    def head_node_host_keys(self, cluster: dict[str, Any]) -> list[str]:
        """The host keys of the ready ``cluster``'s head node, each ``<type> <base64>``, read where the platform's
        service keeps them (``dtp.platforms.host_keys``); none where its SSH connection checks no host keys. Raises
        while they are not known."""


def stop_before_delete(stop: Callable[[], list[str]]) -> list[str]:
    """``stop()``: the run's jobs stopped before its cluster is deleted. A controller, head node or API it cannot
    reach (ssh, SSM, Kubernetes, a missing connection) is logged, not raised: deleting the cluster stops the jobs on
    its nodes too, and must still run."""
    try:
        return stop()
    except Exception as err:
        log.warning("Could not stop the run's jobs before deleting the cluster: %r", err)
        return []


@runtime_checkable
class PyTorchJobPlatform(Protocol):
    """A platform whose jobs are Kubeflow PyTorchJobs on an EKS cluster (EKS, HyperPod on EKS)."""

    def pytorchjobs(self, spec: dict[str, Any], runtime: dict[str, str]) -> dict[str, str]:
        """The run's ``preflight.yaml`` and ``pytorchjob.yaml``, running ``runtime``'s image."""
