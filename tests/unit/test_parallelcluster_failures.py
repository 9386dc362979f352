"""What a failed ParallelCluster's task says of it: pcluster's failures, else its description, never the presigned URL
of its configuration (its session token would be in the task's log)."""

from __future__ import annotations

import json

from dtp.platforms.parallelcluster import failures

# pcluster describe-cluster of a cluster that failed without failure codes (as when its head node's bootstrap timed
# out before pcluster 3.6).
DESCRIBED = {
    "clusterName": "dtp-run",
    "clusterStatus": "CREATE_FAILED",
    "cloudFormationStackStatus": "CREATE_FAILED",
    "computeFleetStatus": "UNKNOWN",
    "clusterConfiguration": {
        "url": "https://parallelcluster-x.s3.amazonaws.com/config.yaml?X-Amz-Security-Token=IQoJb3JpZ2luX2VjEXAMPLE"
    },
    "failures": [],
}


def test_a_failure_without_codes_is_described_without_the_configurations_presigned_url() -> None:
    said = failures(DESCRIBED)
    assert "X-Amz-Security-Token" not in said and "clusterConfiguration" not in said
    assert json.loads(said)["clusterStatus"] == json.loads(said)["cloudFormationStackStatus"] == "CREATE_FAILED"


def test_failure_codes_are_given_with_their_reasons() -> None:
    described = {**DESCRIBED, "failures": [{"failureCode": "HeadNodeBootstrapFailure", "failureReason": "timed out"}]}
    assert failures(described) == "HeadNodeBootstrapFailure: timed out"
