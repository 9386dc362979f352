"""The reaper's AMI sweep against moto's EC2 and SSM: expired AMIs no run may still boot (none launched from them,
none SSM pointed at within the longest a run lives, none a launch template names), the snapshots they left behind,
and the AMIs a bake left untagged, which are reported, never deleted."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dtp.naming import RunNames, expiry, resource_tags
from dtp.reaper.amis import RUN_LIFETIME, UNTAGGED_GRACE, expired_amis, template_amis
from dtp.reaper.aws import find_expired_in_aws
from dtp.reaper.deletion import reap

AWS = "aws_default"
NOW = datetime.now(UTC)
PARAMETER = "/dtp/amis/pcluster-gpu"
BAKED_NAME = "dtp-pcluster-gpu-0123456789ab"  # bake_requests' name prefix and PackerBuildOperator's fingerprint


def from_now(delta: timedelta) -> datetime:
    """``delta`` after this moment, not after ``NOW``: moto stamps SSM versions and AMIs with the clock, and a full
    suite reaches these tests over an hour after it imported this module."""
    return datetime.now(UTC) + delta


def no_run_active(dag_id: str, run_id: str) -> bool:
    return False


@pytest.fixture
def ec2(moto_aws: Callable[[str], Any]) -> Any:
    return moto_aws("ec2")


@pytest.fixture
def ssm(moto_aws: Callable[[str], Any]) -> Any:
    return moto_aws("ssm")


def tagged(hours: float) -> list[dict[str, str]]:
    tags = resource_tags(RunNames("ami_bake", "manual__1"), "ami-bake", expiry(hours, NOW))
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def ami(ec2: Any, hours: float) -> tuple[str, str]:
    """An AMI and its snapshot, both tagged as ami_bake tags them (``tag_image``), expiring in ``hours``."""
    image_id, snapshot = untagged_ami(ec2, f"dtp-test-{uuid.uuid4().hex[:8]}")
    ec2.create_tags(Resources=[image_id, snapshot], Tags=tagged(hours))
    return image_id, snapshot


def untagged_ami(ec2: Any, name: str) -> tuple[str, str]:
    """An AMI and its snapshot as packer leaves them when its worker dies before tagging: with no tags."""
    image_id = ec2.register_image(Name=name)["ImageId"]
    snapshot = ec2.describe_images(ImageIds=[image_id])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    return image_id, snapshot


def orphan(ec2: Any, hours: float) -> str:
    """A snapshot of an AMI deregistered when deleting the snapshot failed: tagged, and used by no AMI."""
    volume = ec2.create_volume(AvailabilityZone="us-east-1a", Size=8)["VolumeId"]
    return ec2.create_snapshot(
        VolumeId=volume, TagSpecifications=[{"ResourceType": "snapshot", "Tags": tagged(hours)}]
    )["SnapshotId"]


def launch(ec2: Any, image_id: str) -> str:
    return str(ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"])


def launch_template(ec2: Any, name: str, data: dict[str, Any]) -> str:
    """The id of a launch template ``name`` whose first version launches with ``data``, as a node group's does."""
    template = ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData=data)["LaunchTemplate"]
    return str(template["LaunchTemplateId"])


def publish(ssm: Any, *image_ids: str) -> None:
    """Publish ``image_ids`` to ``PARAMETER`` one after the other, as successive bakes do: the last is published."""
    for image_id in image_ids:
        ssm.put_parameter(Name=PARAMETER, Value=image_id, Type="String", Overwrite=True)


def found_names(found: list[Any], kind: str = "ami") -> list[str]:
    return [item.name for item in found if item.kind == kind]


def image_exists(ec2: Any, image_id: str) -> bool:
    return bool(ec2.describe_images(Filters=[{"Name": "image-id", "Values": [image_id]}])["Images"])


def snapshot_exists(ec2: Any, snapshot_id: str) -> bool:
    return snapshot_id in {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}


def test_an_expired_ami_goes_with_its_snapshots_and_a_live_or_published_one_stays(ec2, ssm) -> None:
    expired, expired_snapshot = ami(ec2, -1)
    published, _ = ami(ec2, -1)
    alive, _ = ami(ec2, 24)
    publish(ssm, published)
    found = expired_amis(ec2, ssm, NOW)
    # The expired AMI's snapshot is deleted with it (deregister_image), not a second time as an orphan.
    assert [(f.kind, f.name) for f in found] == [("ami", expired)]
    assert expired_snapshot not in {f.name for f in found} and alive not in {f.name for f in found}


