"""The reaper's finders in the AWS account: each kind of resource a run tags, found by its tags."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from airflow.providers.amazon.aws.hooks.batch_client import BatchClientHook
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.providers.amazon.aws.hooks.ssm import SsmHook
from botocore.exceptions import ClientError

from dtp.hooks.hyperpod import HyperPodHook
from dtp.hooks.stacks import StackHook
from dtp.hooks.sweeper import RunResourceSweeper
from dtp.images.ami import BUILDER_TAG
from dtp.naming import EXPIRES_TAG, tags_dict
from dtp.reaper.active_runs import spare_active_runs, spare_other_installations
from dtp.reaper.amis import expired_amis
from dtp.reaper.expired import RUN, Expired, is_expired

log = logging.getLogger(__name__)
# The tags ParallelCluster adds to the cluster config's Tags (which carry dtp:run and dtp:expires-at) on a cluster's
# root stack (aws-parallelcluster's pcluster/constants.py PCLUSTER_VERSION_TAG; its list_pcluster_stacks tells
# cluster stacks from `pcluster build-image` stacks, which carry both tags, the same way).
PCLUSTER_VERSION_TAG = "parallelcluster:version"
PCLUSTER_IMAGE_ID_TAG = "parallelcluster:image_id"


@dataclass(frozen=True)
class AwsFindings:
    """What ``find_expired_in_aws`` found to delete, and the kinds it could not look for (kind: the error)."""

    found: list[Expired]
    unsearched: dict[str, str] = field(default_factory=dict)


def find_expired_in_aws(
    aws_conn_id: str, now: datetime | None = None, *, active: Callable[[str, str], bool], installation: str
) -> AwsFindings:
    """The account's expired stacks (network and ParallelCluster cluster stacks), buckets, VPCs, HyperPod clusters,
    Batch environments, builder instances, AMIs no run may still boot and the snapshots AMIs left behind
    (``expired_amis``, which logs the AMIs a bake left untagged), less those of a run of another installation than
    ``installation`` within a day of their expiry (``spare_other_installations``) and those of a run ``active`` says
    is queued or running. Each kind is looked for on its own: one whose lookup fails (an API down, a permission
    missing) is logged and named in ``unsearched``, and the others are still found."""
    now = now or datetime.now(UTC)
    ec2 = RunResourceSweeper(aws_conn_id=aws_conn_id)  # one EC2 client, made at the first lookup that needs it
    lookups: dict[str, Callable[[], list[Expired]]] = {
        "stack": lambda: expired_stacks(StackHook(aws_conn_id=aws_conn_id).conn, now),
        "bucket": lambda: expired_buckets(S3Hook(aws_conn_id=aws_conn_id).conn, now),
        "vpc": lambda: expired_vpcs(ec2.conn, now),
        "hyperpod_cluster": lambda: expired_hyperpod_clusters(HyperPodHook(aws_conn_id=aws_conn_id), now),
        "batch": lambda: expired_batch_environments(BatchClientHook(aws_conn_id=aws_conn_id).client, now),
        "builder_instance": lambda: expired_builder_instances(ec2.conn, now),
        "ami": lambda: expired_amis(ec2.conn, SsmHook(aws_conn_id=aws_conn_id).conn, now),
    }
    found: list[Expired] = []
    unsearched: dict[str, str] = {}
    for kind, lookup in lookups.items():
        try:
            found += lookup()
        except Exception as err:  # the other kinds are still looked for, and deleted; reap fails at the end
            log.exception("could not look for expired resources of kind %s", kind)
            unsearched[kind] = f"{type(err).__name__}: {err}"
    return AwsFindings(spare_active_runs(spare_other_installations(found, installation, now), active), unsearched)


def expired_stacks(cloudformation: Any, now: datetime) -> list[Expired]:
    """Expired root stacks: a ParallelCluster cluster's (kind ``parallelcluster``, deleted before its run's network)
    and the rest (kind ``stack``, deleted with the network). A nested stack (ParallelCluster's QueuesStack and the
    like) carries its root's tags but is skipped: only a root stack may be deleted, and it takes its nested ones."""
    found = []
    for page in cloudformation.get_paginator("describe_stacks").paginate():
        for stack in page["Stacks"]:
            tags = tags_dict(stack.get("Tags", []))
            if stack.get("ParentId") or RUN not in tags or not is_expired(tags.get(EXPIRES_TAG), now):
                continue
            cluster = PCLUSTER_VERSION_TAG in tags and PCLUSTER_IMAGE_ID_TAG not in tags
            found.append(Expired.from_tags("parallelcluster" if cluster else "stack", stack["StackName"], tags))
    return found


def expired_buckets(s3: Any, now: datetime) -> list[Expired]:
    """Expired buckets of a run (one whose tags cannot be read is not one of DTP's)."""
    found = []
    for bucket in s3.list_buckets().get("Buckets", []):
        try:
            tags = tags_dict(s3.get_bucket_tagging(Bucket=bucket["Name"])["TagSet"])
        except ClientError:
            continue
        if RUN in tags and is_expired(tags.get(EXPIRES_TAG), now):
            found.append(Expired.from_tags("bucket", bucket["Name"], tags))
    return found


def expired_vpcs(ec2: Any, now: datetime) -> list[Expired]:
    """Expired VPCs of a run (what its network sweep deletes with them is found by their run's tag then)."""
    found = []
    for vpc in ec2.describe_vpcs(Filters=[{"Name": "tag-key", "Values": [RUN]}])["Vpcs"]:
        tags = tags_dict(vpc.get("Tags", []))
        if is_expired(tags.get(EXPIRES_TAG), now):
            found.append(Expired.from_tags("vpc", vpc["VpcId"], tags))
    return found


def expired_hyperpod_clusters(hyperpod: HyperPodHook, now: datetime) -> list[Expired]:
    """Expired HyperPod clusters of a run."""
    return [
        Expired.from_tags("hyperpod_cluster", name, tags)
        for name, tags in hyperpod.tagged_clusters()
        if RUN in tags and is_expired(tags.get(EXPIRES_TAG), now)
    ]


def expired_batch_environments(batch: Any, now: datetime) -> list[Expired]:
    """Expired Batch compute environments of a run (deleted with the run's queue, job definitions and jobs)."""
    found = []
    for page in batch.get_paginator("describe_compute_environments").paginate():
        for environment in page["computeEnvironments"]:
            tags = environment.get("tags", {})
            if RUN in tags and is_expired(tags.get(EXPIRES_TAG), now):
                found.append(Expired.from_tags("batch", environment["computeEnvironmentName"], tags))
    return found


def expired_builder_instances(ec2: Any, now: datetime) -> list[Expired]:
    """Packer builder instances (tagged ``dtp:packer-builder``) still there past their expiry: packer deletes its
    instance when a bake ends, so one left means the bake's worker died with it."""
    filters = [
        {"Name": "tag-key", "Values": [BUILDER_TAG]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
    ]
    found = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for instance in (i for reservation in page["Reservations"] for i in reservation["Instances"]):
            tags = tags_dict(instance.get("Tags", []))
            if is_expired(tags.get(EXPIRES_TAG), now):
                run_key = tags.get(RUN, instance["InstanceId"])
                found.append(Expired.from_tags("builder_instance", instance["InstanceId"], tags, run_key))
    return found
