"""AmiHook.deregister_image when EC2 still holds a snapshot of the AMI just deregistered as in use: the snapshot is
deleted once EC2 lets it go; any other error is raised at once. EC2 is botocore's Stubber."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from dtp.hooks import ami
from dtp.hooks.ami import AmiHook

IMAGE = {
    "ImageId": "ami-1",
    "BlockDeviceMappings": [{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": "snap-1"}}],
}


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(ami.time, "sleep", slept.append)
    return slept


@pytest.fixture
def ec2() -> Iterator[Stubber]:
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    with Stubber(client) as stubber:
        stubber.add_response("describe_images", {"Images": [IMAGE]}, {"ImageIds": ["ami-1"]})
        stubber.add_response("deregister_image", {}, {"ImageId": "ami-1"})
        yield stubber
        stubber.assert_no_pending_responses()


@pytest.fixture
def hook(ec2: Stubber) -> AmiHook:
    amis = AmiHook(aws_conn_id=None)
    amis.__dict__["conn"] = ec2.client  # the cached client property, stubbed
    return amis


def test_a_snapshot_still_in_use_is_deleted_once_ec2_lets_it_go(
    hook: AmiHook, ec2: Stubber, sleeps: list[float]
) -> None:
    ec2.add_client_error("delete_snapshot", "InvalidSnapshot.InUse", expected_params={"SnapshotId": "snap-1"})
    ec2.add_response("delete_snapshot", {}, {"SnapshotId": "snap-1"})
    assert hook.deregister_image("ami-1") == ["snap-1"]
    assert sleeps == [ami.SNAPSHOT_IN_USE_DELAY_S]


def test_a_snapshot_in_use_for_good_is_raised_after_the_retries(
    hook: AmiHook, ec2: Stubber, sleeps: list[float]
) -> None:
    for _ in range(ami.SNAPSHOT_IN_USE_RETRIES + 1):
        ec2.add_client_error("delete_snapshot", "InvalidSnapshot.InUse", expected_params={"SnapshotId": "snap-1"})
    with pytest.raises(ClientError, match=r"InvalidSnapshot\.InUse"):
        hook.deregister_image("ami-1")
    assert len(sleeps) == ami.SNAPSHOT_IN_USE_RETRIES


def test_another_error_is_raised_at_once(hook: AmiHook, ec2: Stubber, sleeps: list[float]) -> None:
    ec2.add_client_error("delete_snapshot", "UnauthorizedOperation", expected_params={"SnapshotId": "snap-1"})
    with pytest.raises(ClientError, match="UnauthorizedOperation"):
        hook.deregister_image("ami-1")
    assert sleeps == []
