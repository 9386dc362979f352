"""The reaper's finder on the EKS clusters DTP trains on: the PyTorchJobs runs left there past their expiry.

A run's teardown deletes its jobs; one that could not (the API server unreachable, a permission missing) leaves
them holding their nodes until the trainer ends. The jobs carry the run in their ``dtp.dev/run`` label and its
tags (expiry, DAG run, installation) in ``dtp.dev/...`` annotations (``dtp.platforms.eks.render_pytorchjobs``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from dtp.hooks.pytorchjob import PyTorchJobHook
from dtp.naming import EXPIRES_TAG, TAG_PREFIX
from dtp.platforms.eks import LABEL_DOMAIN, EksPlatform
from dtp.platforms.hyperpod import HyperPodPlatform
from dtp.reaper.active_runs import spare_active_runs, spare_other_installations
from dtp.reaper.aws import AwsFindings
from dtp.reaper.expired import Expired, is_expired

log = logging.getLogger(__name__)
KIND = "pytorchjob"
RUN_LABEL = f"{LABEL_DOMAIN}/run"
# How long a deleted job's pods may take to go, as EksPlatform's teardown waits.
DELETE_TIMEOUT = 600


def find_expired_pytorchjobs(
    aws_conn_id: str, now: datetime | None = None, *, active: Callable[[str, str], bool], installation: str
) -> AwsFindings:
    """The expired PyTorchJobs of runs on the EKS cluster (and namespace) of the ``dtp_eks`` connection and on that
    of HyperPod on EKS (``dtp_hyperpod``'s ``eks``), less those of a run of another installation than
    ``installation`` within a day of their expiry and those of a run ``active`` says is queued or running. A
    platform whose connection is not defined, or HyperPod's orchestrated by Slurm, has none. Each cluster is looked
    at on its own: one whose connection cannot be read or whose API server cannot be asked is logged and named in
    ``unsearched``, and the others are still found."""
    now = now or datetime.now(UTC)
    found: list[Expired] = []
    unsearched: dict[str, str] = {}
    looked: set[str] = set()
    platforms: list[EksPlatform | HyperPodPlatform] = [
        EksPlatform(aws_conn_id=aws_conn_id),
        HyperPodPlatform(aws_conn_id=aws_conn_id),
    ]
    for platform in platforms:
        where = f"{KIND} ({platform.conn_id})"
        try:
            BaseHook.get_connection(platform.conn_id)
        except AirflowNotFoundException:
            log.info("No %s connection is defined: no %s PyTorchJobs to sweep", platform.conn_id, platform.name)
            continue
        try:
            if platform.scheduler != "kubernetes":
                log.info("%s has no eks: its runs' jobs are Slurm jobs of their own clusters", platform.conn_id)
                continue
            hook = platform.jobs
            cluster = f"{hook.cluster_name}/{hook.namespace}"
            where = f"{KIND} on {cluster} ({platform.conn_id})"
            if cluster in looked:  # both connections name the same cluster and namespace
                continue
            looked.add(cluster)
            found += expired_pytorchjobs(hook, now)
        except Exception as err:  # the other cluster is still looked at; reap fails at the end
            log.exception("could not look for expired resources of kind %s", where)
            unsearched[where] = f"{type(err).__name__}: {err}"
    return AwsFindings(spare_active_runs(spare_other_installations(found, installation, now), active), unsearched)


def expired_pytorchjobs(hook: PyTorchJobHook, now: datetime) -> list[Expired]:
    """The jobs labelled with a run in the hook's cluster and namespace whose expiry annotation has passed."""
    with hook.kubernetes() as kubernetes:
        jobs = hook.labelled_jobs(kubernetes, RUN_LABEL)
    found = []
    for job in jobs:
        metadata = job.get("metadata") or {}
        tags = _tags(metadata.get("annotations") or {})
        if is_expired(tags.get(EXPIRES_TAG), now):
            run_key = (metadata.get("labels") or {})[RUN_LABEL]
            found.append(Expired.from_tags(KIND, job_address(hook, metadata["name"]), tags, run_key))
    return found


def job_address(hook: PyTorchJobHook, name: str) -> str:
    """The name an expired job is deleted by: ``<cluster>/<namespace>/<job>`` (none of which holds a slash)."""
    return f"{hook.cluster_name}/{hook.namespace}/{name}"


def _tags(annotations: dict[str, Any]) -> dict[str, str]:
    """The run's tags (``dtp:expires-at``, ...) that the job's ``dtp.dev/...`` annotations hold."""
    prefix = f"{LABEL_DOMAIN}/"
    return {
        f"{TAG_PREFIX}{key.removeprefix(prefix)}": str(value)
        for key, value in annotations.items()
        if key.startswith(prefix)
    }


@contextmanager
def pytorchjob_deleter(aws_conn_id: str, timeout: float = DELETE_TIMEOUT) -> Iterator[Callable[[Expired], object]]:
    """Deletes an expired job (``find_expired_pytorchjobs``) in the foreground and waits until it and its pods are
    gone, one kubeconfig per cluster and namespace, made at its first job and kept until exit."""
    with ExitStack() as stack:
        clients: dict[tuple[str, str], tuple[PyTorchJobHook, KubernetesHook]] = {}

        def delete(job: Expired) -> bool:
            cluster, namespace, name = job.name.split("/")
            if (cluster, namespace) not in clients:
                hook = PyTorchJobHook(cluster, namespace, aws_conn_id)
                clients[cluster, namespace] = hook, stack.enter_context(hook.kubernetes())
            hook, kubernetes = clients[cluster, namespace]
            return hook.delete_job(kubernetes, name, timeout=timeout)

        yield delete
