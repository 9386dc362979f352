"""Wait in the triggerer for ParallelCluster clusters to be created or deleted (``pcluster describe-cluster``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from dtp.triggers.deadline import DeadlineTrigger


class ParallelClusterCreateTrigger(DeadlineTrigger):
    """Fires once the cluster is ready (CREATE_COMPLETE, or UPDATE_COMPLETE when an earlier try's was updated), with
    its head node's address, or failed, gone or ``timeout`` seconds after ``started_at`` (epoch seconds; default:
    when the task deferred)."""

    def __init__(
        self, cluster_name: str, poll_interval: float = 30.0, timeout: float = 3600.0, started_at: float | None = None
    ) -> None:
        super().__init__(poll_interval=poll_interval, timeout=timeout, started_at=started_at)
        self.cluster_name = cluster_name

    def serialize_fields(self) -> dict[str, Any]:
        return {"cluster_name": self.cluster_name}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from dtp.platforms.parallelcluster import READY_STATES, ParallelClusterPlatform, failures, head_node_address

        cli = await asyncio.to_thread(lambda: ParallelClusterPlatform().cli)  # it reads connections: off the loop
        while True:
            described = await self.poll(cli.describe_cluster, self.cluster_name)
            status = None if described is None else described["clusterStatus"]
            if described is not None and status in READY_STATES:
                if not (head_node := head_node_address(described)):
                    message = f"cluster {self.cluster_name} is {status}, but has no head node address"
                    yield TriggerEvent({"status": "failed", "message": message})
                    return
                message = f"ParallelCluster cluster {self.cluster_name} is {status}"
                yield TriggerEvent({"status": "success", "message": message, "cluster": {"head_node": head_node}})
                return
            if described is None or status != "CREATE_IN_PROGRESS":
                why = "does not exist" if described is None else f"is {status}: {failures(described)}"
                yield TriggerEvent({"status": "failed", "message": f"cluster {self.cluster_name} {why}"})
                return
            if self.past_deadline:
                message = f"cluster {self.cluster_name} is still {status} after {self.timeout:.0f} s"
                yield TriggerEvent({"status": "failed", "message": message})
                return
            self.log.info("ParallelCluster cluster %s is %s", self.cluster_name, status)
            await asyncio.sleep(self.poll_interval)


class ParallelClusterDeleteTrigger(DeadlineTrigger):
    """Fires once every one of ``cluster_names`` is gone (success), or one is DELETE_FAILED, or some are still there
    ``timeout`` seconds after ``started_at`` (epoch seconds; default: when the task deferred) (failed)."""

    def __init__(
        self,
        cluster_names: list[str],
        poll_interval: float = 30.0,
        timeout: float = 3600.0,
        started_at: float | None = None,
    ) -> None:
        super().__init__(poll_interval=poll_interval, timeout=timeout, started_at=started_at)
        self.cluster_names = cluster_names

    def serialize_fields(self) -> dict[str, Any]:
        return {"cluster_names": self.cluster_names}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from dtp.platforms.parallelcluster import ParallelClusterPlatform, deletion_failures

        cli = await asyncio.to_thread(lambda: ParallelClusterPlatform().cli)  # it reads connections: off the loop
        names = list(self.cluster_names)
        while True:
            described = [await self.poll(cli.describe_cluster, name) for name in names]
            there = {name: found for name, found in zip(names, described, strict=True) if found is not None}
            for name, found in there.items():
                if found["clusterStatus"] == "DELETE_FAILED":
                    why = await self.poll(deletion_failures, name, cli.aws_conn_id)
                    yield TriggerEvent({"status": "failed", "message": f"cluster {name} is DELETE_FAILED: {why}"})
                    return
            if not there:
                message = f"ParallelCluster clusters {', '.join(self.cluster_names)} are deleted"
                yield TriggerEvent({"status": "success", "message": message})
                return
            statuses = ", ".join(f"{name} ({found['clusterStatus']})" for name, found in there.items())
            if self.past_deadline:
                message = f"clusters still there {self.timeout:.0f} s after delete-cluster: {statuses}"
                yield TriggerEvent({"status": "failed", "message": message})
                return
            self.log.info("Waiting until the ParallelCluster clusters are deleted: %s", statuses)
            names = list(there)
            await asyncio.sleep(self.poll_interval)
