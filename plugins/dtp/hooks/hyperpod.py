"""SageMaker HyperPod clusters: create once per name, describe, delete (and wait until gone).

The amazon provider's ``SageMakerHook`` covers training jobs, endpoints and
pipelines but not HyperPod's cluster API, so this hook adds it on the same
base (``AwsBaseHook``, ``aws_conn_id``), the way the provider would.
"""

from __future__ import annotations

import time
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from botocore.exceptions import ClientError

from dtp.naming import tags_dict

# ClusterStatus values (SageMaker API reference) after which a cluster will not change by itself.
SETTLED_STATES = frozenset({"InService", "Failed", "RollingBack"})
# How long a deleted cluster may take to be gone, and how often it is described meanwhile.
DELETE_TIMEOUT_S, DELETE_POLL_S = 1800, 15


def is_missing_cluster(err: ClientError) -> bool:
    """SageMaker says ResourceNotFound; the local emulator says ValidationException "Could not find cluster"."""
    error = err.response.get("Error", {})
    return error.get("Code") == "ResourceNotFound" or (
        error.get("Code") == "ValidationException" and error.get("Message", "").startswith("Could not find cluster")
    )


class HyperPodHook(AwsBaseHook):
    """Interact with SageMaker HyperPod clusters (``CreateCluster`` and friends) through boto3."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["client_type"] = "sagemaker"
        super().__init__(*args, **kwargs)

    def describe_cluster(self, name: str) -> dict[str, Any] | None:
        """The cluster's description, or None when no cluster has that name."""
        try:
            description: dict[str, Any] = self.conn.describe_cluster(ClusterName=name)
        except ClientError as err:
            if is_missing_cluster(err):
                return None
            raise
        return description

    def ensure_cluster(self, request: dict[str, Any]) -> dict[str, Any]:
        """Create the cluster ``request`` describes unless one of its name exists; return its description.

        A retried task finds the cluster its first try created, in whatever state it is.
        """
        name = request["ClusterName"]
        existing = self.describe_cluster(name)
        if existing is not None:
            self.log.info("HyperPod cluster %s exists (%s); not creating it again", name, existing["ClusterStatus"])
            return existing
        self.conn.create_cluster(**request)
        self.log.info("Creating HyperPod cluster %s", name)
        created = self.describe_cluster(name)
        if created is None:
            raise RuntimeError(f"HyperPod cluster {name} was created but cannot be described")
        return created

    def node_target(self, cluster: dict[str, Any], group: str) -> str | None:
        """The SSM target of the described ``cluster``'s first node in instance group ``group``, as
        ``aws ssm start-session --target`` takes it (``sagemaker-cluster:<cluster id>_<group>-<instance id>``);
        None while the group has no node."""
        found = self.conn.list_cluster_nodes(ClusterName=cluster["ClusterName"], InstanceGroupNameContains=group)
        nodes = [node for node in found["ClusterNodeSummaries"] if node["InstanceGroupName"] == group]
        if not nodes:
            return None
        cluster_id = cluster["ClusterArn"].rsplit("/", 1)[1]
        return f"sagemaker-cluster:{cluster_id}_{group}-{nodes[0]['InstanceId']}"

    def tagged_clusters(self) -> list[tuple[str, dict[str, str]]]:
        """Every cluster's name with its tags (the reaper's view of the account)."""
        clusters = []
        for page in self.conn.get_paginator("list_clusters").paginate():
            for summary in page["ClusterSummaries"]:
                try:
                    tags = self.conn.list_tags(ResourceArn=summary["ClusterArn"]).get("Tags", [])
                except ClientError as err:
                    # Deleted since ListClusters listed it: nothing left to find. SageMaker may answer a ListTags
                    # of a deleted resource with another error than DescribeCluster's, so DescribeCluster decides.
                    if is_missing_cluster(err) or self.describe_cluster(summary["ClusterName"]) is None:
                        self.log.info("HyperPod cluster %s is gone since it was listed", summary["ClusterName"])
                        continue
                    raise
                clusters.append((summary["ClusterName"], tags_dict(tags)))
        return clusters

    def delete_cluster(self, name: str) -> bool:
        """Start deleting the cluster; False when it was already gone.

        A cluster already Deleting (what a retried teardown or the reaper finds after an earlier try) is left to
        it: DeleteCluster again may be refused with ConflictException.
        """
        described = self.describe_cluster(name)
        if described is None:
            return False
        if described["ClusterStatus"] == "Deleting":
            self.log.info("HyperPod cluster %s is already Deleting; not deleting it again", name)
            return True
        try:
            self.conn.delete_cluster(ClusterName=name)
        except ClientError as err:
            if is_missing_cluster(err):
                return False
            raise
        self.log.info("Deleting HyperPod cluster %s", name)
        return True

    def wait_until_deleted(self, name: str, timeout: float = DELETE_TIMEOUT_S, poll: float = DELETE_POLL_S) -> None:
        """Wait until the cluster, being deleted, is gone (its nodes leave the subnets)."""
        deadline = time.monotonic() + timeout
        while self.describe_cluster(name) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"HyperPod cluster {name} is still there {timeout:.0f} s after DeleteCluster")
            time.sleep(poll)

    def delete_cluster_and_wait(
        self, name: str, timeout: float = DELETE_TIMEOUT_S, poll: float = DELETE_POLL_S
    ) -> bool:
        """Delete the cluster and wait until it is gone; False when there was none."""
        deleted = self.delete_cluster(name)
        self.wait_until_deleted(name, timeout, poll)
        return deleted
