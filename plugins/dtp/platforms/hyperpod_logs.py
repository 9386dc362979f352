"""A HyperPod cluster's CloudWatch log group, made to expire as a ParallelCluster's does.

SageMaker HyperPod writes a cluster's lifecycle-script and node logs to the log group
``/aws/sagemaker/Clusters/<cluster name>/<cluster id>``, which it creates with no retention and leaves behind when
the cluster is deleted: every run's events would be stored, and billed, for ever. When DTP is done with a cluster
(its teardown, the reaper, a cluster deleted to be created again) the group gets ``CLUSTER_LOG_RETENTION_DAYS``, the
retention ParallelCluster's configuration gives its own: kept for a post-mortem, then expired.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook
from botocore.exceptions import BotoCoreError, ClientError

from dtp.platforms.base import CLUSTER_LOG_RETENTION_DAYS

log = logging.getLogger(__name__)
LOG_GROUP_PREFIX = "/aws/sagemaker/Clusters"


def cluster_log_group(cluster: dict[str, Any]) -> str:
    """The log group of a described cluster: its name, then its id (the last part of its ARN)."""
    cluster_id = cluster["ClusterArn"].rsplit("/", 1)[1]
    return f"{LOG_GROUP_PREFIX}/{cluster['ClusterName']}/{cluster_id}"


def expire_cluster_logs(cluster: dict[str, Any], aws_conn_id: str) -> bool:
    """Give the described ``cluster``'s log group ``CLUSTER_LOG_RETENTION_DAYS`` (again, where it has them already);
    False, logged, where it could not: the cluster's deletion goes on regardless, its events then being kept."""
    group = cluster_log_group(cluster)
    try:
        AwsLogsHook(aws_conn_id=aws_conn_id).conn.put_retention_policy(
            logGroupName=group, retentionInDays=CLUSTER_LOG_RETENTION_DAYS
        )
    except (ClientError, BotoCoreError) as err:
        code = err.response.get("Error", {}).get("Code") if isinstance(err, ClientError) else None
        if code == "ResourceNotFoundException":
            name = cluster["ClusterName"]
            log.info("HyperPod cluster %s has no log group %s (no node logged): none to expire", name, group)
        elif code in ("AccessDenied", "AccessDeniedException"):
            log.warning(
                "Log group %s keeps its events: the worker's policy lacks logs:PutRetentionPolicy on it "
                "(docs/iam/dtp-worker-policy.json): %s",
                group,
                err,
            )
        else:
            log.warning("Log group %s keeps its events: could not give it a retention: %s", group, err)
        return False
    log.info("Log group %s expires its events after %d days", group, CLUSTER_LOG_RETENTION_DAYS)
    return True
