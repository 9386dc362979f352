"""Provision a run's cluster on its platform and tear it down, waiting in the triggerer while the platform creates or
deletes it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from botocore.exceptions import ClientError

from dtp.naming import EXPIRES_TAG
from dtp.operators.masking import ExtraEnvMaskingMixin
from dtp.pipeline.spec import earlier_incarnations, tear_down_earlier_incarnations
from dtp.platforms import get_platform
from dtp.platforms.base import (
    ComputePlatform,
    DeferrableTeardownPlatform,
    PinnedHeadNodePlatform,
    PlatformNotReady,
    ReservationUnavailable,
)

# How long deploy_cluster waits for a capacity reservation other runs hold (ReservationUnavailable), looking again
# every RESERVATION_POLL in the triggerer.
RESERVATION_WAIT_S = 1800
RESERVATION_POLL = timedelta(minutes=5)


class DeployClusterOperator(ExtraEnvMaskingMixin, BaseOperator):
    """
    Create (or find again) the run's cluster with ``platform.provision`` and return how to reach it.

    A run cleared whole while it ran got new names; the clusters of its earlier incarnations (``earlier_names``),
    kept or not, are deleted first (their jobs stopped): until then their nodes bill and hold the capacity the new
    cluster needs (a capacity reservation's instances). On a platform whose clusters take long to delete
    (ParallelCluster, HyperPod), every deletion is started, the task defers to one trigger that waits until those
    clusters are gone and provisions once it resumes. A retry starts no deletion again: it waits again for the
    clusters still being deleted.

    When the platform hands back a trigger (its cluster takes minutes to hours to come up), the task
    defers to it and frees its worker slot; an event with ``provision_again`` (a cluster made in stages) has the
    task provision again and defer to the next trigger. On a platform that creates a head node reached over ssh
    (``PinnedHeadNodePlatform``), the ready cluster's head node's host keys are recorded with it. A platform that
    is not set up, or a call the AWS endpoint does not implement (the local profile's emulator), fails the task at
    once, without retries.

    :param spec: the run spec from ``validate_params``
    :param network: the network stack's outputs
    :param images: the runtime from ``resolve_images``; its ``ami``, when published, is what the nodes boot
    """

    template_fields: Sequence[str] = ("spec", "network", "images")

    def __init__(self, *, spec: Any, network: Any, images: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.network = network
        self.images = images

    def execute(self, context: Any) -> dict[str, Any]:
        platform = get_platform(self.spec["params"]["platform"])
        earlier = earlier_incarnations(self.spec)
        if not earlier:
            return self._provision(platform)
        if not isinstance(platform, DeferrableTeardownPlatform):
            with fails_at_once_where_retries_cannot_help(platform):
                retired = tear_down_earlier_incarnations(self.spec, platform.teardown)
            self.log.info("Deleted the clusters of the run's earlier incarnations, their jobs stopped: %s", retired)
            return self._provision(platform)
        with fails_at_once_where_retries_cannot_help(platform):
            retired = tear_down_earlier_incarnations(self.spec, platform.start_teardown)
        self.log.info("Deleting the clusters of the run's earlier incarnations, their jobs stopped: %s", retired)
        self.log.info("Waiting in the triggerer until they are gone before provisioning the %s cluster", platform.name)
        self.defer(trigger=platform.deleted_trigger(earlier), method_name="provision_once_retired")

    def provision_once_retired(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Resumed once the clusters of the run's earlier incarnations are gone: provision the run's own."""
        if event["status"] != "success":
            raise AirflowException(event["message"])
        self.log.info(event["message"])
        return self._provision(get_platform(self.spec["params"]["platform"]))

    def provision_again(self, context: Any, event: Any = None, waiting_since: float = 0.0) -> dict[str, Any]:
        """Resumed after a wait for the capacity reservation other runs held: provision the run's cluster again."""
        return self._provision(get_platform(self.spec["params"]["platform"]), waiting_since)

    def _provision(self, platform: ComputePlatform, waiting_since: float | None = None) -> dict[str, Any]:
        try:
            with fails_at_once_where_retries_cannot_help(platform):
                cluster = platform.provision(self.spec, self.network, (self.images or {}).get("ami"))
        except ReservationUnavailable as err:
            since = waiting_since or time.time()
            if time.time() - since >= RESERVATION_WAIT_S:
                raise AirflowFailException(f"{err}; still so after {RESERVATION_WAIT_S // 60} minutes") from None
            self.log.warning("%s: looking again in %s", err, RESERVATION_POLL)
            self.defer(
                trigger=TimeDeltaTrigger(RESERVATION_POLL),
                method_name="provision_again",
                kwargs={"waiting_since": since},
            )
        trigger = platform.ready_trigger(cluster)
        if trigger is None:
            return cluster
        self.log.info("Waiting in the triggerer for %s cluster %s", platform.name, cluster.get("cluster_name"))
        self.defer(trigger=trigger, method_name="execute_complete", kwargs={"cluster": cluster})

    def execute_complete(self, context: Any, event: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
        if event["status"] != "success":
            raise AirflowException(event["message"])
        self.log.info(event["message"])
        platform = get_platform(self.spec["params"]["platform"])
        if event.get("provision_again"):
            # A cluster made in stages (Batch: a job queue only on a VALID compute environment): the next stage.
            return self._provision(platform)
        ready = {**cluster, **event.get("cluster", {})}
        if isinstance(platform, PinnedHeadNodePlatform):
            # Read here, not by the trigger, which only waits: a retry finds the cluster ready and reads them again.
            ready["head_node_host_keys"] = platform.head_node_host_keys(ready)
        return ready


@contextmanager
def fails_at_once_where_retries_cannot_help(platform: ComputePlatform) -> Iterator[None]:
    """Turn a platform that is not set up (``PlatformNotReady``) or a call the AWS endpoint does not implement (the
    local profile's emulator) into ``AirflowFailException``: the task fails now, whatever its retries."""
    try:
        yield
    except PlatformNotReady as err:
        raise AirflowFailException(str(err)) from None
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "NotImplemented":
            raise AirflowFailException(f"platform {platform.name!r}: {err}") from None
        raise


class TeardownClusterOperator(ExtraEnvMaskingMixin, BaseOperator):
    """
    Delete the run's cluster (its jobs stopped first); with ``keep_cluster``, stop the jobs and keep it. Then delete
    the clusters of the run's earlier incarnations (``earlier_names``), kept or not.

    On a platform whose clusters take long to delete (ParallelCluster, HyperPod), every deletion is started first,
    so they proceed together, and the task defers to one trigger that waits until all those clusters are gone,
    freeing its worker slot. A retry starts no deletion again: it waits again for the clusters still being deleted.

    :param spec: the run spec from ``validate_params``
    """

    template_fields: Sequence[str] = ("spec",)

    def __init__(self, *, spec: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec

    def execute(self, context: Any) -> dict[str, Any]:
        platform = get_platform(self.spec["params"]["platform"])
        teardown = platform.start_teardown if isinstance(platform, DeferrableTeardownPlatform) else platform.teardown
        deleting: list[dict[str, Any]] = []  # the specs whose clusters are being deleted
        if self.spec["params"]["keep_cluster"]:
            # The run is over: its jobs stop (freeing the nodes), the cluster stays for a person to look at.
            done = {"kept": True, **platform.stop_jobs(self.spec)}
            self.log.warning(
                "keep_cluster=true: cluster kept, the run's jobs stopped (%s); its resources expire at %s",
                done,
                self.spec["tags"][EXPIRES_TAG],
            )
        else:
            done = teardown(self.spec)
            deleting.append(self.spec)
        # A run cleared whole while it ran got new names: deploy_cluster deleted its earlier incarnations' clusters
        # unless it did not get that far (a task before it failed). What is gone already is found gone.
        retired = tear_down_earlier_incarnations(self.spec, teardown)
        deleting += earlier_incarnations(self.spec)
        if retired:
            done["earlier_incarnations"] = retired
        if not deleting or not isinstance(platform, DeferrableTeardownPlatform):
            return done
        self.log.info("Waiting in the triggerer until the %s clusters being deleted are gone", platform.name)
        self.defer(trigger=platform.deleted_trigger(deleting), method_name="execute_complete", kwargs={"done": done})

    def execute_complete(self, context: Any, event: dict[str, Any], done: dict[str, Any]) -> dict[str, Any]:
        if event["status"] != "success":
            raise AirflowException(event["message"])
        self.log.info(event["message"])
        return done
