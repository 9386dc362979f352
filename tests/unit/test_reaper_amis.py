"""The reaper's AMI sweep against moto's EC2: expired AMIs SSM does not point at, and snapshots they left behind."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from moto import mock_aws

from dtp.naming import RunNames, expiry, resource_tags
from dtp.reaper.aws import expired_amis

NOW = datetime.now(UTC)


@pytest.fixture
def ec2() -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("ec2", region_name="us-east-1")


def tagged(hours: float) -> list[dict[str, str]]:
    tags = resource_tags(RunNames("ami_bake", "manual__1"), "ami-bake", expiry(hours, NOW))
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def ami(ec2: Any, hours: float) -> tuple[str, str]:
    """An AMI and its snapshot, both tagged as ami_bake tags them (``tag_image``), expiring in ``hours``."""
    image_id = ec2.register_image(Name=f"dtp-test-{hours}")["ImageId"]
    snapshot = ec2.describe_images(ImageIds=[image_id])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    ec2.create_tags(Resources=[image_id, snapshot], Tags=tagged(hours))
    return image_id, snapshot


def orphan(ec2: Any, hours: float) -> str:
    """A snapshot of an AMI deregistered when deleting the snapshot failed: tagged, and used by no AMI."""
    volume = ec2.create_volume(AvailabilityZone="us-east-1a", Size=8)["VolumeId"]
    return ec2.create_snapshot(
        VolumeId=volume, TagSpecifications=[{"ResourceType": "snapshot", "Tags": tagged(hours)}]
    )["SnapshotId"]


def test_an_expired_ami_goes_with_its_snapshots_and_a_live_or_published_one_stays(ec2) -> None:
    expired, expired_snapshot = ami(ec2, -1)
    published, _ = ami(ec2, -1)
    alive, _ = ami(ec2, 24)
    found = expired_amis(ec2, {published}, NOW)
    # The expired AMI's snapshot is deleted with it (deregister_image), not a second time as an orphan.
    assert [(f.kind, f.name) for f in found] == [("ami", expired)]
    assert expired_snapshot not in {f.name for f in found} and alive not in {f.name for f in found}


def test_an_expired_snapshot_no_ami_uses_is_found(ec2) -> None:
    left, kept = orphan(ec2, -1), orphan(ec2, 24)
    found = expired_amis(ec2, set(), NOW)
    assert ("snapshot", left) in [(f.kind, f.name) for f in found]
    assert kept not in {f.name for f in found}
