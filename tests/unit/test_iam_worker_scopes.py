"""docs/iam/dtp-worker-policy.json scopes what the workers may delete, read and change to DTP's own resources: by
DTP's owner tag, by the ``dtp-`` prefix of a name, or to the one kind of resource DTP uses (the scan that the policy
allows every call DTP makes: test_iam_policy.py)."""

from __future__ import annotations

import pytest
from iam_policy_documents import allowing, allows, condition_values, listed, load
from iam_tables import OWNER_TAG

from dtp.naming import OWNER, PREFIX


def test_worker_policy_scopes_deletes_to_dtps_resources() -> None:
    """Deleting what DTP creates by id (network pieces, AMIs and snapshots, clusters, FSx tasks), and taking a
    network's pieces apart, takes its owner tag; what it creates by name (stacks, buckets, Batch resources,
    parameters, repositories) is scoped by the name's prefix."""
    policy = load("dtp-worker-policy.json")
    unlinking = (
        "ec2:DetachInternetGateway",
        "ec2:DisassociateRouteTable",
        "ec2:DeleteRoute",
        "ec2:DisassociateAddress",
    )
    revoking = ("ec2:RevokeSecurityGroupIngress", "ec2:RevokeSecurityGroupEgress")
    deleting = ("ec2:DeleteVpc", "ec2:ReleaseAddress", "ec2:DeregisterImage", "ec2:DeleteSnapshot")
    for action in (*unlinking, *revoking, *deleting, "sagemaker:DeleteCluster", "fsx:CancelDataRepositoryTask"):
        assert all(condition_values(s, f"aws:ResourceTag/{OWNER_TAG}") == [OWNER] for s in allowing(policy, action))
    for action in ("cloudformation:DeleteStack", "s3:DeleteBucket", "batch:DeleteComputeEnvironment"):
        resources = [r for s in allowing(policy, action) for r in listed(s["Resource"])]
        assert resources and all(f"/{PREFIX}-" in r or f":::{PREFIX}-" in r for r in resources), (action, resources)


def test_worker_policy_reads_the_console_output_of_dtps_instances_only() -> None:
    """deploy_cluster reads a head node's host keys from its console output, which may hold whatever any instance
    printed at boot: the worker reads only that of instances that carry DTP's owner tag."""
    reading = allowing(load("dtp-worker-policy.json"), "ec2:GetConsoleOutput")
    assert reading and all(condition_values(s, f"aws:ResourceTag/{OWNER_TAG}") == [OWNER] for s in reading)


def test_worker_policy_describes_only_eks_clusters() -> None:
    resources = [
        r for s in allowing(load("dtp-worker-policy.json"), "eks:DescribeCluster") for r in listed(s["Resource"])
    ]
    assert resources == ["arn:aws:eks:*:*:cluster/*"]


@pytest.mark.parametrize(
    ("group", "allowed"),
    [
        (f"/aws/sagemaker/Clusters/{PREFIX}-train-e2e-0123456789/a1b2c3d4e5f6", True),
        ("/aws/sagemaker/Clusters/prod-cluster/a1b2c3d4e5f6", False),
        ("/aws/batch/job", False),  # shared by every Batch job in the account: not DTP's to expire
    ],
)
def test_worker_policy_sets_the_retention_of_dtps_hyperpod_log_groups_only(group: str, allowed: bool) -> None:
    """Teardown and the reaper have a HyperPod cluster's log group expire (``dtp.platforms.hyperpod_logs``): its
    cluster's, named by the run, and no other log group's, though one statement grants it with reading Batch logs."""
    policy = load("dtp-worker-policy.json")
    for arn in (
        f"arn:aws:logs:us-east-1:123456789012:log-group:{group}",
        f"arn:aws:logs:us-east-1:123456789012:log-group:{group}:*",
    ):
        assert allows(policy, "logs:PutRetentionPolicy", arn, {}) == allowed, arn