def test_an_expired_snapshot_no_ami_uses_is_found(ec2, ssm) -> None:
    left, kept = orphan(ec2, -1), orphan(ec2, 24)
    found = expired_amis(ec2, ssm, NOW)
    assert ("snapshot", left) in [(f.kind, f.name) for f in found]
    assert kept not in {f.name for f in found}


@pytest.mark.parametrize("state", ["running", "stopped"])
def test_an_expired_ami_an_instance_was_launched_from_is_kept(ec2, ssm, caplog, state: str) -> None:
    used, _ = ami(ec2, -1)
    instance = launch(ec2, used)
    if state == "stopped":
        ec2.stop_instances(InstanceIds=[instance])
    with caplog.at_level(logging.INFO, logger="dtp.reaper.amis"):
        found = expired_amis(ec2, ssm, NOW)
    assert found_names(found) == []
    assert f"keeping ami {used} of run" in caplog.text and f"instance {instance} ({state}) uses it" in caplog.text


def test_an_expired_ami_only_a_terminated_instance_was_launched_from_goes(ec2, ssm) -> None:
    used, _ = ami(ec2, -1)
    ec2.terminate_instances(InstanceIds=[launch(ec2, used)])
    assert found_names(expired_amis(ec2, ssm, NOW)) == [used]


def test_an_expired_ami_ssm_pointed_at_within_a_runs_lifetime_is_kept(ec2, ssm, caplog) -> None:
    # The weekly bake published `newer` a moment ago: a run that resolved `older` before may still boot it.
    older, _ = ami(ec2, -1)
    newer, _ = ami(ec2, -1)
    publish(ssm, older, newer)
    with caplog.at_level(logging.INFO, logger="dtp.reaper.amis"):
        assert found_names(expired_amis(ec2, ssm, NOW)) == []
    assert f"keeping ami {older} of run" in caplog.text and f"SSM {PARAMETER} pointed at it until" in caplog.text
    assert f"keeping ami {newer} of run" in caplog.text and f"SSM {PARAMETER} points at it" in caplog.text
    # Once every run that could have resolved it is over, only the AMI SSM points at now is kept.
    runs_over = from_now(RUN_LIFETIME + timedelta(hours=1))
    assert found_names(expired_amis(ec2, ssm, runs_over)) == [older]


def test_an_expired_ami_a_launch_templates_default_or_latest_version_names_is_kept(ec2, ssm, caplog) -> None:
    # An EKS node group scaled to zero: no instance of `older` is alive, yet its next node boots it.
    older, _ = ami(ec2, -1)
    newer, _ = ami(ec2, -1)
    template = launch_template(ec2, "gpu-nodes", {"ImageId": older, "InstanceType": "p5.48xlarge"})
    with caplog.at_level(logging.INFO, logger="dtp.reaper.amis"):
        assert found_names(expired_amis(ec2, ssm, NOW)) == [newer]
    assert f"keeping ami {older} of run" in caplog.text
    assert f"launch template {template} (gpu-nodes) version 1 names it" in caplog.text
    # A new latest version names `newer`; the group still launches the default one, `older`.
    ec2.create_launch_template_version(LaunchTemplateId=template, LaunchTemplateData={"ImageId": newer})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dtp.reaper.amis"):
        assert found_names(expired_amis(ec2, ssm, NOW)) == []
    assert f"launch template {template} (gpu-nodes) version 2 names it" in caplog.text
    # Once the new version is the default too, nothing launches `older` any more.
    ec2.modify_launch_template(LaunchTemplateId=template, DefaultVersion="2")
    assert found_names(expired_amis(ec2, ssm, NOW)) == [older]


def test_a_launch_template_naming_no_ami_by_id_spares_nothing(ec2, ssm) -> None:
    expired, _ = ami(ec2, -1)
    launch_template(ec2, "no-image", {"InstanceType": "p5.48xlarge"})  # the node group's AMI type picks the AMI
    # published_amis keeps what /dtp/amis names; the worker may read no other parameter.
    launch_template(ec2, "ssm-image", {"ImageId": f"resolve:ssm:{PARAMETER}"})
    assert template_amis(ec2) == {}
    assert found_names(expired_amis(ec2, ssm, NOW)) == [expired]


