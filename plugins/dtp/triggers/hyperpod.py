"""Wait for a SageMaker HyperPod cluster to be InService, or for clusters to be deleted, in the triggerer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from dtp.hooks.hyperpod import DELETE_POLL_S, DELETE_TIMEOUT_S, SETTLED_STATES, HyperPodHook
from dtp.triggers.deadline import DeadlineTrigger


class HyperPodClusterTrigger(DeadlineTrigger):
    """Fires once the cluster is InService (success), failed or gone, or ``timeout`` seconds after ``started_at``
    (epoch seconds; default: when the task deferred) passed (failed).

    :param controller_group: the instance group of a Slurm cluster's controller, reached over ssh: the success
        event's ``cluster`` names the controller's SSM target as ``head_node``, where the Slurm connection's ssh goes
    """

    def __init__(
        self,
        cluster_name: str,
        aws_conn_id: str | None = "aws_default",
        poll_interval: float = 30.0,
        timeout: float = 5400.0,
        started_at: float | None = None,
        controller_group: str | None = None,
    ) -> None:
        super().__init__(poll_interval=poll_interval, timeout=timeout, started_at=started_at)
        self.cluster_name = cluster_name
        self.aws_conn_id = aws_conn_id
        self.controller_group = controller_group

    def serialize_fields(self) -> dict[str, Any]:
        return {
            "cluster_name": self.cluster_name,
            "aws_conn_id": self.aws_conn_id,
            "controller_group": self.controller_group,
        }

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = HyperPodHook(aws_conn_id=self.aws_conn_id)
        while True:
            cluster = await self.poll(hook.describe_cluster, self.cluster_name)
            if cluster is None:
                yield TriggerEvent({"status": "failed", "message": f"HyperPod cluster {self.cluster_name} is gone"})
                return
            state = cluster["ClusterStatus"]
            if state in SETTLED_STATES:
                ok = state == "InService"
                message = f"HyperPod cluster {self.cluster_name} is {state}" + (
                    "" if ok else f": {cluster.get('FailureMessage') or 'no failure message'}"
                )
                event: dict[str, Any] = {"status": "success" if ok else "failed", "message": message}
                if ok and self.controller_group:
                    head_node = await self.poll(hook.node_target, cluster, self.controller_group)
                    if head_node is None:
                        why = f"{message}, but its {self.controller_group} group has no node"
                        event = {"status": "failed", "message": why}
                    else:
                        event["cluster"] = {"head_node": head_node}
                yield TriggerEvent(event)
                return
            if self.past_deadline:
                message = f"HyperPod cluster {self.cluster_name} is still {state} after {self.timeout:.0f} s"
                yield TriggerEvent({"status": "failed", "message": message})
                return
            self.log.info("HyperPod cluster %s is %s", self.cluster_name, state)
            await asyncio.sleep(self.poll_interval)


class HyperPodClusterDeleteTrigger(DeadlineTrigger):
    """Fires once every one of ``cluster_names`` is gone (success; their nodes have left the subnets), or some are
    still there ``timeout`` seconds after ``started_at`` (epoch seconds; default: when the task deferred) (failed,
    with each one's status and SageMaker's failure message)."""

    def __init__(
        self,
        cluster_names: list[str],
        aws_conn_id: str | None = "aws_default",
        poll_interval: float = DELETE_POLL_S,
        timeout: float = DELETE_TIMEOUT_S,
        started_at: float | None = None,
    ) -> None:
        super().__init__(poll_interval=poll_interval, timeout=timeout, started_at=started_at)
        self.cluster_names = cluster_names
        self.aws_conn_id = aws_conn_id

    def serialize_fields(self) -> dict[str, Any]:
        return {"cluster_names": self.cluster_names, "aws_conn_id": self.aws_conn_id}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = HyperPodHook(aws_conn_id=self.aws_conn_id)
        names = list(self.cluster_names)
        while True:
            described = [await self.poll(hook.describe_cluster, name) for name in names]
            there = {name: found for name, found in zip(names, described, strict=True) if found is not None}
            if not there:
                message = f"HyperPod clusters {', '.join(self.cluster_names)} are deleted"
                yield TriggerEvent({"status": "success", "message": message})
                return
            if self.past_deadline:
                statuses = "; ".join(
                    f"{name} is {found['ClusterStatus']}"
                    + (f": {found['FailureMessage']}" if found.get("FailureMessage") else "")
                    for name, found in there.items()
                )
                message = f"HyperPod clusters still there {self.timeout:.0f} s after DeleteCluster: {statuses}"
                yield TriggerEvent({"status": "failed", "message": message})
                return
            statuses = ", ".join(f"{name} ({found['ClusterStatus']})" for name, found in there.items())
            self.log.info("Waiting until the HyperPod clusters are deleted: %s", statuses)
            names = list(there)
            await asyncio.sleep(self.poll_interval)