def test_a_launch_template_deleted_while_the_sweep_reads_it_spares_nothing(ec2, ssm, moto_aws) -> None:
    # A cluster torn down between the sweep listing its launch template and reading the template's versions.
    expired, _ = ami(ec2, -1)
    template = launch_template(ec2, "torn-down", {"ImageId": expired})

    def delete_template(**kwargs: Any) -> None:
        moto_aws("ec2").delete_launch_template(LaunchTemplateId=template)

    ec2.meta.events.register("before-call.ec2.DescribeLaunchTemplateVersions", delete_template)
    assert found_names(expired_amis(ec2, ssm, NOW)) == [expired]


def test_an_old_unpublished_unused_ami_is_deregistered_with_its_snapshots(ec2, ssm) -> None:
    expired, snapshot = ami(ec2, -1)
    kept, kept_snapshot = ami(ec2, -1)
    launch(ec2, kept)
    findings = find_expired_in_aws(AWS, NOW, active=no_run_active, installation="0a1b2c3d")
    assert found_names(findings.found) == [expired] and findings.unsearched == {}
    reap(findings.found, AWS, None, dry_run=False)
    assert not image_exists(ec2, expired) and not snapshot_exists(ec2, snapshot)
    assert image_exists(ec2, kept) and snapshot_exists(ec2, kept_snapshot)


def test_a_dry_run_deletes_no_ami(ec2, ssm) -> None:
    expired, snapshot = ami(ec2, -1)
    left = orphan(ec2, -1)
    findings = find_expired_in_aws(AWS, NOW, active=no_run_active, installation="0a1b2c3d")
    assert found_names(findings.found) == [expired] and found_names(findings.found, "snapshot") == [left]
    assert reap(findings.found, AWS, None, dry_run=True)["deleted"] == []
    assert image_exists(ec2, expired) and snapshot_exists(ec2, snapshot) and snapshot_exists(ec2, left)


def test_an_ami_a_bake_left_untagged_is_reported_and_not_deleted(ec2, ssm, caplog) -> None:
    left, snapshot = untagged_ami(ec2, BAKED_NAME)
    used, _ = untagged_ami(ec2, "dtp-pcluster-gpu-abcdef012345")
    launch(ec2, used)
    published, _ = untagged_ami(ec2, "dtp-eks-gpu-ba9876543210")
    publish(ssm, published)
    not_a_bake, _ = untagged_ami(ec2, "dtp-pcluster-gpu-manual-copy")
    later = from_now(UNTAGGED_GRACE + timedelta(hours=1))
    with caplog.at_level(logging.INFO, logger="dtp.reaper.amis"):
        found = expired_amis(ec2, ssm, later)
    assert found == []  # no tags: no run, no installation to spare or reap it by
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"ami {left} ({BAKED_NAME})")
    assert f"--image-id {left}" in warnings[0] and f"--snapshot-id {snapshot}" in warnings[0]
    assert f"keeping untagged ami {used}" in caplog.text and f"keeping untagged ami {published}" in caplog.text
    assert not_a_bake not in caplog.text
    findings = find_expired_in_aws(AWS, later, active=no_run_active, installation="0a1b2c3d")
    reap(findings.found, AWS, None, dry_run=False)
    assert image_exists(ec2, left) and snapshot_exists(ec2, snapshot)


def test_an_untagged_ami_of_a_bake_a_launch_template_names_is_not_reported(ec2, ssm, caplog) -> None:
    left, _ = untagged_ami(ec2, BAKED_NAME)
    template = launch_template(ec2, "gpu-nodes", {"ImageId": left})
    with caplog.at_level(logging.INFO, logger="dtp.reaper.amis"):
        expired_amis(ec2, ssm, from_now(UNTAGGED_GRACE + timedelta(hours=1)))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"keeping untagged ami {left} ({BAKED_NAME}): launch template {template} (gpu-nodes)" in caplog.text


def test_an_untagged_ami_of_a_bake_that_may_still_go_is_not_reported(ec2, ssm, caplog) -> None:
    untagged_ami(ec2, BAKED_NAME)
    with caplog.at_level(logging.INFO, logger="dtp.reaper.amis"):
        expired_amis(ec2, ssm, NOW)
    assert BAKED_NAME not in caplog.text
